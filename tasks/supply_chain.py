"""Supply-chain stages: sign + provenance, SBOM and scan attestations (build side), and the
deploy side's verification of all of it for the exact digest.

Build-side tasks take only :class:`BuildCredentials`; :func:`verify_evidence` takes only
:class:`DeployCredentials`. The flow resolves each side's credentials once and passes them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from blocks.credentials import BuildCredentials, DeployCredentials
from portcullis.attestations import CYCLONEDX_BOM, SCAN_RESULT, SLSA_PROVENANCE_V1, slsa_provenance
from portcullis.change import WhatChanged, compare_findings
from portcullis.errors import PortcullisError, VerificationFailed
from portcullis.evidence import EvidenceVerifier, VerifiedEvidence
from portcullis.models import BuildResult, Frozen, ImageRef
from portcullis.oci import Descriptor, RegistryClient
from portcullis.policy import EnvironmentPolicy
from portcullis.reproducible import OciImage, docker_archive
from portcullis.scan import Finding, SbomRecord, ScanOutcome, ScanReport, evaluate
from portcullis.verification import (
    AllOf,
    AttestationCheck,
    CheckResult,
    ProvenanceCheck,
    SignatureCheck,
    sbom_check,
)
from tasks.build import LABEL_BASE_ID, LABEL_BASE_NAME
from tasks.gates import RunAudit
from tasks.retry import only_transient


class SigningRecord(Frozen):
    """Where the build side stored a piece of evidence, and how long signing took."""

    image: ImageRef
    what: str
    location: str
    seconds: float


def _timed(action: str, image: ImageRef, started: float, location: str) -> SigningRecord:
    return SigningRecord(image=image, what=action, location=location,
                         seconds=time.monotonic() - started)


def _attest_once(creds: BuildCredentials, action: str, image: ImageRef, predicate_type: str,
                 predicate: dict[str, Any]) -> SigningRecord:
    started = time.monotonic()
    with creds.registry_client() as client:
        where = creds.evidence_signer(client).attest(image, predicate_type, predicate)
    return _timed(action, image, started, where)


@task(name="sign", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def sign_image_and_provenance(
    build: BuildResult, credentials: BuildCredentials, flow_run_url: str | None = None
) -> tuple[SigningRecord, SigningRecord]:
    """Sign the digest and attach signed SLSA v1 provenance.

    Args:
        build: the build result (digest, source, times).
        credentials: the build side's credentials.
        flow_run_url: link to the flow run recorded in the provenance.

    Returns:
        Where the signature and the provenance attestation were stored.
    """
    started = time.monotonic()
    # One client and one decrypted key for both: opening the cosign key costs a scrypt run.
    # The key's setup is counted in the signature's time.
    with credentials.registry_client() as client:
        signer = credentials.evidence_signer(client)
        signature = _timed("signature", build.image, started, signer.sign_image(build.image))
        started = time.monotonic()
        where = signer.attest(build.image, SLSA_PROVENANCE_V1,
                              slsa_provenance(build, flow_run_url=flow_run_url))
        provenance = _timed("provenance", build.image, started, where)
    return signature, provenance


@task(name="export-image", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def export_image_archive(build: BuildResult, work_dir: Path, credentials: BuildCredentials) -> Path:
    """Write the pushed image as a ``docker save`` tarball for trivy.

    Read back from the registry by digest (every blob checked against its digest), so the
    SBOM and the scan describe exactly what was pushed, and no engine has to hold it.

    Args:
        build: the build result; the archive is of exactly its digest.
        work_dir: where to write the archive.
        credentials: the build side's credentials.

    Returns:
        The archive path.
    """
    repository = build.image.repository
    with credentials.registry_client() as client:
        manifest = client.get_manifest(repository, build.image.digest)
        config = client.get_blob(repository, Descriptor.from_json(manifest.json().get("config")).digest)
        layers = tuple(client.get_blob(repository, layer.digest) for layer in manifest.layers())
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{build.image.digest.removeprefix('sha256:')[:16]}.tar"
    tag = f"{build.image.name}:{build.image.digest.removeprefix('sha256:')[:12]}"
    path.write_bytes(docker_archive(OciImage(manifest.raw, config, layers), tag))
    return path


@task(name="attest-sbom", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def attest_sbom(image: ImageRef, sbom: SbomRecord, credentials: BuildCredentials) -> SigningRecord:
    """Attach the CycloneDX SBOM to the digest as a signed attestation.

    Args:
        image: the digest the SBOM describes.
        sbom: the SBOM stage's record (its file is read and signed as is).
        credentials: the build side's credentials.

    Returns:
        Where the attestation was stored.
    """
    document = json.loads(Path(sbom.path).read_bytes())
    return _attest_once(credentials, "sbom", image, CYCLONEDX_BOM, document)


@task(name="attest-scan", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def attest_scan(image: ImageRef, outcome: ScanOutcome, credentials: BuildCredentials) -> SigningRecord:
    """Attach the scan report and the gate's verdict to the digest as a signed attestation.

    Args:
        image: the scanned digest.
        outcome: the scan stage's result.
        credentials: the build side's credentials.

    Returns:
        Where the attestation was stored.
    """
    predicate = {
        "report": outcome.report.model_dump(mode="json"),
        "verdict": outcome.verdict.model_dump(mode="json"),
    }
    return _attest_once(credentials, "scan", image, SCAN_RESULT, predicate)


def scan_check(policy: EnvironmentPolicy, now: datetime | None = None) -> AttestationCheck:
    """The signed scan result, judged again by *this* environment's scan policy."""

    def judge(found: VerifiedEvidence) -> str | None:
        try:
            report = ScanReport.model_validate(found.predicate.get("report"))
        except ValueError as exc:
            return f"scan attestation does not hold a scan report: {exc}"
        verdict = evaluate(report, policy.scan, now or datetime.now(UTC))
        return None if verdict.passed else f"{policy.environment} scan policy: {verdict.summary}"

    return AttestationCheck("scan", SCAN_RESULT, judge)


