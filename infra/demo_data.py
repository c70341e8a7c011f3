"""What the local stack provisions for signing and scanning with no internet.

* a cosign-format key pair: the private half goes to the build side only, the public half to
  the deploy side's trust policy;
* one more key pair per environment for its deploy side's signed promotion records: the
  private half signs that environment's records, the public half is the trust root the next
  environment checks them against;
* a small offline trivy database. trivy normally downloads its database; offline, the stack
  writes one with advisories for the example app's bundled component, so the scan gate has
  something real to decide. Point ``PORTCULLIS_TRIVY_CACHE_DIR`` at a mirrored database for
  real use.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from infra.trivydb import Advisory, Ecosystem, write_trivy_db
from portcullis.scan import Severity
from portcullis.signing.cosign_format import generate_key_pair, write_key_pair
from portcullis.toolrun import run_tool

DEMO_ADVISORIES = (
    Advisory(
        vulnerability_id="PCDEMO-2026-0001", ecosystem=Ecosystem.PIP, package="hello-widgets",
        severity=Severity.CRITICAL, fixed_version="1.2.0",
        title="hello-widgets before 1.2.0 lets any request read the server's files",
    ),
    Advisory(
        vulnerability_id="PCDEMO-2026-0002", ecosystem=Ecosystem.PIP, package="hello-widgets",
        severity=Severity.LOW, fixed_version="1.3.0",
        title="hello-widgets before 1.3.0 logs request headers at debug level",
    ),
)


ENVIRONMENTS = ("dev", "staging", "prod")


def ensure_signing_keys(state_dir: Path, name: str = "") -> tuple[str, str, str]:
    """Create (once) the stack's cosign key pair; return (private PEM, password, public PEM).

    ``name`` keeps another key pair in its own directory (``keys/NAME``).
    """
    keys = state_dir / "keys" / name if name else state_dir / "keys"
    password_file = keys / "cosign.password"
    if not password_file.exists():
        keys.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        write_key_pair(keys, generate_key_pair(), password, overwrite=True)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password)
    return (
        (keys / "cosign.key").read_text(),
        password_file.read_text(),
        (keys / "cosign.pub").read_text(),
    )


def ensure_promotion_keys(state_dir: Path) -> dict[str, tuple[str, str, str]]:
    """Create (once) each environment's promotion key pair (deploy side), never the build's."""
    return {env: ensure_signing_keys(state_dir, f"promotion-{env}") for env in ENVIRONMENTS}


def promotion_env(keys: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """The deploy side's promotion keys and trust roots as ``PORTCULLIS_DEPLOY_*`` variables."""
    return {
        "PORTCULLIS_DEPLOY_PROMOTION_SIGNING_KEYS": json.dumps({e: k[0] for e, k in keys.items()}),
        "PORTCULLIS_DEPLOY_PROMOTION_KEY_PASSWORDS": json.dumps({e: k[1] for e, k in keys.items()}),
        "PORTCULLIS_DEPLOY_PROMOTION_TRUST_ROOTS": json.dumps({e: [k[2]] for e, k in keys.items()}),
    }


def ensure_trivy_db(cache_dir: Path) -> Path:
    """Write the offline demo database (refreshed at every `up`, so it is never stale)."""
    return write_trivy_db(cache_dir, DEMO_ADVISORIES)


def trusted_keys_env(public_pem: str) -> str:
    """The deploy side's trusted keys as pydantic-settings reads a list from the environment."""
    return json.dumps([public_pem])


def ensure_gitops_repo(state_dir: Path, example: Path) -> str:
    """A local bare repository standing in for the team's GitOps repository (prod overlays).

    Seeded once from ``examples/gitops``; Argo CD or Flux would watch it in a real cluster.
    Returns its URL.
    """
    bare = state_dir / "gitops.git"
    if not (bare / "HEAD").exists():
        seed = state_dir / "gitops-seed"
        if seed.exists():
            shutil.rmtree(seed)
        shutil.copytree(example, seed)
        env = {"GIT_AUTHOR_NAME": "Portcullis stack", "GIT_AUTHOR_EMAIL": "stack@localhost",
               "GIT_COMMITTER_NAME": "Portcullis stack", "GIT_COMMITTER_EMAIL": "stack@localhost"}
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                     ["git", "commit", "-q", "-m", "seed overlays from examples/gitops"]):
            run_tool(argv, timeout=60, cwd=str(seed), env=env)
        run_tool(["git", "clone", "-q", "--bare", str(seed), str(bare)], timeout=60)
        shutil.rmtree(seed)
    return f"file://{bare}"


DEMO_APPROVERS = {
    # name: (groups, aliases) -- stand-ins for people enrolled on the deploy side
    "alice": (("security",), ("alice@example.com",)),
    "bob": (("platform",), ("bob@example.com",)),
    "carol": (("platform", "on-call"), ("carol@example.com",)),
    # A developer who asks for promotions (proves it with a code) and approves nothing.
    "trent": ((), ("trent@example.com",)),
}


def ensure_approvers(state_dir: Path) -> Path:
    """The local stack's approver directory (mode 600), enrolled once with fresh TOTP secrets.

    On a real deploy worker this file is written by whoever enrolls approvers, and each secret
    lives in that person's authenticator app; here ``python -m infra.demo code NAME`` plays
    the app.
    """
    import pyotp

    path = state_dir / "deploy-side" / "approvers.toml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = "".join(
            f'[[approver]]\nname = "{name}"\ngroups = {list(groups)!r}\naliases = {list(aliases)!r}\n'
            f'totp_secret = "{pyotp.random_base32(32)}"\n\n'
            for name, (groups, aliases) in DEMO_APPROVERS.items()
        ).replace("'", '"')
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
    return path
