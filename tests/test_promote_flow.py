"""The promote flow end to end on a real Prefect engine, Docker engine, registry and trivy.

Given the example app, when it is promoted to dev, then it passes every supply-chain gate and
answers by digest; a version with a CRITICAL finding is refused by the scan gate and a version
that never becomes healthy is refused by the deploy; in both cases the good version keeps
serving.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import docker
import httpx
import pytest

from flows.promote import promote
from portcullis.errors import PolicyRefusal
from portcullis.settings import Settings
from portcullis.state import open_state
from tasks.deploy import LABEL_APP, DeployFailed
from tests.conftest import AppRepo, PipelineEnv

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server]


def _promote(repo: AppRepo, app: str, **kw: str):  # type: ignore[no-untyped-def]
    return promote(app=app, environment="dev", source_repo=str(repo.path), commit="HEAD",
                   ref="main", context_path=".", **kw)


def _vendor(repo: AppRepo, version: str) -> None:
    vendor = repo.path / "vendor"
    shutil.rmtree(vendor)
    meta = vendor / f"hello_widgets-{version}.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text(f"Metadata-Version: 2.1\nName: hello-widgets\nVersion: {version}\n")


def test_good_version_passes_every_gate_then_bad_versions_are_refused(
    prefect_harness: None, pipeline_env: PipelineEnv, app_repo: AppRepo, app_name: str,
    docker_client: docker.DockerClient,
) -> None:
    result = _promote(app_repo, app_name)
    assert [c.check for c in result.verification] == ["signature", "provenance", "sbom", "scan"]
    assert result.built is not None and result.built.scan.passed
    assert result.deployment.image.digest == result.built.build.image.digest == result.image.digest
    url = result.deployment.url
    assert httpx.get(url + "cgi-bin/hello", timeout=5).status_code == 200
    assert result.built.timings.wall_seconds > 0 and result.built.timings.tools_sum > 0

    # A commit that bundles a vulnerable widget library: the scan gate refuses it.
    _vendor(app_repo, "1.1.0")
    app_repo.git("add", "-A")
    app_repo.git("commit", "-qm", "downgrade widgets")
    with pytest.raises(PolicyRefusal, match="PCDEMO-2026-0001"):
        _promote(app_repo, app_name)

    # A commit whose version never becomes healthy: the deploy refuses it.
    _vendor(app_repo, "1.2.0")
    app_repo.commit_config("broken health", HEALTHY="no")
    with pytest.raises(DeployFailed):
        _promote(app_repo, app_name)

    containers = docker_client.containers.list(all=True, filters={"label": f"{LABEL_APP}={app_name}"})
    assert [c.labels["dev.portcullis.digest"] for c in containers] == [result.image.digest]
    assert httpx.get(url + "cgi-bin/hello", timeout=5).status_code == 200


def test_a_catalog_app_built_from_another_directory_is_refused_before_the_build(
    prefect_harness: None, pipeline_env: PipelineEnv,
) -> None:
    # hello, built from greeter's directory of the same repository: greeter's code would run
    # as hello, signed by the build side. Refused before anything is built or pushed.
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(PolicyRefusal, match="hello is built only as the catalog gives it"):
        promote(app="hello", environment="dev", source_repo=str(root), commit="HEAD", ref="HEAD",
                context_path="examples/greeter")
    events = [r.event for r in open_state(Settings(home=pipeline_env.home)).audit_log().records()
              if r.app == "hello"]
    assert events[-1] == "promotion.refused" and "build.completed" not in events


def test_no_flow_parameter_can_carry_or_weaken_a_policy() -> None:
    params = set(inspect.signature(promote.fn).parameters)
    assert not {p for p in params if "policy" in p or "scan" in p or "branch" in p or "skip" in p}
    assert params == {
        "app", "environment", "source_repo", "commit", "ref", "context_path", "image",
        "requested_by", "requester_code", "build_credentials_block", "deploy_credentials_block",
        "force_rebuild",
    }
