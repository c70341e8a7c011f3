"""Supply-chain stages: sign + provenance, SBOM and scan attestations (build side), and the
deploy side's verification of all of it for the exact digest.

Build-side tasks load only :class:`BuildCredentials`; :func:`verify_evidence` loads only
:class:`DeployCredentials`.
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
from portcullis.errors import TransientError, VerificationFailed
from portcullis.evidence import VerifiedEvidence
from portcullis.models import BuildResult, Frozen, ImageRef
from portcullis.policy import EnvironmentPolicy
from portcullis.scan import SbomRecord, ScanOutcome, ScanReport, evaluate
from portcullis.verification import (
    AllOf,
    AttestationCheck,
    CheckResult,
    ProvenanceCheck,
    SignatureCheck,
    sbom_check,
)
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
    build: BuildResult, credentials_block: str | None = None, flow_run_url: str | None = None
) -> tuple[SigningRecord, SigningRecord]:
    """Sign the digest and attach signed SLSA v1 provenance.

    Args:
        build: the build result (digest, source, times).
        credentials_block: saved build credentials; None reads PORTCULLIS_BUILD_*.
        flow_run_url: link to the flow run recorded in the provenance.

    Returns:
        Where the signature and the provenance attestation were stored.
    """
    creds = BuildCredentials.resolve(credentials_block)
    started = time.monotonic()
    # One client and one decrypted key for both: opening the cosign key costs a scrypt run.
    # The key's setup is counted in the signature's time.
    with creds.registry_client() as client:
        signer = creds.evidence_signer(client)
        signature = _timed("signature", build.image, started, signer.sign_image(build.image))
        started = time.monotonic()
        where = signer.attest(build.image, SLSA_PROVENANCE_V1,
                              slsa_provenance(build, flow_run_url=flow_run_url))
        provenance = _timed("provenance", build.image, started, where)
    return signature, provenance


@task(name="export-image", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def export_image_archive(build: BuildResult, work_dir: Path, credentials_block: str | None = None) -> Path:
    """Save the built image from the build engine as a ``docker save`` tarball for trivy.

    Args:
        build: the build result; the archive is of exactly its digest.
        work_dir: where to write the archive.
        credentials_block: saved build credentials; None reads PORTCULLIS_BUILD_*.

    Returns:
        The archive path.
    """
    creds = BuildCredentials.resolve(credentials_block)
    client = creds.docker_client()
    try:
        image = client.images.get(str(build.image))
        work_dir.mkdir(parents=True, exist_ok=True)
        path = work_dir / f"{build.image.digest.removeprefix('sha256:')[:16]}.tar"
        with open(path, "wb") as fh:
            fh.writelines(image.save(named=False))
    except Exception as exc:  # noqa: BLE001 - the engine's errors are not typed usefully
        raise TransientError(f"could not export {build.image} from the build engine: {exc}") from None
    finally:
        client.close()
    return path


@task(name="attest-sbom", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def attest_sbom(image: ImageRef, sbom: SbomRecord, credentials_block: str | None = None) -> SigningRecord:
    """Attach the CycloneDX SBOM to the digest as a signed attestation.

    Args:
        image: the digest the SBOM describes.
        sbom: the SBOM stage's record (its file is read and signed as is).
        credentials_block: saved build credentials.

    Returns:
        Where the attestation was stored.
    """
    creds = BuildCredentials.resolve(credentials_block)
    document = json.loads(Path(sbom.path).read_bytes())
    return _attest_once(creds, "sbom", image, CYCLONEDX_BOM, document)


@task(name="attest-scan", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def attest_scan(image: ImageRef, outcome: ScanOutcome, credentials_block: str | None = None) -> SigningRecord:
    """Attach the scan report and the gate's verdict to the digest as a signed attestation.

    Args:
        image: the scanned digest.
        outcome: the scan stage's result.
        credentials_block: saved build credentials.

    Returns:
        Where the attestation was stored.
    """
    creds = BuildCredentials.resolve(credentials_block)
    predicate = {
        "report": outcome.report.model_dump(mode="json"),
        "verdict": outcome.verdict.model_dump(mode="json"),
    }
    return _attest_once(creds, "scan", image, SCAN_RESULT, predicate)


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
def verify_evidence(image: ImageRef, policy: EnvironmentPolicy, credentials_block: str | None = None) -> list[CheckResult]:
    """Deploy side: refuse the digest unless signature, provenance, SBOM and scan all check out.

    Args:
        image: the digest about to be deployed.
        policy: the environment's policy (loaded by the flow from the policy directory).
        credentials_block: saved deploy credentials; None reads PORTCULLIS_DEPLOY_*.

    Returns:
        What each check established.

    Raises:
        VerificationFailed: naming the check, the digest and the reason; never retried.
    """
    creds = DeployCredentials.resolve(credentials_block)
    try:
        results = verify_for_environment(image, policy, creds)
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
