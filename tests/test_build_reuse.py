"""Build once per change: an unchanged commit is not rebuilt nor redeployed, on a real Prefect
server, Docker engine, registry and trivy.

Given the example app promoted to dev, when dev runs again on the same commit, then the
earlier digest is verified again and nothing is built or deployed (``build.reused``,
``promotion.skipped``); a forced rebuild reproduces the same digest; a new commit is built and
its promotion lists what changed since the running version. A scheduled staging run with
nothing new does nothing and says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.deployed import promote_staging
from flows.promote import promote
from infra.production import ENTRYPOINTS, POOLS
from portcullis.audit import AuditRecord
from portcullis.settings import Settings
from portcullis.sides import WORKER_CONFIG_VAR, WorkerConfig
from portcullis.state import open_state
from tasks.deploy import LABEL_APP
from tests.conftest import REPO_ROOT, AppRepo, PipelineEnv, without_canary

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.timeout(900)]


def _promote(repo: AppRepo, app: str, **kw: Any) -> Any:
    return promote(app=app, environment="dev", source_repo=str(repo.path), commit="HEAD",
                   ref="main", context_path=".", requested_by="trent", **kw)


def _records(env: PipelineEnv, event: str) -> list[AuditRecord]:
    trail = open_state(Settings(home=env.home)).audit_log()
    return [r for r in trail.records() if r.event == event]


def _containers(client: docker.DockerClient, app: str) -> list[str]:
    return [c.id for c in client.containers.list(all=True, filters={"label": f"{LABEL_APP}={app}"})]


def _artifact(key: str) -> str:
    with get_client(sync_client=True) as client:
        # Asked by key: an unfiltered read returns only one page of the server's artifacts.
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    found.sort(key=lambda a: a.created or 0)  # type: ignore[arg-type, return-value]
    return str(found[-1].data)


def test_unchanged_commit_is_reused_not_rebuilt_nor_redeployed(
    prefect_harness: None, pipeline_env: PipelineEnv, app_repo: AppRepo, app_name: str,
    docker_client: docker.DockerClient,
) -> None:
    first = _promote(app_repo, app_name)
    assert first is not None and first.built is not None
    assert first.change.running_digest is None and first.change.change.commits == 1
    running = _containers(docker_client, app_name)

    # Same commit, same base: verified again, not built, not deployed.
    assert _promote(app_repo, app_name) is None
    assert len(_records(pipeline_env, "build.completed")) == 1
    reused = _records(pipeline_env, "build.reused")
    assert [r.digest for r in reused] == [first.image.digest]
    assert "built before as this digest" in str(reused[0].details["reason"])
    skipped = _records(pipeline_env, "promotion.skipped")
    assert skipped[-1].digest == first.image.digest and "already runs in dev" in str(skipped[-1].details["reason"])
    verified = _records(pipeline_env, "verification.passed")
    assert verified[-1].details["stage"] == "already-running"  # re-verified before skipping
    assert _containers(docker_client, app_name) == running
    artifact = _artifact(f"promotion-{app_name}-dev")
    assert "Nothing to promote" in artifact and "reused, not rebuilt" in artifact

    # A person forces a rebuild: recorded; the reproducible build gives the same digest.
    assert _promote(app_repo, app_name, force_rebuild=True) is None
    assert _records(pipeline_env, "build.forced")
    rebuilt = _records(pipeline_env, "build.completed")
    assert len(rebuilt) == 2 and rebuilt[1].digest == first.image.digest
    assert rebuilt[1].details["forced"] is True

    # A new commit: built, deployed, and its change listed against what runs.
    app_repo.commit_config("Say hello v2", MESSAGE='"hello v2"')
    second = _promote(app_repo, app_name)
    assert second is not None and second.built is not None
    assert second.image.digest != first.image.digest
    what = second.change
    assert what.running_digest == first.image.digest and what.scan_compared
    assert [(c.subject, c.author) for c in what.change.entries] == [("Say hello v2", "Ada Author <ada@example.com>")]
    assert not what.base_changed and what.base_after and what.base_after == what.base_before
    assert "Say hello v2" in _artifact(f"promotion-{app_name}-dev")


@contextmanager
def _on_deploy_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Run a deployed flow in this process as the deploy side's worker would start it: no
    build credentials, and a worker file fixing exactly these PORTCULLIS_* settings."""
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("PORTCULLIS_BUILD_")]:
            patch.delenv(name)
        environment = {k: v for k, v in os.environ.items()
                       if k.startswith("PORTCULLIS_") and k != WORKER_CONFIG_VAR}
        config = WorkerConfig(side="deploy", pool=POOLS["deploy"], name="deploy-test",
                              checkout=REPO_ROOT,
                              deployments=ENTRYPOINTS["deploy"], environment=environment)
        path = tmp_path / "deploy-worker.toml"
        path.write_text(config.to_toml())
        path.chmod(0o600)
        patch.setenv(WORKER_CONFIG_VAR, str(path))
        yield


def test_scheduled_staging_with_nothing_new_does_nothing(
    prefect_harness: None, pipeline_env: PipelineEnv, app_repo: AppRepo, app_name: str,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    policies = tmp_path / "policies-staging"
    policies.mkdir()
    (policies / "dev.toml").write_text(without_canary((REPO_ROOT / "policies" / "dev.toml").read_text()))
    (policies / "staging.toml").write_text(
        'environment = "staging"\npromote_from = "dev"\nallowed_branches = ["main"]\n'
        'allowed_repositories = ["file://*"]\n[scan]\nthreshold = "HIGH"\n'
        '[freeze]\ncalendar = "off"\n')
    monkeypatch.setenv("PORTCULLIS_POLICY_DIR", str(policies))

    with _on_deploy_worker(monkeypatch, tmp_path):
        assert promote_staging(app=app_name, requested_by="trent") is None
    assert "has passed dev yet" in str(_records(pipeline_env, "promotion.skipped")[-1].details["reason"])

    dev = _promote(app_repo, app_name)
    with _on_deploy_worker(monkeypatch, tmp_path):
        staging = promote_staging(app=app_name, requested_by="trent")
        assert staging is not None and staging.image.digest == dev.image.digest
        assert promote_staging(app=app_name, requested_by="trent") is None
    reason = str(_records(pipeline_env, "promotion.skipped")[-1].details["reason"])
    assert dev.image.digest in reason and "already runs in staging" in reason
    assert "already runs in staging" in _artifact(f"promotion-{app_name}-staging")
