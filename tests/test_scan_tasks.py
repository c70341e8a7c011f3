"""The SBOM and scan Prefect tasks: retries only for transient failures, artifacts published."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import State
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed

from infra.trivydb import Advisory, Ecosystem, write_trivy_db
from portcullis.errors import ConfigurationError, PolicyRefusal, ToolError, TransientError
from portcullis.models import ImageRef
from portcullis.scan import SbomRecord, ScanOutcome, ScanPolicy, Severity
from tasks.retry import only_transient
from tasks.scan import generate_sbom_task, scan_task
from tests.support.oci_archive import alpine_files, write_image_archive

IMAGE = ImageRef(
    registry="127.0.0.1:5000", repository="portcullis/hello", digest="sha256:" + "e" * 64
)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (TransientError("registry timed out"), True),
        (PolicyRefusal("gate said no"), False),
        (ConfigurationError("no database"), False),
        (ToolError("trivy", 1, "corrupt database"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_only_transient_failures_are_retried(error: Exception, retried: bool) -> None:
    assert only_transient(None, None, Failed(data=error)) is retried  # type: ignore[arg-type]


def test_a_state_without_an_exception_is_not_retried() -> None:
    state: State[Any] = Failed(data="no exception here")
    assert only_transient(None, None, state) is False  # type: ignore[arg-type]


@pytest.fixture()
def harness(prefect_harness: None) -> None:
    """The session's temporary Prefect server (see conftest)."""


def _task_run(task_run_id: Any) -> Any:
    # Prefect 3 records task runs through its event pipeline, so the row can appear a moment
    # after the flow returns; poll instead of failing on a 404 from a busy machine.
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_task_run(task_run_id)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.mark.prefect_server
def test_tasks_publish_artifacts_and_block_a_critical(harness: None, tmp_path: Path) -> None:
    archive = write_image_archive(
        tmp_path / "image.tar", alpine_files("3.19.1", [("openssl", "3.1.4-r1")])
    ).path
    cache = tmp_path / "trivy-cache"
    write_trivy_db(
        cache,
        [
            Advisory(
                vulnerability_id="CVE-2099-0101",
                ecosystem=Ecosystem.ALPINE,
                os_version="3.19",
                package="openssl",
                severity=Severity.CRITICAL,
                fixed_version="3.1.4-r5",
            )
        ],
    )

    @flow
    def stage() -> tuple[SbomRecord, ScanOutcome]:
        sbom = generate_sbom_task(IMAGE, archive, tmp_path / "out" / "sbom.json", cache)
        outcome = scan_task(IMAGE, Path(sbom.path), cache, ScanPolicy())
        return sbom, outcome

    sbom, outcome = stage()
    assert sbom.summary.os == "alpine 3.19.1"
    assert Path(sbom.path).read_bytes()
    assert not outcome.verdict.passed
    assert [f.vulnerability_id for f in outcome.verdict.blocking] == ["CVE-2099-0101"]

    hex16 = IMAGE.digest.removeprefix("sha256:")[:16]
    wanted = {f"sbom-{hex16}", f"scan-findings-{hex16}"}
    with get_client(sync_client=True) as client:
        # Asked by key: the session's server holds many other tests' artifacts.
        keys = {a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(wanted))))}
    assert wanted <= keys


@pytest.mark.prefect_server
def test_missing_database_fails_once_without_retries(harness: None, tmp_path: Path) -> None:
    sbom = tmp_path / "sbom.json"
    sbom.write_text('{"bomFormat": "CycloneDX", "specVersion": "1.6", "components": []}')

    @flow
    def stage() -> tuple[Any, Any]:
        state = scan_task(IMAGE, sbom, tmp_path / "empty-cache", ScanPolicy(), return_state=True)
        return state.state_details.task_run_id, state.result(raise_on_failure=False)

    task_run_id, error = stage()
    assert isinstance(error, ConfigurationError)
    assert "vulnerability database is missing" in str(error)
    task_run = _task_run(task_run_id)
    assert task_run.run_count == 1  # the task allows 2 retries; a refusal must use none


@pytest.mark.prefect_server
def test_enforce_raises_after_publishing(harness: None, tmp_path: Path) -> None:
    archive = write_image_archive(
        tmp_path / "image.tar", alpine_files("3.19.1", [("openssl", "3.1.4-r1")])
    ).path
    cache = tmp_path / "trivy-cache"
    write_trivy_db(
        cache,
        [
            Advisory(
                vulnerability_id="CVE-2099-0102",
                ecosystem=Ecosystem.ALPINE,
                os_version="3.19",
                package="openssl",
                severity=Severity.HIGH,
                fixed_version="3.1.4-r5",
            )
        ],
    )

    @flow
    def stage() -> tuple[Any, Any]:
        sbom = generate_sbom_task(IMAGE, archive, tmp_path / "sbom.json", cache)
        state = scan_task(
            IMAGE, Path(sbom.path), cache, ScanPolicy(), enforce=True, return_state=True
        )
        return state.state_details.task_run_id, state.result(raise_on_failure=False)

    task_run_id, error = stage()
    assert isinstance(error, PolicyRefusal)
    assert "CVE-2099-0102" in str(error)
    hex16 = IMAGE.digest.removeprefix("sha256:")[:16]
    assert _task_run(task_run_id).run_count == 1
    with get_client(sync_client=True) as client:
        # Asked by key: an unfiltered read returns one page (200) of the session server's
        # artifacts in id order, which need not include this one.
        published = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"scan-findings-{hex16}"])))
    assert any(a.task_run_id == task_run_id for a in published)
