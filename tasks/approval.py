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
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal, NoReturn, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, Pause
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from prefect.input.run_input import keyset_from_base_key
from prefect.states import Scheduled
from prefect.utilities.engine import propose_state_sync
from pydantic import Field, ValidationError

from portcullis.approval import (
    SCHEDULER,
    AcceptedDecision,
    ApprovalDecision,
    ApprovalLedger,
    ApprovalOutcome,
    ApprovalPolicy,
    ApprovalSubject,
    ApproverDirectory,
    LedgerState,
    Refusal,
    ReplayStore,
    Requester,
    RequesterProof,
    SubmitResult,
    Verdict,
    md_text,
    render_approval_request,
    verify_requester,
)
from portcullis.audit import AuditEntry, AuditRecord, AuditTrail
from portcullis.change import WhatChanged
from portcullis.errors import PolicyRefusal
from portcullis.freeze import FreezeStatus
from portcullis.state import replay_store_for
from tasks.progress import StageProgress


class _DecisionForm(RunInput):
    """What every human decision carries. Everything typed here is unverified until the ledger
    checks it."""

    approver: str = Field(description="Your approver id, e.g. alice")
    code: str = Field(description="The current 6-digit code from your authenticator app")
    digest_prefix: str = Field(
        description="The first hex characters of the image digest, to confirm what you decide"
    )
    comment: str = Field(default="", description="Optional: why (kept in the audit log)")

    def _decision(self, verdict: Verdict) -> ApprovalDecision:
        return ApprovalDecision(approver=self.approver, code=self.code, verdict=verdict,
                                digest_prefix=self.digest_prefix, comment=self.comment)


class ApprovalForm(_DecisionForm):
    """The approval form: approve, or reject to stop the promotion."""

    decision: Literal["approve", "reject"] = Field(
        description="approve, or reject to stop this promotion"
    )

    def decision_for_ledger(self) -> ApprovalDecision:
        """The unverified decision the ledger checks."""
        return self._decision(Verdict(self.decision))


class CanaryDecisionForm(_DecisionForm):
    """A person's decision on an Inconclusive canary, verified like an approval."""

    decision: Literal["promote", "rollback"] = Field(
        description="promote the canary to all traffic, or roll back to stable"
    )

    def decision_for_ledger(self) -> ApprovalDecision:
        """promote counts as an approval, rollback as a rejection."""
        return self._decision(Verdict.APPROVE if self.decision == "promote" else Verdict.REJECT)


def _current_run() -> FlowRun:
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("this must be called inside a flow run")
    with get_client(sync_client=True) as client:
        return client.read_flow_run(context.flow_run.id)


def requester_for_current_run(
    requested_by: str, requester_code: str, *, directory: ApproverDirectory | None,
    replay: ReplayStore | None, must_verify: bool,
) -> Requester:
    """Who started this run, established from what the caller cannot forge.

    A run the Prefect server's scheduler created (``auto_scheduled``, which no API client can
    set) is the scheduler's, whatever ``requested_by`` says. Any other run was started by a
    person, who proves it with the code that was current when the server created the run; where ``must_verify`` (a person must
    approve) an unproven name is refused, elsewhere it is recorded as unverified.

    Raises:
        PolicyRefusal: the proof is missing, wrong, or replayed where it is required.
    """
    run = _current_run()
    if run.auto_scheduled:
        return Requester(name=SCHEDULER, proof=RequesterProof.SCHEDULE)
    if requester_code.strip():
        if directory is None or replay is None:
            raise PolicyRefusal("a requester code was given but this side has no identity directory")
        # The code must have been current when the server created the run (a time the caller
        # cannot set), however long the run then waited for a worker.
        return verify_requester(directory, requested_by, requester_code,
                                run.created or datetime.now(UTC), replay)
    if must_verify:
        raise PolicyRefusal(
            f"a promotion that people must approve needs a verified requester: {requested_by!r} "
            "gave no requester code",
            hint="pass requested_by=<your directory id> and requester_code=<your current code>",
        )
    return Requester(name=requested_by, proof=RequesterProof.UNVERIFIED)


