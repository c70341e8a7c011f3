"""Deploy side: sign the record of a completed promotion or rollback, and check the record of
the environment before.

The flows call :func:`complete_promotion` where a promotion completes, :func:`complete_rollback`
where a rollback completes, and :func:`verify_passed` before staging or prod take a digest.
The rules and the format live in :mod:`portcullis.promotion_record`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from prefect import task
from prefect.runtime import flow_run
from pydantic import ValidationError

from blocks.credentials import DeployCredentials
from portcullis.audit import AuditLog, AuditRecord, AuditTrail
from portcullis.chain import COMPLETED, passed_in
from portcullis.errors import PolicyRefusal
from portcullis.gitops import GitOpsCommit
from portcullis.models import Deployment, ImageRef
from portcullis.policy import EnvironmentPolicy
from portcullis.promotion_record import (
    ApprovalEntry,
    CanaryEntry,
    CanaryStepEntry,
    EvidenceEntry,
    FreezeEntry,
    PromotionPredicate,
    SignedRecord,
    sign_promotion,
)
from portcullis.results import CanaryReport
from portcullis.verification import CheckResult
from tasks.gates import RunAudit
from tasks.retry import only_transient

TOTP_VERIFIED = ("TOTP code of an enrolled approver, checked on the deploy side against its "
                 "secret, bound to this digest, time step {step} burned")


def run_records(log: AuditTrail, run_id: str, chunk: int = 1 << 20) -> list[AuditRecord]:
    """This run's audit records, in order. A JSONL log is read backwards from its end down to
    the run's ``promotion.started`` (a running promotion's records are at the tail); a store
    answers by its run index."""
    if not isinstance(log, AuditLog):
        return log.run_records(run_id)
    if not log.path.exists():
        return []
    needle = f'"run_id":"{run_id}"'.encode()
    start = b'"event":"promotion.started"'
    found: list[bytes] = []
    with log.path.open("rb") as f:
        position = f.seek(0, 2)
        tail = b""
        while position > 0:
            step = min(chunk, position)
            position -= step
            f.seek(position)
            lines = (f.read(step) + tail).split(b"\n")
            tail = lines.pop(0) if position > 0 else b""  # may be cut: finish it next round
            for line in reversed(lines):
                if needle in line:
                    found.append(line)
                    if start in line:
                        position = 0
                        break
    out = []
    for line in reversed(found):
        try:
            out.append(AuditRecord.model_validate_json(line))
        except ValidationError:
            continue
    return out


def run_facts(
    records: Sequence[AuditRecord], approved_by: Sequence[str],
) -> tuple[tuple[ApprovalEntry, ...], FreezeEntry | None, datetime | None]:
    """Approvals (only of ``approved_by``, the verified outcome), the last freeze decision and
    the start time, from one run's own audit records."""
    when: dict[str, ApprovalEntry] = {}
    freeze: FreezeEntry | None = None
    started: datetime | None = None
    for r in records:
        if r.event == "promotion.started" and started is None:
            started = r.at
        elif r.event == "approval.accepted" and r.actor in approved_by:
            when[r.actor] = ApprovalEntry(
                approver=r.actor, at=r.at,
                verified_by=TOTP_VERIFIED.format(step=r.details.get("totp_step")))
        elif r.event in ("freeze.checked", "freeze.bypassed"):
            freeze = FreezeEntry(frozen=bool(r.details.get("frozen")),
                                 bypassed=r.event == "freeze.bypassed",
                                 summary=str(r.details.get("summary", "")), checked_at=r.at)
    approvals = tuple(when.get(name) or ApprovalEntry(
        approver=name, verified_by="verified by the approval ledger of this run")
        for name in approved_by)
    return approvals, freeze, started


def canary_entry(report: CanaryReport | None) -> CanaryEntry | None:
    """The canary report as the record keeps it."""
    if report is None:
        return None
    return CanaryEntry(phase=report.phase.value, reason=report.reason, decided_by=report.decided_by,
                       steps=tuple(CanaryStepEntry(step=i, summary=s) for i, s in enumerate(report.steps)))


def evidence_entries(checks: Sequence[CheckResult]) -> tuple[EvidenceEntry, ...]:
    """What the deploy side verified, as the record keeps it."""
    return tuple(EvidenceEntry(check=c.check, detail=c.detail, signer=c.signer,
                               attestation=c.attestation) for c in checks)


@task(name="sign-promotion-record", retries=2, retry_delay_seconds=2,
      retry_condition_fn=only_transient)
def sign_record(image: ImageRef, predicate: PromotionPredicate,
                credentials: DeployCredentials) -> SignedRecord:
    """Sign ``predicate`` with this environment's promotion key and attach it to the digest."""
    key = credentials.promotion_signing_key(predicate.environment)
    with credentials.promoter_client() as client:
        return sign_promotion(client, image, predicate, key)


