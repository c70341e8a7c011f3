"""The trust-boundary rules as plain Python: no engine, no server.

Given the deploy side's directory and stores, when someone claims to be a requester, writes a
commit deep in a change, or brings an emergency ticket, then only what they cannot forge counts:
a verified code, the commit history, the ticket as the incident system states it, used once.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyotp
import pytest
from pydantic import SecretStr

from infra.change_calendar import ensure_calendar, freezes_at, stop_calendar
from infra.prometheus import free_tcp_port
from portcullis.approval import (
    ApprovalDecision,
    ApprovalLedger,
    ApprovalPolicy,
    ApprovalSubject,
    Approver,
    ApproverDirectory,
    MemoryReplayStore,
    Refusal,
    RequesterProof,
    Verdict,
    verify_requester,
)
from portcullis.change import change_between, local_repository
from portcullis.errors import PolicyRefusal
from portcullis.freeze import ChangeCalendar, evaluate_freeze
from portcullis.incidents import Incident, IncidentState, check_emergency_ticket
from portcullis.policy import load_policy
from portcullis.state import open_state_url

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRETS = {n: pyotp.random_base32() for n in ("trent", "olga", "bob")}
DIRECTORY = ApproverDirectory(approvers=(
    Approver(name="trent", groups=("developers",), totp_secret=SecretStr(SECRETS["trent"])),
    Approver(name="olga", groups=("on-call",), totp_secret=SecretStr(SECRETS["olga"])),
    Approver(name="bob", groups=("on-call",), aliases=("bob@example.com", "Robert Bee"),
             totp_secret=SecretStr(SECRETS["bob"])),
))
DIGEST = "sha256:" + "ab" * 32
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _code(name: str, at: datetime = NOW) -> str:
    return pyotp.TOTP(SECRETS[name]).at(at)


# --- the requester ------------------------------------------------------------------------------


def test_a_requester_proves_who_they_are_and_the_code_is_burned() -> None:
    replay = MemoryReplayStore()
    requester = verify_requester(DIRECTORY, "Trent", _code("trent"), NOW, replay)
    assert requester.name == "trent" and requester.proof is RequesterProof.TOTP
    with pytest.raises(PolicyRefusal, match="already used"):
        verify_requester(DIRECTORY, "trent", _code("trent"), NOW, replay)


@pytest.mark.parametrize(("claimed", "code_of", "message"), [
    ("olga", "trent", "requester code for olga is wrong"),  # names someone else
    ("mallory", "trent", "not an enrolled identity"),
])
def test_a_requester_cannot_claim_another_identity(claimed: str, code_of: str, message: str) -> None:
    with pytest.raises(PolicyRefusal, match=message):
        verify_requester(DIRECTORY, claimed, _code(code_of), NOW, MemoryReplayStore())


def _ledger(requester: str, change_authors: tuple[str, ...] = ()) -> ApprovalLedger:
    subject = ApprovalSubject(
        run_id="run-1", app="hello", environment="prod", digest=DIGEST, commit="c" * 40,
        author="Ada Author <ada@example.com>", change_authors=change_authors,
        triggered_by=requester, triggered_at=NOW,
    )
    policy = ApprovalPolicy(environment="prod", required_approvals=1, eligible_groups=("on-call",))
    return ApprovalLedger(policy, DIRECTORY, subject, MemoryReplayStore(), opened_at=NOW)


def _approve(ledger: ApprovalLedger, name: str) -> Refusal | None:
    result = ledger.submit(ApprovalDecision(approver=name, code=_code(name), verdict=Verdict.APPROVE,
                                            digest_prefix=DIGEST[7:19]), NOW)
    return result.refusal


def test_the_verified_requester_can_never_approve_so_two_people_are_needed() -> None:
    # The emergency rule needs one on-call approver; olga asked, so olga cannot be it.
    ledger = _ledger("olga")
    assert _approve(ledger, "olga") is Refusal.SELF_APPROVAL
    assert _approve(ledger, "bob") is None and ledger.is_satisfied


# --- authors of the change ----------------------------------------------------------------------


def _git(repo: Path, *args: str, author: tuple[str, str] = ("Ada Author", "ada@example.com")) -> str:
    env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1],
           "GIT_COMMITTER_NAME": author[0], "GIT_COMMITTER_EMAIL": author[1],
           "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def _commit(repo: Path, name: str, author: tuple[str, str]) -> str:
    (repo / name).write_text(name)
    _git(repo, "add", "-A", author=author)
    _git(repo, "commit", "-q", "-m", name, author=author)
    return _git(repo, "rev-parse", "HEAD")


def test_every_author_of_the_change_is_listed_and_none_may_approve(tmp_path: Path) -> None:
    repo = tmp_path / "src"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    running = _commit(repo, "v1", ("Carol", "carol@example.com"))
    _commit(repo, "fix", ("Robert Bee", "robert@home.example"))  # bob, under another email
    head = _commit(repo, "v2", ("Ada Author", "ada@example.com"))

    path = local_repository(f"file://{repo}", tmp_path / "cache")
    change = change_between(path, head, running)
    assert change.commits == 2
    assert "Robert Bee <robert@home.example>" in change.authors
    assert "Carol <carol@example.com>" not in change.authors  # already running: not the change
    # Nothing running yet: the whole history is the change.
    assert "Carol <carol@example.com>" in change_between(path, head, None).authors

    ledger = _ledger("trent", change.authors)
    assert _approve(ledger, "bob") is Refusal.SELF_APPROVAL  # matched through his name alias
    assert _approve(ledger, "olga") is None


def test_a_change_whose_source_cannot_be_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyRefusal, match="not readable on the deploy side"):
        local_repository(f"file://{tmp_path / 'gone'}", tmp_path / "cache")


# --- emergency tickets --------------------------------------------------------------------------


def _incident(opened_at: datetime, state: IncidentState = IncidentState.IN_PROGRESS) -> Incident:
    return Incident(number="INC0010001", state=state, state_label=state.value, priority=1,
                    priority_label="1 - Critical", services=("hello",), opened_at=opened_at)


def test_a_ticket_opened_in_the_future_or_too_long_ago_is_refused() -> None:
    check_emergency_ticket(_incident(NOW - timedelta(hours=1)), "hello", NOW)
    with pytest.raises(PolicyRefusal, match="in the future"):
        check_emergency_ticket(_incident(NOW + timedelta(hours=2)), "hello", NOW)
    with pytest.raises(PolicyRefusal, match="younger than 3.0 days"):
        check_emergency_ticket(_incident(NOW - timedelta(days=4)), "hello", NOW,
                               max_age=load_policy("prod", REPO_ROOT / "policies").emergency_ticket_max_age)
    with pytest.raises(PolicyRefusal, match="only an open incident"):
        check_emergency_ticket(_incident(NOW, IncidentState.CLOSED), "hello", NOW)


def test_a_ticket_opens_one_emergency_promotion_unless_a_person_reauthorises_it(tmp_path: Path) -> None:
    store = open_state_url(f"sqlite:///{tmp_path / 'state.db'}").tickets
    store.claim("inc0010001", "run-1")
    assert store.claim("INC0010001", "run-1").runs == ("run-1",)  # a retried run keeps its claim
    with pytest.raises(PolicyRefusal, match="already served emergency promotion"):
        store.claim("INC0010001", "run-2")
    store.reauthorise("INC0010001", "olga", "second hotfix for the same outage", NOW)
    assert store.claim("INC0010001", "run-2").runs == ("run-1", "run-2")
    with pytest.raises(PolicyRefusal, match="already served"):
        store.claim("INC0010001", "run-3")


# --- prod's change calendar ---------------------------------------------------------------------


def test_prod_fails_closed_without_its_calendar_and_honours_it_when_it_answers(tmp_path: Path) -> None:
    policy = load_policy("prod", REPO_ROOT / "policies")
    assert policy.freeze.calendar.value == "fail-closed"
    monday = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)  # outside prod's own windows
    # No calendar configured, or one that does not answer: frozen.
    assert evaluate_freeze(policy.freeze, monday, None).frozen
    closed_port = free_tcp_port()
    down = ChangeCalendar(f"http://127.0.0.1:{closed_port}/api", SecretStr("x"), timeout=1)
    assert evaluate_freeze(policy.freeze, monday, down).frozen

    state = tmp_path / "calendar"
    url, token = ensure_calendar(state, free_tcp_port())
    try:
        calendar = ChangeCalendar(url, SecretStr(token))
        assert not evaluate_freeze(policy.freeze, monday, calendar).frozen
        assert httpx.get(f"{url}/v1/freezes", params={"environment": "prod", "at": monday.isoformat()},
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        (state / "freezes.json").write_text(
            '[{"environment": "prod", "name": "black-friday", "reason": "peak trading",'
            ' "starts_at": "2026-11-27T00:00:00+00:00", "ends_at": "2026-12-01T00:00:00+00:00"}]')
        status = evaluate_freeze(policy.freeze, monday, calendar)
        assert status.frozen and "black-friday" in status.summary()
    finally:
        stop_calendar(state)


def test_calendar_entries_are_in_force_only_inside_their_window() -> None:
    entries = [{"environment": "prod", "name": "f", "reason": "r",
                "starts_at": "2026-11-01T00:00:00+00:00", "ends_at": "2026-11-02T00:00:00+00:00"}]
    inside = datetime(2026, 11, 1, 12, tzinfo=UTC)
    assert [f["name"] for f in freezes_at(entries, "prod", inside)] == ["f"]
    assert freezes_at(entries, "staging", inside) == []
    assert freezes_at(entries, "prod", inside + timedelta(days=1)) == []


def test_codes_of_the_next_step_are_accepted_once() -> None:
    # The ledger's window (±1 step) is what lets a person act twice within 30 s.
    replay = MemoryReplayStore()
    later = NOW + timedelta(seconds=30)
    verify_requester(DIRECTORY, "trent", _code("trent"), NOW, replay)
    assert verify_requester(DIRECTORY, "trent", _code("trent", later), NOW, replay).totp_step
