"""Policies and an application repository for end-to-end promotions (tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from infra.demo_data import ensure_promotion_keys, promotion_env, trusted_keys_env
from infra.registry import RunningRegistry
from tests.support.servicenow import PASSWORD, USER

REPO_ROOT = Path(__file__).resolve().parents[2]
GIT_ENV = {"GIT_AUTHOR_NAME": "Ada Author", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada Author", "GIT_COMMITTER_EMAIL": "ada@example.com"}


def write_policies(directory: Path, *, prod_frozen: bool, timeout: str = "PT5M") -> None:
    """dev: no approval; staging: one approval; prod: security + platform, with an on-call
    emergency rule, frozen now (a launch-week window) when ``prod_frozen``. No canary."""
    directory.mkdir()
    base = ('allowed_branches = ["main"]\nallowed_repositories = ["file://*"]\n'
            '[scan]\nthreshold = "HIGH"\n')
    (directory / "dev.toml").write_text('environment = "dev"\n' + base)
    (directory / "staging.toml").write_text(
        'environment = "staging"\npromote_from = "dev"\n' + base +
        f'[approval]\nrequired_approvals = 1\ntimeout = "{timeout}"\n[freeze]\ncalendar = "off"\n')
    window = ('[[freeze.windows]]\nkind = "once"\nname = "launch-week"\n'
              'reason = "marketing launch"\ntz = "UTC"\n'
              'start = "2020-01-01T00:00:00"\nend = "2099-01-01T00:00:00"\n')
    (directory / "prod.toml").write_text(
        'environment = "prod"\npromote_from = "staging"\n' + base +
        '[approval]\nrequired_approvals = 2\nrequired_groups = ["security", "platform"]\n'
        f'timeout = "{timeout}"\n'
        '[emergency_approval]\nrequired_approvals = 1\neligible_groups = ["on-call"]\n'
        f'timeout = "{timeout}"\n'
        '[freeze]\ncalendar = "off"\n' + (window if prod_frozen else ""))


def init_app_repo(path: Path) -> None:
    """A git repository (branch main, one commit) holding examples/hello."""
    shutil.copytree(REPO_ROOT / "examples" / "hello", path)
    env = {**os.environ, **GIT_ENV}
    for argv in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "hello v1"]):
        subprocess.run(["git", "-C", str(path), *argv], check=True, env=env, capture_output=True)


def stack_environment(*, home: Path, policies: Path, approvers: Path, registry: RunningRegistry,
                      docker_host: str, signing: tuple[str, str, str],
                      incidents_url: str) -> dict[str, str]:
    """The PORTCULLIS_* settings `infra.production.up` hands each side's worker.

    Args:
        home: PORTCULLIS_HOME.
        policies: the policy directory.
        approvers: the approvers file.
        registry: the registry (accounts ``builder``, ``deployer`` and ``promoter``).
        docker_host: the engine both sides use.
        signing: (private PEM, its password, public PEM), as ``ensure_signing_keys`` returns.
        incidents_url: the loopback ServiceNow instance.
    """
    private_pem, password, public_pem = signing
    builder, deployer = registry.account("builder"), registry.account("deployer")
    return {
        "PORTCULLIS_HOME": str(home),
        "PORTCULLIS_POLICY_DIR": str(policies),
        "PORTCULLIS_APPROVAL_POLL_SECONDS": "1",
        "PORTCULLIS_REPO_DIR": str(REPO_ROOT),
        "PORTCULLIS_BUILD_REGISTRY": registry.address,
        "PORTCULLIS_BUILD_REGISTRY_USERNAME": builder.username,
        "PORTCULLIS_BUILD_REGISTRY_PASSWORD": builder.password,
        "PORTCULLIS_BUILD_DOCKER_HOST": docker_host,
        "PORTCULLIS_BUILD_SIGNING_MODE": "key",
        "PORTCULLIS_BUILD_COSIGN_PRIVATE_KEY": private_pem,
        "PORTCULLIS_BUILD_COSIGN_PASSWORD": password,
        "PORTCULLIS_DEPLOY_REGISTRY": registry.address,
        "PORTCULLIS_DEPLOY_REGISTRY_USERNAME": deployer.username,
        "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": deployer.password,
        "PORTCULLIS_DEPLOY_DOCKER_HOST": docker_host,
        "PORTCULLIS_DEPLOY_TRUSTED_PUBLIC_KEYS": trusted_keys_env(public_pem),
        "PORTCULLIS_DEPLOY_PROMOTER_USERNAME": "promoter",
        "PORTCULLIS_DEPLOY_PROMOTER_PASSWORD": registry.account("promoter").password,
        **promotion_env(ensure_promotion_keys(home)),
        "PORTCULLIS_INCIDENTS_BASE_URL": incidents_url,
        "PORTCULLIS_INCIDENTS_USERNAME": USER,
        "PORTCULLIS_INCIDENTS_PASSWORD": PASSWORD,
        "PORTCULLIS_APPROVERS_FILE": str(approvers),
    }
