"""The approval gate inside a real Prefect flow run (temporary Prefect server).

Given a flow that asks for prod approval, when another thread resumes the paused run through
the Prefect client, then a bad code is refused and the form offered again with the reason,
and two valid approvers from the two required groups let the flow continue. A rejection and
a timeout stop it. Every decision lands in a verifiable audit chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
)
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import Pause
from prefect.flow_engine import run_flow

from portcullis.approval import ApprovalPolicy, ApproverDirectory, Requester, RequesterProof
from portcullis.audit import AuditLog
from portcullis.freeze import FreezePolicy, FreezeStatus, OneOffWindow, check_freeze
from tasks.approval import request_approvals, subject_for_current_run
from tests.support.approval_driver import Resumer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRETS = {name: pyotp.random_base32() for name in ("alice", "bob", "erin", "trent")}
DIGEST = "sha256:" + "5e" * 32
COMMIT = "d" * 40


@pytest.fixture()
def prefect_server(prefect_harness: None) -> None:
    """The session's temporary Prefect server (see conftest)."""


@pytest.fixture
def approvers_file(tmp_path: Path) -> Path:
    groups = {"alice": "security", "bob": "platform", "erin": "security", "trent": "platform"}
    path = tmp_path / "approvers.toml"
    path.write_text(
        "".join(
            f'[[approver]]\nname = "{name}"\ngroups = ["{groups[name]}"]\n'
            f'aliases = ["{name}@example.com"]\ntotp_secret = "{secret}"\n\n'
            for name, secret in SECRETS.items()
        )
    )
    path.chmod(0o600)
    return path


def freeze_starting_at_call(first_frozen_call: int) -> Callable[[datetime], FreezeStatus]:
    """A freeze check that reports a freeze from its n-th call on (0: never)."""
    calls = [0]

    def check(at: datetime) -> FreezeStatus:
        calls[0] += 1
        frozen = first_frozen_call and calls[0] >= first_frozen_call
        start = at - timedelta(minutes=1) if frozen else at + timedelta(days=1)
        window = OneOffWindow(
            name="incident-freeze",
            reason="major incident",
            tz="UTC",
            start=start,
            end=start + timedelta(hours=2),
        )
        return check_freeze(FreezePolicy(environment="prod", windows=(window,)), at)

    return check


@flow(name="approval-gate-under-test", persist_result=False)
def gate(
    run_name: str, audit_path: str, approvers_path: str, timeout_s: int, frozen_from: int = 0,
    wait_timer_s: int = 1,
) -> list[str]:
    """Ask for prod approval the way the promotion flow does."""
    policy = ApprovalPolicy(
        environment="prod",
        required_approvals=2,
        required_groups=("security", "platform"),
        wait_timer=timedelta(seconds=wait_timer_s),
        timeout=timedelta(seconds=timeout_s),
    )
    subject = subject_for_current_run(
        app="hello",
        environment="prod",
        digest=DIGEST,
        commit=COMMIT,
        author="Erin Example <erin@example.com>",
        requester=Requester(name="trent", proof=RequesterProof.TOTP),
    )
    outcome = request_approvals(
        subject,
        policy,
        ApproverDirectory.load(Path(approvers_path)),
        AuditLog(Path(audit_path)),
        poll_interval=1,
        freeze=freeze_starting_at_call(frozen_from),
    )
    return [a.approver for a in outcome.approvals]


def form(name: str, decision: str = "approve", code: str | None = None) -> dict[str, Any]:
    return {
        "approver": name,
        "code": code if code is not None else pyotp.TOTP(SECRETS[name]).now(),
        "digest_prefix": DIGEST[7:19],
        "decision": decision,
        "comment": f"{decision} from the test",
    }


def wrong_code(name: str) -> str:
    totp = pyotp.TOTP(SECRETS[name])
    now = time.time()
    valid = {totp.at(now + 30 * step) for step in (-2, -1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(10)) if c not in valid)


def run_gate(
    tmp_path: Path, approvers_file: Path, run_name: str, timeout_s: int = 60, frozen_from: int = 0
) -> State[Any]:
    state: State[Any] = gate.with_options(flow_run_name=run_name)(
        run_name,
        str(tmp_path / "audit.jsonl"),
        str(approvers_file),
        timeout_s,
        frozen_from,
        return_state=True,
    )
    return state


def events(tmp_path: Path) -> list[tuple[str, str]]:
    log = AuditLog(tmp_path / "audit.jsonl")
    report = log.verify()
    assert report.ok, report.reason
    return [(r.event, r.actor) for r in log.records()]


