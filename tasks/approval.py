"""Prefect glue for the human approval gate.

The rules live in :mod:`portcullis.approval`; this module only pauses the flow run with a
form, hands each answer to the :class:`~portcullis.approval.ApprovalLedger`, writes every
decision to the audit log and offers the form again (with the reason) until the ledger is
satisfied, rejected or timed out.

:func:`request_approvals` must be called from the flow body: ``pause_flow_run`` keeps the
process alive and polls the server every ``poll_interval`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, NoReturn, assert_never

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, ValidationError

from portcullis.approval import (
    ApprovalDecision,
    ApprovalLedger,
    ApprovalOutcome,
    ApprovalPolicy,
    ApprovalSubject,
    ApproverDirectory,
    FileReplayStore,
    LedgerState,
    ReplayStore,
    ScanComparison,
    SubmitResult,
    Verdict,
    render_approval_request,
    replay_store_path,
)
from portcullis.audit import AuditEntry, AuditLog, AuditRecord
from portcullis.errors import PolicyRefusal
from portcullis.freeze import FreezeStatus


class ApprovalForm(RunInput):
    """The resume form. Everything typed here is unverified until the ledger checks it."""

    approver: str = Field(description="Your approver id, e.g. alice")
    code: str = Field(description="The current 6-digit code from your authenticator app")
    digest_prefix: str = Field(
        description="The first hex characters of the image digest, to confirm what you approve"
    )
    decision: Literal["approve", "reject"] = Field(
        description="approve, or reject to stop this promotion"
    )
    comment: str = Field(default="", description="Optional: why (kept in the audit log)")


def subject_for_current_run(
    *, app: str, environment: str, digest: str, commit: str, author: str, requested_by: str
) -> ApprovalSubject:
    """Build the approval subject from what the Prefect server recorded for this run.

    The run id and start time come from the server, not from flow parameters, so a
    parameter cannot shorten the wait timer. Prefect OSS records no user for a run; when the
    server has a ``created_by`` (Prefect Cloud) it wins over ``requested_by``.

    Args:
        app: application name.
        environment: target environment.
        digest: the image digest being promoted.
        commit: the source commit it was built from.
        author: the commit author, ``Name <email>``.
        requested_by: who asked for the promotion, as the caller knows it.

    Returns:
        the subject for :func:`request_approvals`.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("subject_for_current_run must be called inside a flow run")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(context.flow_run.id)
    triggered_by = requested_by
    if run.created_by is not None and run.created_by.display_value:
        triggered_by = run.created_by.display_value
    return ApprovalSubject(
        run_id=str(run.id),
        app=app,
        environment=environment,
        digest=digest,
        commit=commit,
        author=author,
        triggered_by=triggered_by,
        triggered_at=run.start_time or run.created or datetime.now(UTC),
    )


def _entry(subject: ApprovalSubject, event: str, actor: str, **details: object) -> AuditEntry:
    return AuditEntry.model_validate(
        {
            "event": event,
            "actor": actor,
            "run_id": subject.run_id,
            "app": subject.app,
            "environment": subject.environment,
            "digest": subject.digest,
            "commit": subject.commit,
            "details": details,
        }
    )


def _record_submission(audit: AuditLog, subject: ApprovalSubject, result: SubmitResult) -> None:
    if result.accepted:
        event = "approval.accepted" if result.verdict is Verdict.APPROVE else "approval.rejected"
        actor = result.approver
    else:
        # The name was typed, not proven: never record it as the actor.
        event, actor = "approval.refused", "unverified"
    audit.append(
        _entry(
            subject,
            event,
            actor,
            claimed_approver=result.approver,
            verdict=result.verdict.value,
            refusal=result.refusal.value if result.refusal else None,
            message=result.message,
            totp_step=result.totp_step,
            state=result.state.value,
        )
    )