def subject_for_current_run(
    *, app: str, environment: str, digest: str, commit: str, author: str, requester: Requester,
    change_authors: tuple[str, ...] = (),
) -> ApprovalSubject:
    """Build the approval subject from what the Prefect server recorded for this run.

    The run id and start time come from the server, not from flow parameters, so a
    parameter cannot shorten the wait timer. The requester is the verified one (see
    :func:`requester_for_current_run`); an unverified name still excludes that name.

    Args:
        app: application name.
        environment: target environment.
        digest: the image digest being promoted.
        commit: the source commit it was built from.
        author: the commit author, ``Name <email>``.
        requester: who started the run.
        change_authors: every author and committer of the commits in the change.

    Returns:
        the subject for :func:`request_approvals`.
    """
    run = _current_run()
    return ApprovalSubject(
        run_id=str(run.id),
        app=app,
        environment=environment,
        digest=digest,
        commit=commit,
        author=author,
        change_authors=change_authors,
        triggered_by=requester.name,
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


def _record_submission(audit: AuditTrail, subject: ApprovalSubject, result: SubmitResult,
                       ledger_key: str, submission: int) -> None:
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
            ledger=ledger_key,
            submission=submission,
            decision=result.decision.model_dump(mode="json") if result.decision else None,
        )
    )


_SUBMISSION_EVENTS = ("approval.accepted", "approval.rejected", "approval.refused")


def _restore(ledger: ApprovalLedger, audit: AuditTrail, ledger_key: str) -> int:
    """Re-apply the submissions an earlier process of this run judged; returns how many."""
    count = 0
    for record in audit.run_records(ledger.subject.run_id):
        if record.event not in _SUBMISSION_EVENTS or record.details.get("ledger") != ledger_key:
            continue
        raw = record.details.get("decision")
        refusal = record.details.get("refusal")
        ledger.restore(
            AcceptedDecision.model_validate(raw) if isinstance(raw, dict) else None,
            Refusal(refusal) if isinstance(refusal, str) else None,
            str(record.details.get("claimed_approver", "")),
        )
        count = max(count, int(str(record.details.get("submission", 0))) + 1)
    return count


def _opened_at(audit: AuditTrail, subject: ApprovalSubject, event: str, ledger_key: str) -> datetime | None:
    for record in audit.run_records(subject.run_id):
        if record.event == event and record.details.get("ledger") == ledger_key:
            return record.at
    return None


def _answered_at(run_id: str, state_name: str, key: str) -> datetime | None:
    """When the server stored the answer to the wait with ``key`` (its own timestamp)."""
    response_key = keyset_from_base_key(f"{state_name.lower()}-{key}")["response"]
    with get_client(sync_client=True) as client:
        found = client.filter_flow_run_input(UUID(run_id), key_prefix=response_key, limit=1,
                                             exclude_keys=set())
    return found[0].created if found else None


def waits_durably() -> bool:
    """Whether this flow run can wait for people without a process.

    A run of a deployment can: Prefect suspends it and a worker runs it again from the top
    when it is resumed. A run without one (the local stack's in-process flow) can only pause
    and keep its process.
    """
    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


Render = Callable[[ApprovalLedger, datetime, str | None], str]


def _collect(
    ledger: ApprovalLedger,
    audit: AuditTrail,
    *,
    form: type[ApprovalForm | CanaryDecisionForm],
    render: Render,
    poll_interval: int,
    clock: Callable[[], datetime],
    ledger_key: str,
    durable: bool,
    progress: Callable[[ApprovalLedger], None] | None = None,
) -> LedgerState:
    """Offer ``form`` until the ledger is satisfied, rejected or timed out; every answer is
    verified by the ledger and recorded. Returns the final state (never PENDING).

    ``durable``: wait with ``suspend_flow_run`` (no process while waiting; each submission
    has its own key, so an answer given while nothing ran is returned when the run comes
    back), after restoring what earlier processes of this run already judged. Otherwise
    ``pause_flow_run`` keeps this process polling.
    """
    logger = get_run_logger()
    subject = ledger.subject
    notice: str | None = None
    submission = _restore(ledger, audit, ledger_key) if durable else 0
    while True:
        now = clock()
        state = ledger.state(now)
        if progress is not None:
            progress(ledger)
        if state is not LedgerState.PENDING:
            return state
        remaining = max(1, math.ceil((ledger.deadline - now).total_seconds()))
        prompt = form.with_initial_data(description=render(ledger, now, notice))
        key = f"{ledger_key}-{submission}"
        try:
            if durable:
                with termination_deferred():
                    answer = suspend_flow_run(wait_for_input=prompt, timeout=remaining, key=key)
            else:
                answer = pause_flow_run(wait_for_input=prompt, timeout=remaining,
                                        poll_interval=poll_interval, key=key)
        except FlowPauseTimeout:
            continue  # the ledger's deadline has passed: the next turn reports TIMED_OUT
        except ValidationError as exc:
            # Resumed without (valid) input, e.g. straight through the API.
            notice = f"the last answer was not a complete form: {exc.errors()[0]['msg']}"
            audit.append(_entry(subject, "approval.refused", "unverified", message=notice,
                                ledger=ledger_key, submission=submission, refusal=None))
            submission += 1
            continue
        # A code is checked against the moment the server received the answer: a resumed run
        # may only get to it after a worker picked the run up again.
        answered = _answered_at(subject.run_id, "Suspended" if durable else "Paused", key)
        result = ledger.submit(answer.decision_for_ledger(), answered or clock())
        _record_submission(audit, subject, result, ledger_key, submission)
        submission += 1
        notice = result.message if result.accepted else f"Refused: {result.message}"
        logger.info("decision submitted: %s", notice)


