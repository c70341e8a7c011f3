"""Promote-to-dev of an unchanged commit against a changed one, on real components.

``uv run python -m bench.build_reuse`` starts (or uses) a Docker engine, a private registry
on a free port and a temporary Prefect server, copies the example app into a throwaway git
repository and runs the local ``promote`` flow to dev: once to start, then ROUNDS times an
unchanged commit (reused and re-verified, nothing built or deployed) and a changed one
(built, signed, scanned, deployed). It prints the seconds of each and their ratio, and the
digests of two builds of one commit (the first build and a forced rebuild).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

from infra.base_image import ensure_base_image
from infra.demo_data import (
    ensure_promotion_keys,
    ensure_signing_keys,
    ensure_trivy_db,
    promotion_env,
    trusted_keys_env,
)
from infra.docker_engine import ensure_engine, stop_private_engine
from infra.registry import start_registry, stop_registry
from tests.conftest import EXAMPLE_APP, REPO_ROOT, without_canary

ROUNDS = 3


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ada Author", "GIT_AUTHOR_EMAIL": "ada@example.com",
           "GIT_COMMITTER_NAME": "Ada Author", "GIT_COMMITTER_EMAIL": "ada@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def _timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def _environment(root: Path, engine_host: str) -> dict[str, str]:
    registry = start_registry(root / "registry", users={"builder": secrets.token_urlsafe(12),
                                                        "deployer": secrets.token_urlsafe(12),
                                                        "promoter": secrets.token_urlsafe(12)})
    build, deploy = registry.account("builder"), registry.account("deployer")
    policies = root / "policies"
    policies.mkdir()
    for policy in (REPO_ROOT / "policies").glob("*.toml"):
        (policies / policy.name).write_text(without_canary(policy.read_text()))
    home = root / "home"
    private_pem, password, public_pem = ensure_signing_keys(home)
    ensure_trivy_db(home / "trivy")
    return {
        "PORTCULLIS_HOME": str(home), "PORTCULLIS_POLICY_DIR": str(policies),
        "PORTCULLIS_BUILD_REGISTRY": registry.address,
        "PORTCULLIS_BUILD_REGISTRY_USERNAME": build.username,
        "PORTCULLIS_BUILD_REGISTRY_PASSWORD": build.password,
        "PORTCULLIS_BUILD_DOCKER_HOST": engine_host, "PORTCULLIS_BUILD_SIGNING_MODE": "key",
        "PORTCULLIS_BUILD_COSIGN_PRIVATE_KEY": private_pem, "PORTCULLIS_BUILD_COSIGN_PASSWORD": password,
        "PORTCULLIS_DEPLOY_REGISTRY": registry.address,
        "PORTCULLIS_DEPLOY_REGISTRY_USERNAME": deploy.username,
        "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": deploy.password,
        "PORTCULLIS_DEPLOY_DOCKER_HOST": engine_host,
        "PORTCULLIS_DEPLOY_TRUSTED_PUBLIC_KEYS": trusted_keys_env(public_pem),
        # The deploy side signs the promotion record the next environment trusts, and attaches
        # it with its own push-only-promotions account.
        "PORTCULLIS_DEPLOY_PROMOTER_USERNAME": "promoter",
        "PORTCULLIS_DEPLOY_PROMOTER_PASSWORD": registry.account("promoter").password,
        **promotion_env(ensure_promotion_keys(home)),
    }


def main() -> None:
    """Run the benchmark and print its table."""
    root = Path(tempfile.mkdtemp(prefix="bench-build-reuse-"))
    engine = ensure_engine(root / "docker")
    client = docker.DockerClient(base_url=engine.host, version="auto")
    app = f"b-{secrets.token_hex(3)}"
    try:
        ensure_base_image(client)
        os.environ.update(_environment(root, engine.host))
        repo = root / "app"
        shutil.copytree(EXAMPLE_APP, repo)
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "hello v1")

        from prefect.testing.utilities import prefect_test_harness

        from flows.promote import promote

        def run(**kw: Any) -> Any:
            return promote(app=app, environment="dev", source_repo=str(repo), commit="HEAD",
                           ref="main", context_path=".", requested_by="bench", **kw)

        with prefect_test_harness(server_startup_timeout=120):
            first_s, first = _timed(run)
            rebuild_s, nothing = _timed(lambda: run(force_rebuild=True))
            assert nothing is None  # the forced rebuild reproduced the running digest
            from portcullis.settings import Settings
            from portcullis.state import open_state

            # The trail the flow wrote: the state store the settings name.
            log = open_state(Settings()).audit_log()
            builds = [r.digest for r in log.records() if r.event == "build.completed"]
            unchanged, changed = [], []
            for n in range(ROUNDS):
                seconds, result = _timed(run)
                assert result is None, "an unchanged commit was promoted again"
                unchanged.append(seconds)
                conf = repo / "app.conf"
                conf.write_text(conf.read_text() + f"# round {n}\n")
                _git(repo, "commit", "-qam", f"change {n}")
                seconds, result = _timed(run)
                assert result is not None and result.built is not None
                changed.append(seconds)
        same, new = statistics.median(unchanged), statistics.median(changed)
        print(f"\nbuild reuse: promote to dev, {ROUNDS} rounds each (median seconds, "
              f"engine {engine.server_version}, 2 shared cores)\n")
        print("| case | seconds | all rounds |")
        print("|---|---|---|")
        print(f"| unchanged commit (reuse: verify, no build, no deploy) | {same:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in unchanged)} |")
        print(f"| changed commit (build, sign, SBOM, scan, deploy) | {new:.2f} | "
              f"{', '.join(f'{s:.2f}' for s in changed)} |")
        print(f"| ratio changed / unchanged | {new / same:.1f}x | |")
        print(f"\nfirst promotion (cold) {first_s:.2f} s; forced rebuild of the same commit "
              f"{rebuild_s:.2f} s")
        print(f"two builds of one commit: {builds[0]}\n                          {builds[1]}"
              f"\n  identical: {builds[0] == builds[1] == first.image.digest}")
    finally:
        for c in client.containers.list(all=True, filters={"label": f"dev.portcullis.app={app}"}):
            c.remove(force=True)
        client.close()
        stop_registry(root / "registry")
        if engine.private:
            stop_private_engine(root / "docker")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