def test_bad_code_is_refused_and_two_approvers_let_the_flow_continue(
    prefect_server: None, tmp_path: Path, approvers_file: Path
) -> None:
    resumer = Resumer("gate-happy")
    thread = resumer.play(
        [
            lambda: form("alice", code=wrong_code("alice")),
            lambda: form("alice"),
            lambda: form("erin"),  # the commit author: refused
            lambda: form("bob"),
        ]
    )
    state = run_gate(tmp_path, approvers_file, "gate-happy")
    thread.join(30)
    assert resumer.error is None, resumer.error
    assert state.is_completed(), state.message
    assert state.result() == ["alice", "bob"]
    # The UI shows where the approvals stand as a progress artifact of the run.
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            type=ArtifactFilterType(any_=["progress"])))
    (bar,) = found
    assert bar.key == "approvals-hello-prod" and bar.data == 100.0
    assert bar.description is not None and "2/2 approved by alice, bob" in bar.description

    first, second, third, fourth = resumer.descriptions
    assert "Approve hello → prod?" in first and DIGEST in first and COMMIT in first
    assert "no change freeze for prod" in first
    assert "Refused" in second and "wrong or expired" in second
    assert "alice" in third and "1 more approval" in third
    assert "wrote commit" in fourth
    assert events(tmp_path) == [
        ("approval.requested", "portcullis"),
        ("approval.refused", "unverified"),
        ("approval.accepted", "alice"),
        ("approval.refused", "unverified"),
        ("approval.accepted", "bob"),
        ("approval.granted", "portcullis"),
    ]


def test_a_rejection_fails_the_flow(
    prefect_server: None, tmp_path: Path, approvers_file: Path
) -> None:
    resumer = Resumer("gate-rejected")
    thread = resumer.play([lambda: form("bob", decision="reject")])
    state = run_gate(tmp_path, approvers_file, "gate-rejected")
    thread.join(30)
    assert resumer.error is None, resumer.error
    assert state.is_failed()
    assert "rejected by bob" in (state.message or "")
    assert [e for e, _ in events(tmp_path)] == [
        "approval.requested",
        "approval.rejected",
        "approval.stopped",
    ]


def test_a_freeze_that_starts_while_waiting_blocks_the_grant(
    prefect_server: None, tmp_path: Path, approvers_file: Path
) -> None:
    resumer = Resumer("gate-frozen")
    thread = resumer.play([lambda: form("alice"), lambda: form("bob")])
    # Calls 1 and 2 render the two forms; call 3 is the check just before granting.
    state = run_gate(tmp_path, approvers_file, "gate-frozen", frozen_from=3)
    thread.join(30)
    assert resumer.error is None, resumer.error
    assert state.is_failed()
    assert "incident-freeze" in (state.message or "")
    assert [e for e, _ in events(tmp_path)] == [
        "approval.requested",
        "approval.accepted",
        "approval.accepted",
        "approval.frozen",
    ]


def test_nobody_answers_and_the_promotion_times_out(
    prefect_server: None, tmp_path: Path, approvers_file: Path
) -> None:
    started = time.monotonic()
    state = run_gate(tmp_path, approvers_file, "gate-timeout", timeout_s=3)
    # Once a pause has expired the server fails the run with its own message ("... never
    # resumed"); our reason is in the audit record and the run's log.
    assert state.is_failed()
    assert time.monotonic() - started < 30
    assert [e for e, _ in events(tmp_path)] == ["approval.requested", "approval.timed_out"]


def test_a_deployment_run_waits_without_a_process_through_approvals_and_its_wait_timer(
    prefect_server: None, tmp_path: Path, approvers_file: Path
) -> None:
    """As on a worker: each wait ends the process (Suspended for people, Scheduled for the wait
    timer) and each answer, or the timer's end, runs the engine again from the top."""
    with get_client(sync_client=True) as client:
        deployment = client.create_deployment(flow_id=client.create_flow(gate), name="timed")
        run = client.create_flow_run_from_deployment(deployment, name="gate-timed", parameters={
            "run_name": "gate-timed", "audit_path": str(tmp_path / "audit.jsonl"),
            "approvers_path": str(approvers_file), "timeout_s": 300, "wait_timer_s": 20})

        def until_it_waits() -> FlowRun:
            with pytest.raises(Pause):
                run_flow(gate, flow_run=client.read_flow_run(run.id))
            return client.read_flow_run(run.id)

        for name in ("alice", "bob"):
            assert until_it_waits().state_name == "Suspended"
            answered = client.resume_flow_run(run.id, run_input=form(name))
            assert answered.status.value == "ACCEPT", answered.details
        timed = until_it_waits()
        assert timed.state is not None and timed.state_name == "Wait timer"
        assert timed.state_type is not None and timed.state_type.value == "SCHEDULED"
        # The timer counts from the run's start, as the ledger's deadline does.
        ready_at = timed.start_time + timedelta(seconds=20) if timed.start_time else None
        assert ready_at is not None and timed.state.state_details.scheduled_time == ready_at
        # Started before then (as an insider could), the run only moves itself back to its
        # timer; from then on it completes.
        deadline = ready_at + timedelta(seconds=120)
        while True:
            try:
                approvers = run_flow(gate, flow_run=client.read_flow_run(run.id))
                break
            except Pause:
                again = client.read_flow_run(run.id)
                assert again.state is not None and again.state_name == "Wait timer"
                assert again.state.state_details.scheduled_time == ready_at
                assert datetime.now(UTC) < deadline, "the run never got past its wait timer"
    assert approvers == ["alice", "bob"]
    records = AuditLog(tmp_path / "audit.jsonl").records()
    granted = [r for r in records if r.event == "approval.granted"]
    assert len(granted) == 1 and granted[0].at >= ready_at
    assert [r.event for r in records].count("approval.accepted") == 2
