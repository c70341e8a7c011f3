"""Prefect tasks for the SBOM and vulnerability stages.

Thin glue: the work is in :mod:`portcullis.trivy` (running trivy) and :mod:`portcullis.scan`
(the gate's rules and the artifact content). These tasks add Prefect artifacts and retries;
only transient failures (a trivy timeout) are retried, never a refusal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from portcullis.models import ImageRef
from portcullis.scan import (
    SbomRecord,
    ScanOutcome,
    ScanPolicy,
    evaluate,
    findings_table,
    sbom_markdown,
    summarize_cyclonedx,
)
from portcullis.trivy import DEFAULT_TIMEOUT, generate_sbom, scan_sbom
from tasks.retry import only_transient


def _artifact_key(prefix: str, image: ImageRef) -> str:
    # Prefect keys allow lowercase letters, digits and dashes; one key per image keeps the
    # history of scans of the same digest together in the UI.
    return f"{prefix}-{image.digest.removeprefix('sha256:')[:16]}"


@task(
    name="generate-sbom",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
)
def generate_sbom_task(
    image: ImageRef,
    image_archive: Path,
    sbom_path: Path,
    cache_dir: Path,
    timeout: float = DEFAULT_TIMEOUT,
) -> SbomRecord:
    """Generate the CycloneDX SBOM of an image archive and publish its summary.

    Args:
        image: the image the archive holds, pinned by digest.
        image_archive: ``docker save`` tarball or OCI layout (tarball or directory).
        sbom_path: where to write the SBOM.
        cache_dir: trivy's cache directory (no database needed for this step).
        timeout: seconds before trivy is stopped.

    Returns:
        Where the SBOM is, its summary, and trivy's run time.
    """
    sbom = generate_sbom(image_archive, cache_dir=cache_dir, timeout=timeout)
    sbom_path.parent.mkdir(parents=True, exist_ok=True)
    sbom_path.write_bytes(sbom.content)
    summary = summarize_cyclonedx(sbom.content)
    create_markdown_artifact(
        markdown=sbom_markdown(summary, image.digest),
        key=_artifact_key("sbom", image),
        description=f"SBOM summary for {image}",
    )
    return SbomRecord(
        image_digest=image.digest,
        path=str(sbom_path),
        summary=summary,
        trivy_version=sbom.trivy_version,
        tool_seconds=sbom.tool_seconds,
    )


@task(
    name="vulnerability-scan",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=only_transient,
    cache_policy=NO_CACHE,
)
def scan_task(
    image: ImageRef,
    sbom_path: Path,
    cache_dir: Path,
    policy: ScanPolicy,
    enforce: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> ScanOutcome:
    """Scan an image's SBOM offline, judge it against the policy, and publish the findings.

    Args:
        image: the image the SBOM describes, pinned by digest.
        sbom_path: the SBOM written by :func:`generate_sbom_task`.
        cache_dir: the cache directory holding trivy's vulnerability database.
        policy: the vulnerability gate's policy.
        enforce: raise :class:`~portcullis.errors.PolicyRefusal` when the gate blocks (after
            publishing the artifacts). Leave False when the flow records the verdict first.
        timeout: seconds before trivy is stopped.

    Returns:
        The report and the verdict.
    """
    report = scan_sbom(sbom_path, image_digest=image.digest, cache_dir=cache_dir, timeout=timeout)
    verdict = evaluate(report, policy, datetime.now(UTC))
    create_table_artifact(
        table=findings_table(verdict),
        key=_artifact_key("scan-findings", image),
        description=verdict.summary,
    )
    if enforce:
        verdict.require_pass()
    return ScanOutcome(report=report, verdict=verdict)