def complete_promotion(
    audit: RunAudit, image: ImageRef, policy: EnvironmentPolicy, checks: Sequence[CheckResult],
    approved_by: Sequence[str], *, commit: str, requested_by: str,
    deployment: Deployment | None, gitops: GitOpsCommit | None, canary: CanaryReport | None,
    ticket: str | None, credentials: DeployCredentials,
) -> SignedRecord:
    """Sign and attach the promotion record, then record ``promotion.completed``.

    The signed record, not the audit line, is what the next environment trusts; the audit
    line names where the record is.
    """
    approvals, freeze, started = run_facts(run_records(audit.log, audit.run_id), approved_by)
    predicate = PromotionPredicate(
        kind="promotion", app=audit.app, environment=audit.environment, image=str(image),
        digest=image.digest, commit=commit, policy_sha256=policy.policy_sha256,
        requested_by=requested_by, evidence=evidence_entries(checks), freeze=freeze,
        approvals=approvals, canary=canary_entry(canary), incident_ticket=ticket,
        run_id=audit.run_id, run_url=flow_run.get_flow_run_ui_url(), started_at=started,
        completed_at=datetime.now(UTC),
        deployed_to=deployment.url if deployment else (gitops.sha if gitops else None),
    )
    signed = sign_record(image, predicate, credentials)
    audit.record(COMPLETED, image=str(image), approved_by=list(approved_by),
                 url=deployment.url if deployment else None,
                 container=deployment.container_name if deployment else None,
                 previous_digest=deployment.previous_digest if deployment else None,
                 gitops_commit=gitops.sha if gitops else None, ticket=ticket,
                 promotion_record=signed.location, record_envelope=signed.envelope_digest,
                 record_seconds=round(signed.seconds, 4))
    return signed


def complete_rollback(
    audit: RunAudit, target: ImageRef, policy: EnvironmentPolicy, checks: Sequence[CheckResult],
    *, commit: str, rolled_back_from: str, reason: str, requested_by: str, deployed_to: str,
    credentials: DeployCredentials,
) -> SignedRecord:
    """Sign and attach the record of a rollback to ``target`` (what runs again, and why)."""
    _, _, started = run_facts(run_records(audit.log, audit.run_id), ())
    predicate = PromotionPredicate(
        kind="rollback", app=audit.app, environment=audit.environment, image=str(target),
        digest=target.digest, commit=commit, policy_sha256=policy.policy_sha256,
        requested_by=requested_by, evidence=evidence_entries(checks), run_id=audit.run_id,
        run_url=flow_run.get_flow_run_ui_url(), started_at=started,
        completed_at=datetime.now(UTC), deployed_to=deployed_to,
        rolled_back_from=rolled_back_from, reason=reason,
    )
    signed = sign_record(target, predicate, credentials)
    audit.record("rollback.recorded", promotion_record=signed.location,
                 record_envelope=signed.envelope_digest)
    return signed


def passed_record(image: ImageRef, environment: str, app: str,
                  credentials: DeployCredentials) -> str:
    """Refuse ``image`` unless ``environment``'s deploy side signed its promotion there.

    Returns:
        One line naming the record and its signer.

    Raises:
        PolicyRefusal: ``<digest> never passed <environment>``, with the reason.
    """
    trust = credentials.promotion_trust_root(environment)
    with credentials.registry_client() as client:
        found = passed_in(client, image, environment, trust, app)
    return f"{found.location} signed by key:{found.key_id[:16]} at {found.predicate.completed_at.isoformat()}"


# The gate as a task of the run (retried on registry hiccups); `plan` calls the plain function.
verify_passed = task(name="verify-promotion-record", retries=2, retry_delay_seconds=2,
                     retry_condition_fn=only_transient)(passed_record)


def promoted_image(policy: EnvironmentPolicy, image_ref: str | None, audit: RunAudit,
                   credentials: DeployCredentials) -> ImageRef:
    """For a promoting environment: the digest, which must have passed the one before (a
    promotion record signed by that environment's deploy side; the audit log proves nothing)."""
    if policy.promote_from is None:
        raise PolicyRefusal(f"{policy.environment} builds from source; it does not take an image")
    if image_ref is None:
        raise PolicyRefusal(
            f"{policy.environment} never rebuilds: pass the digest that passed {policy.promote_from}",
        )
    image = ImageRef.parse(image_ref)
    passed = verify_passed(image, policy.promote_from, audit.app, credentials)
    audit.about(image.digest).record("chain.checked", passed_in=policy.promote_from, record=passed)
    return image