def _open_ledger(policy: ApprovalPolicy, directory: ApproverDirectory, subject: ApprovalSubject,
                 store: ReplayStore, audit: AuditTrail, event: str, ledger_key: str, durable: bool,
                 clock: Callable[[], datetime], **details: object) -> ApprovalLedger:
    """The ledger for this request: opened once per run (its deadline counts from then)."""
    earlier = _opened_at(audit, subject, event, ledger_key) if durable else None
    ledger = ApprovalLedger(policy, directory, subject, store, opened_at=earlier or clock())
    if earlier is None:
        _record_request(audit, ledger, event, ledger_key=ledger_key, **details)
    return ledger


@contextmanager
def termination_deferred() -> Iterator[None]:
    """Hold off SIGTERM while the run suspends, so a stop cannot crash a run that waits.

    ``suspend_flow_run`` moves the run to Suspended, then saves the form and raises ``Pause``.
    A SIGTERM in between (a worker or host being stopped) would make Prefect's engine force the
    run to Crashed: the wait, and every answer still to come, would be lost. Inside this block a
    SIGTERM is only noted. If the run suspended (``Pause``) the process is about to exit anyway
    and the note is dropped; the handler stays deferring until the engine's own signal scope
    ends. If the call returned (the run had been resumed already) the noted signal is delivered
    as if it had just arrived. Outside the main thread (no signal handlers there) a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: noted.append(signum))
    suspended = False
    try:
        yield
    except Pause:
        suspended = True
        raise
    finally:
        if not suspended:
            signal.signal(signal.SIGTERM, previous)
            if noted:
                os.kill(os.getpid(), signal.SIGTERM)


def wait_timer_without_process(until: datetime) -> NoReturn:
    """End this process and have the run started again at ``until`` (the wait timer).

    The run moves itself to Scheduled at ``until``; a worker picks it up then, and the run
    comes back through the same restore path as a resumed approval (the ledger, satisfied,
    is rebuilt from the run's records; the freeze and the evidence are checked again).
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("only a flow run can wait for its wait timer without a process")
    with termination_deferred(), get_client(sync_client=True) as client:
        state = propose_state_sync(client, Scheduled(scheduled_time=until, name="Wait timer"),
                                   flow_run_id=context.flow_run.id)
        if not state.is_scheduled():
            raise RuntimeError(f"the run could not wait for its wait timer: the server answered {state}")
        raise Pause(state=state)


def request_approvals(
    context: ApprovalSubject,
    policy: ApprovalPolicy,
    directory: ApproverDirectory,
    audit: AuditTrail,
    *,
    replay: ReplayStore | None = None,
    freeze: Callable[[datetime], FreezeStatus] | None = None,
    change: WhatChanged | None = None,
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
        replay: burned-code store; defaults to the one that goes with ``audit``.
        freeze: re-evaluates the change freeze; shown on the form and checked again just
            before the approval is granted (a freeze may have started while waiting).
        change: what changed since the running version (commits, base image, scan
            findings), shown on the form.
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
    store = replay or replay_store_for(audit)
    durable = waits_durably()
    ledger = _open_ledger(policy, directory, subject, store, audit, "approval.requested",
                          "approval", durable, clock)

    def render(ledger: ApprovalLedger, now: datetime, notice: str | None) -> str:
        return render_approval_request(
            ledger, now, freeze=freeze(now) if freeze else None, change=change, notice=notice)

    bar = StageProgress(f"approvals-{subject.app}-{subject.environment}",
                        f"approvals for {subject.app} {subject.digest[:19]} in {subject.environment}",
                        policy.required_approvals)

    def progress(ledger: ApprovalLedger) -> None:
        approvers = ", ".join(a.approver for a in ledger.approvals) or "nobody yet"
        bar.at(len(ledger.approvals), f"approved by {approvers}; still needed: "
               f"{ledger.still_needed()}; answer by {ledger.deadline:%Y-%m-%d %H:%M} UTC")

    state = _collect(ledger, audit, form=ApprovalForm, render=render,
                     poll_interval=poll_interval, clock=clock, ledger_key="approval",
                     durable=durable, progress=progress)
    if state is LedgerState.REJECTED:
        reason = ledger.rejection_reason or "rejected"
        audit.append(_entry(subject, "approval.stopped", "portcullis", reason=reason))
        raise PolicyRefusal(
            f"promotion of {subject.app} to {subject.environment} was {reason}",
            hint="fix what the approver objected to and start a new promotion",
        )
    if state is LedgerState.TIMED_OUT:
        _time_out(audit, subject, ledger)

    if durable and not ledger.may_proceed(clock()):
        logger.info("approved; wait timer runs until %s (no process waits for it)",
                    ledger.ready_at.isoformat())
        wait_timer_without_process(ledger.ready_at)
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


def _record_request(audit: AuditTrail, ledger: ApprovalLedger, event: str, *, ledger_key: str,
                    **details: object) -> None:
    subject, policy = ledger.subject, ledger.policy
    audit.append(
        _entry(
            subject,
            event,
            "portcullis",
            author=subject.author,
            change_authors=list(subject.change_authors),
            triggered_by=subject.triggered_by,
            required_approvals=policy.required_approvals,
            required_groups=list(policy.required_groups),
            deadline=ledger.deadline.isoformat(),
            ready_at=ledger.ready_at.isoformat(),
            ledger=ledger_key,
            **details,
        )
    )


def canary_decision_policy(environment: str, approval: ApprovalPolicy | None,
                           timeout: timedelta) -> ApprovalPolicy:
    """The rule for deciding an Inconclusive canary: one verified, eligible person who is not
    an author of the change nor the requester (the approval rule's groups, if it has one)."""
    groups: tuple[str, ...] = ()
    if approval is not None:
        groups = tuple(dict.fromkeys((*approval.eligible_groups, *approval.required_groups)))
    return ApprovalPolicy(environment=environment, required_approvals=1, eligible_groups=groups,
                          timeout=timeout)


def decide_inconclusive_canary(
    subject: ApprovalSubject,
    policy: ApprovalPolicy,
    directory: ApproverDirectory,
    audit: AuditTrail,
    analysis: str,
    *,
    replay: ReplayStore | None = None,
    poll_interval: int = 10,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[Literal["promote", "rollback"], str]:
    """Ask a person to decide an Inconclusive canary, through the same ledger as approvals.

    ``promote`` counts as an approval and ``rollback`` as a rejection, so the same rules hold:
    verified identity, eligibility, authors and requester excluded, lockout after wrong
    codes, codes burned, the digest confirmed. No decision before the deadline, or a verified
    rollback, means rollback: an undecided canary never becomes stable.

    Returns:
        the decision and who made it ("timeout" when nobody did).
    """
    store = replay or replay_store_for(audit)
    # Waiting without a process (a suspended run), the canary was removed before asking (see
    # tasks/canary.py rollout_with_person); otherwise it is held at no traffic meanwhile.
    durable = waits_durably()
    if durable:
        for record in audit.run_records(subject.run_id):
            if record.event == "canary.decision":  # decided before this run came back
                return cast(Literal["promote", "rollback"], record.details["decision"]), record.actor
    ledger = _open_ledger(policy, directory, subject, store, audit, "canary.decision-requested",
                          "canary", durable, clock, analysis=analysis)

    def render(ledger: ApprovalLedger, now: datetime, notice: str | None) -> str:
        return (f"## The canary is Inconclusive\n\n{md_text(analysis, 2000)}\n\n"
                "Answer **promote** to give the new version all traffic or **rollback** to keep "
                "the stable version.\n\n"
                + render_approval_request(ledger, now, notice=notice))

    state = _collect(ledger, audit, form=CanaryDecisionForm, render=render,
                     poll_interval=poll_interval, clock=clock, ledger_key="canary",
                     durable=durable)
    if state is LedgerState.SATISFIED:
        who = ledger.approvals[0].approver
        audit.append(_entry(subject, "canary.decision", who, decision="promote"))
        return "promote", who
    if ledger.rejection is not None:
        who = ledger.rejection.approver
        audit.append(_entry(subject, "canary.decision", who, decision="rollback",
                            comment=ledger.rejection.comment))
        return "rollback", who
    audit.append(_entry(subject, "canary.decision-timeout", "portcullis",
                        reason=ledger.rejection_reason or "no decision in time"))
    return "rollback", "timeout"


def _time_out(audit: AuditTrail, subject: ApprovalSubject, ledger: ApprovalLedger) -> NoReturn:
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