def request_approvals(
    context: ApprovalSubject,
    policy: ApprovalPolicy,
    directory: ApproverDirectory,
    audit: AuditLog,
    *,
    replay: ReplayStore | None = None,
    freeze: Callable[[datetime], FreezeStatus] | None = None,
    scan: ScanComparison | None = None,
    poll_interval: int = 10,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    sleep: Callable[[float], None] = time.sleep,
) -> ApprovalOutcome:
    """Pause the flow run until the environment's approval rules are met.

    Args:
        context: what is being approved (see :func:`subject_for_current_run`).
        policy: the environment's approval rules, from deploy-side configuration.
        directory: the approver directory, from deploy-side configuration.
        audit: where every decision is recorded.
        replay: burned-code store; defaults to a file next to the audit log.
        freeze: re-evaluates the change freeze; shown on the form and checked again just
            before the approval is granted (a freeze may have started while waiting).
        scan: scan counts of the candidate and of what runs now, shown on the form.
        poll_interval: seconds between the pause's checks for a resume.
        clock: source of "now".
        sleep: used while the wait timer runs after approvals are complete.

    Returns:
        the granted approval with every accepted approver.

    Raises:
        PolicyRefusal: rejected, timed out, or frozen when it would have been granted.
    """
    logger = get_run_logger()
    subject = context
    store = replay or FileReplayStore(replay_store_path(audit.path))
    ledger = ApprovalLedger(policy, directory, subject, store, opened_at=clock())
    audit.append(
        _entry(
            subject,
            "approval.requested",
            "portcullis",
            author=subject.author,
            triggered_by=subject.triggered_by,
            required_approvals=policy.required_approvals,
            required_groups=list(policy.required_groups),
            deadline=ledger.deadline.isoformat(),
            ready_at=ledger.ready_at.isoformat(),
        )
    )
    notice: str | None = None
    while True:
        now = clock()
        state = ledger.state(now)
        if state is LedgerState.SATISFIED:
            break
        if state is LedgerState.REJECTED:
            reason = ledger.rejection_reason or "rejected"
            audit.append(_entry(subject, "approval.stopped", "portcullis", reason=reason))
            raise PolicyRefusal(
                f"promotion of {subject.app} to {subject.environment} was {reason}",
                hint="fix what the approver objected to and start a new promotion",
            )
        if state is LedgerState.TIMED_OUT:
            _time_out(audit, subject, ledger)
        elif state is not LedgerState.PENDING:
            assert_never(state)

        description = render_approval_request(
            ledger, now, freeze=freeze(now) if freeze else None, scan=scan, notice=notice
        )
        remaining = math.ceil((ledger.deadline - now).total_seconds())
        try:
            answer = pause_flow_run(
                wait_for_input=ApprovalForm.with_initial_data(description=description),
                timeout=max(1, remaining),
                poll_interval=poll_interval,
            )
        except FlowPauseTimeout:
            _time_out(audit, subject, ledger)
        except ValidationError as exc:
            # Resumed without (valid) input, e.g. straight through the API.
            notice = f"the last answer was not a complete form: {exc.errors()[0]['msg']}"
            audit.append(_entry(subject, "approval.refused", "unverified", message=notice))
            continue
        result = ledger.submit(
            ApprovalDecision(
                approver=answer.approver,
                code=answer.code,
                verdict=Verdict(answer.decision),
                digest_prefix=answer.digest_prefix,
                comment=answer.comment,
            ),
            clock(),
        )
        _record_submission(audit, subject, result)
        notice = result.message if result.accepted else f"Refused: {result.message}"
        logger.info("approval submission: %s", notice)

    while not ledger.may_proceed(clock()):
        wait = (ledger.ready_at - clock()).total_seconds()
        logger.info("approved; wait timer runs until %s", ledger.ready_at.isoformat())
        sleep(max(0.05, min(wait, float(poll_interval))))
    if freeze is not None:
        status = freeze(clock())
        if status.frozen:
            audit.append(_entry(subject, "approval.frozen", "portcullis", freeze=status.summary()))
            status.raise_if_frozen()
    granted: AuditRecord = audit.append(
        _entry(
            subject,
            "approval.granted",
            "portcullis",
            approvers=[a.approver for a in ledger.approvals],
        )
    )
    return ApprovalOutcome(
        subject=subject,
        approvals=ledger.approvals,
        granted_at=granted.at,
        audit_seq=granted.seq,
    )


def _time_out(audit: AuditLog, subject: ApprovalSubject, ledger: ApprovalLedger) -> NoReturn:
    audit.append(
        _entry(
            subject,
            "approval.timed_out",
            "portcullis",
            still_needed=ledger.still_needed(),
            deadline=ledger.deadline.isoformat(),
        )
    )
    raise PolicyRefusal(
        f"promotion of {subject.app} to {subject.environment} was not approved by "
        f"{ledger.deadline.isoformat()} (still needed: {ledger.still_needed()})",
        hint="start a new promotion and ask the approvers in time",
    )