def verification_policy(policy: EnvironmentPolicy) -> AllOf:
    """Every check the deploy side runs before anything is deployed to the environment."""
    return AllOf([
        SignatureCheck(),
        ProvenanceCheck(policy.allowed_repositories, policy.allowed_branches),
        sbom_check(),
        scan_check(policy),
    ])


def verify_for_environment(image: ImageRef, policy: EnvironmentPolicy, creds: DeployCredentials) -> list[CheckResult]:
    """Verify the evidence for ``image`` against the environment policy with deploy credentials."""
    with creds.registry_client() as client:
        return verification_policy(policy).verify(image, creds.evidence_verifier(client))


@task(name="verify", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def verify_evidence(image: ImageRef, policy: EnvironmentPolicy, credentials: DeployCredentials) -> list[CheckResult]:
    """Deploy side: refuse the digest unless signature, provenance, SBOM and scan all check out.

    Args:
        image: the digest about to be deployed.
        policy: the environment's policy (loaded by the flow from the policy directory).
        credentials: the deploy side's credentials (trust roots, pull rights).

    Returns:
        What each check established.

    Raises:
        VerificationFailed: naming the check, the digest and the reason; never retried.
    """
    try:
        results = verify_for_environment(image, policy, credentials)
    except VerificationFailed as exc:
        create_markdown_artifact(
            markdown=f"# Verification refused\n\n- digest `{image.digest}`\n- check **{exc.check}**\n- {exc.reason}\n",
            key=f"verify-{image.digest.removeprefix('sha256:')[:16]}",
        )
        raise
    table = "\n".join(f"| {r.check} | {r.detail} |" for r in results)
    create_markdown_artifact(
        markdown=f"# Verified `{image.digest}` for {policy.environment}\n\n| check | result |\n|---|---|\n{table}\n",
        key=f"verify-{image.digest.removeprefix('sha256:')[:16]}",
    )
    return results


def verify_and_record(image: ImageRef, policy: EnvironmentPolicy, audit: RunAudit,
                      credentials: DeployCredentials, stage: str, *, once: bool = False) -> list[CheckResult]:
    """:func:`verify_evidence` at one stage of a run, with the outcome in its audit trail.

    Args:
        image: the digest about to be deployed (or rolled back to).
        policy: the environment's policy.
        audit: the run's audit trail: ``verification.passed`` or ``verification.refused``.
        credentials: the deploy side's credentials.
        stage: where in the run (``before-approval``, ``after-lock``, ``rollback``...).
        once: a run resumed after a wait takes what it verified at this stage before (the
            gates after the wait verify again).

    Returns:
        What each check established.
    """
    if once and (earlier := audit.earlier("verification.passed", stage=stage)) is not None:
        results = earlier.details.get("results")
        if isinstance(results, list):
            return [CheckResult.model_validate(r) for r in results]
    try:
        checks = verify_evidence(image, policy, credentials)
    except PortcullisError as exc:
        audit.record("verification.refused", stage=stage, reason=str(exc))
        raise
    audit.record("verification.passed", stage=stage,
                 checks={c.check: c.detail for c in checks},
                 results=[c.model_dump(mode="json") for c in checks])
    return checks


def _base_of(client: RegistryClient, image: ImageRef) -> str | None:
    """``name@id`` of the base image recorded in the image's labels, or None."""
    manifest = client.get_manifest(image.repository, image.digest)
    config_ref = Descriptor.from_json(manifest.json().get("config"))
    config = json.loads(client.get_blob(image.repository, config_ref.digest))
    labels = (config.get("config") or {}).get("Labels") or {}
    name, image_id = labels.get(LABEL_BASE_NAME), labels.get(LABEL_BASE_ID)
    return f"{name}@{image_id}" if name and image_id else None


def _findings_of(verifier: EvidenceVerifier, image: ImageRef) -> tuple[Finding, ...] | None:
    """The findings of the signed scan report of ``image``; None when there is none to read."""
    for found in verifier.statements(image, SCAN_RESULT):
        try:
            return ScanReport.model_validate(found.predicate.get("report")).findings
        except ValueError:
            continue
    return None


def compare_with_running(
    candidate: ImageRef, running: ImageRef | None, creds: DeployCredentials,
) -> WhatChanged:
    """Deploy side: the base image and the scan findings of ``candidate`` against ``running``.

    Both come from what the registry holds for the digests: the base from the image config's
    labels (content-addressed), the findings from the scan attestations that verify against
    the deploy side's trust roots. The commits are filled in by the caller.
    """
    with creds.registry_client() as client:
        verifier = creds.evidence_verifier(client)
        base_after = _base_of(client, candidate)
        after = _findings_of(verifier, candidate)
        if running is None:
            return WhatChanged(running_digest=None, change=None, base_after=base_after,
                               findings_new=after or (), scan_compared=after is not None)
        try:
            base_before = _base_of(client, running)
            before = _findings_of(verifier, running)
        except PortcullisError:
            base_before, before = None, None  # the running digest is gone from the registry
    if after is None or before is None:
        return WhatChanged(running_digest=running.digest, change=None, base_before=base_before,
                           base_after=base_after)
    new, gone, kept = compare_findings(before, after)
    return WhatChanged(running_digest=running.digest, change=None, base_before=base_before,
                       base_after=base_after, findings_new=new, findings_gone=gone,
                       findings_kept=kept, scan_compared=True)
