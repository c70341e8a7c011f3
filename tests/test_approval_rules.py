"""Every approval rule, exercised on the pure ledger with real TOTP codes."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from pydantic import ValidationError

from portcullis.approval import (
    ApprovalDecision,
    ApprovalLedger,
    ApprovalPolicy,
    ApprovalSettings,
    ApprovalSubject,
    Approver,
    ApproverDirectory,
    FileReplayStore,
    LedgerState,
    MemoryReplayStore,
    Refusal,
    ReplayStore,
    Verdict,
    render_approval_request,
)
from portcullis.change import Change, ChangeCommit, WhatChanged
from portcullis.errors import ConfigurationError
from portcullis.freeze import FreezePolicy, OneOffWindow, check_freeze
from portcullis.scan import Finding, Severity

SECRETS = {
    name: pyotp.random_base32() for name in ("alice", "bob", "carol", "dave", "erin", "trent")
}
DIGEST = "sha256:" + "3f9a7c" + "0" * 58
COMMIT = "c0ffee" + "1" * 34
T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)  # the run was triggered
OPENED = T0 + timedelta(minutes=1)  # approval was requested


def approver(name: str, groups: tuple[str, ...], *aliases: str) -> Approver:
    return Approver.model_validate(
        {"name": name, "groups": groups, "aliases": aliases, "totp_secret": SECRETS[name]}
    )


DIRECTORY = ApproverDirectory(
    approvers=(
        approver("alice", ("security",), "alice@example.com", "Alice Adams"),
        approver("bob", ("platform",), "bob@example.com"),
        approver("carol", ("security", "platform"), "carol@example.com"),
        approver("dave", ("developers",), "dave@example.com"),
        approver("erin", ("security",), "erin@example.com"),
        approver("trent", ("platform",), "trent@example.com"),
    )
)

PROD = ApprovalPolicy(
    environment="prod",
    required_approvals=2,
    required_groups=("security", "platform"),
    wait_timer=timedelta(minutes=10),
    timeout=timedelta(hours=1),
)

SUBJECT = ApprovalSubject(
    run_id="4c1e6a2e-0000-4000-8000-000000000001",
    app="hello",
    environment="prod",
    digest=DIGEST,
    commit=COMMIT,
    author="Erin Example <ERIN@example.com>",
    triggered_by="trent",
    triggered_at=T0,
)


def code(name: str, at: datetime, steps_back: int = 0) -> str:
    return pyotp.TOTP(SECRETS[name]).at(at - timedelta(seconds=30 * steps_back))


def decision(
    name: str, at: datetime, verdict: Verdict = Verdict.APPROVE, **over: str
) -> ApprovalDecision:
    fields = {
        "approver": name,
        "code": code(name, at),
        "verdict": verdict,
        "digest_prefix": DIGEST[7:19],
    } | over
    return ApprovalDecision.model_validate(fields)


def ledger(
    policy: ApprovalPolicy = PROD,
    replay: ReplayStore | None = None,
    subject: ApprovalSubject = SUBJECT,
) -> ApprovalLedger:
    return ApprovalLedger(policy, DIRECTORY, subject, replay or MemoryReplayStore(), OPENED)


def at(minutes: float) -> datetime:
    return OPENED + timedelta(minutes=minutes)


# --- the happy path and the counting rules ---------------------------------------------------


def test_two_distinct_approvers_from_the_required_groups_satisfy_after_the_wait_timer() -> None:
    book = ledger()
    first = book.submit(decision("alice", at(1)), at(1))
    assert first.accepted and first.state is LedgerState.PENDING
    assert "platform" in book.still_needed()
    second = book.submit(decision("bob", at(2)), at(2))
    assert second.accepted and second.state is LedgerState.SATISFIED
    assert book.is_satisfied
    assert [a.approver for a in book.approvals] == ["alice", "bob"]
    # Triggered at T0 with a 10-minute wait timer: not before T0 + 10 min.
    assert book.ready_at == T0 + timedelta(minutes=10)
    assert not book.may_proceed(T0 + timedelta(minutes=9, seconds=59))
    assert book.may_proceed(T0 + timedelta(minutes=10))


def test_the_same_person_cannot_count_twice() -> None:
    book = ledger(PROD.model_copy(update={"required_groups": ()}))
    assert book.submit(decision("alice", at(1)), at(1)).accepted
    again = book.submit(decision("alice", at(3)), at(3))  # a fresh, valid code
    assert not again.accepted
    assert again.refusal is Refusal.DUPLICATE_APPROVER
    assert len(book.approvals) == 1
    assert not book.is_satisfied


def test_two_approvers_from_one_group_leave_the_other_group_missing() -> None:
    book2 = ledger(subject=SUBJECT.model_copy(update={"author": "Somebody <s@example.com>"}))
    assert book2.submit(decision("alice", at(1)), at(1)).accepted
    assert book2.submit(decision("erin", at(1)), at(1)).accepted
    assert not book2.is_satisfied
    assert book2.missing_groups() == ("platform",)
    assert book2.submit(decision("bob", at(2)), at(2)).state is LedgerState.SATISFIED


def test_one_person_in_two_groups_covers_only_one_of_them() -> None:
    solo = PROD.model_copy(update={"required_approvals": 1})
    book = ledger(solo)
    assert book.submit(decision("carol", at(1)), at(1)).accepted
    assert not book.is_satisfied  # carol cannot be both the security and the platform approver
    # Matching: carol takes platform once alice covers security.
    assert book.submit(decision("alice", at(1)), at(1)).state is LedgerState.SATISFIED


# --- who may not approve ---------------------------------------------------------------------


def test_commit_author_cannot_approve_even_under_another_spelling() -> None:
    book = ledger()
    result = book.submit(decision("erin", at(1)), at(1))
    assert not result.accepted
    assert result.refusal is Refusal.SELF_APPROVAL
    assert "wrote commit" in result.message
    assert book.approvals == ()


def test_whoever_triggered_the_run_cannot_approve() -> None:
    result = ledger().submit(decision("trent", at(1)), at(1))
    assert result.refusal is Refusal.SELF_APPROVAL
    assert "triggered" in result.message
    by_alias = ledger(subject=SUBJECT.model_copy(update={"triggered_by": "Bob <bob@example.com>"}))
    assert by_alias.submit(decision("bob", at(1)), at(1)).refusal is Refusal.SELF_APPROVAL


def test_unknown_and_ineligible_approvers_are_refused() -> None:
    book = ledger()
    unknown = book.submit(decision("alice", at(1), approver="mallory"), at(1))
    assert unknown.refusal is Refusal.UNKNOWN_APPROVER
    outsider = book.submit(decision("dave", at(1)), at(1))
    assert outsider.refusal is Refusal.NOT_ELIGIBLE
    assert book.approvals == ()


# --- proof of identity -----------------------------------------------------------------------


def test_forged_code_is_refused_and_locks_out_after_the_limit() -> None:
    book = ledger(PROD.model_copy(update={"max_failed_codes": 3}))
    valid = {code("alice", at(1), back) for back in (-1, 0, 1)}
    forged = next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in valid)
    for _ in range(3):
        result = book.submit(decision("alice", at(1), code=forged), at(1))
        assert result.refusal is Refusal.BAD_CODE
    locked = book.submit(decision("alice", at(1)), at(1))  # even the right code is too late
    assert locked.refusal is Refusal.LOCKED_OUT
    assert book.approvals == ()
    assert book.submit(decision("bob", at(1)), at(1)).accepted  # others are unaffected


def test_a_code_from_someone_elses_secret_or_not_a_code_is_refused() -> None:
    book = ledger()
    bobs = code("bob", at(1))
    if bobs in {code("alice", at(1), back) for back in (-1, 0, 1)}:
        pytest.skip("the two secrets happen to give the same code now (1 in ~300000)")
    assert book.submit(decision("alice", at(1), code=bobs), at(1)).refusal is Refusal.BAD_CODE
    assert book.submit(decision("alice", at(1), code="12345a"), at(1)).refusal is Refusal.BAD_CODE
    assert book.submit(decision("alice", at(1), code=""), at(1)).refusal is Refusal.BAD_CODE


def test_code_one_step_old_is_accepted_two_steps_old_is_not() -> None:
    book = ledger()
    stale = book.submit(decision("alice", at(1), code=code("alice", at(1), 2)), at(1))
    assert stale.refusal is Refusal.BAD_CODE
    late = book.submit(decision("alice", at(1), code=code("alice", at(1), 1)), at(1))
    assert late.accepted


def test_replayed_code_is_refused_in_the_same_run_and_in_another_run(tmp_path: Path) -> None:
    store_path = tmp_path / "audit.jsonl.totp-used.json"
    first_run = ledger(replay=FileReplayStore(store_path))
    used = code("alice", at(1))
    assert first_run.submit(decision("alice", at(1), code=used), at(1)).accepted
    replay_here = first_run.submit(
        decision("alice", at(1), verdict=Verdict.REJECT, code=used), at(1)
    )
    assert replay_here.refusal is Refusal.REPLAYED_CODE
    assert not first_run.rejected
    other = SUBJECT.model_copy(update={"run_id": "another-run"})
    second_run = ledger(replay=FileReplayStore(store_path), subject=other)
    replay_there = second_run.submit(decision("alice", at(1.2), code=used), at(1.2))
    assert replay_there.refusal is Refusal.REPLAYED_CODE
    # An older step than the burned one is refused too (no going back in time).
    older = second_run.submit(decision("alice", at(1), code=code("alice", at(1), 1)), at(1))
    assert older.refusal is Refusal.REPLAYED_CODE
    assert (store_path.stat().st_mode & 0o777) == 0o600


def test_wrong_digest_confirmation_is_refused() -> None:
    book = ledger()
    wrong = book.submit(decision("alice", at(1), digest_prefix="3f9a7c000001"), at(1))
    assert wrong.refusal is Refusal.WRONG_DIGEST
    short = book.submit(decision("alice", at(2), digest_prefix="3f9a7c"), at(2))
    assert short.refusal is Refusal.WRONG_DIGEST
    assert book.approvals == ()
    ok = book.submit(decision("alice", at(3), digest_prefix="SHA256:3F9A7C000000"), at(3))
    assert ok.accepted


# --- time ------------------------------------------------------------------------------------


def test_timeout_ends_the_request_and_refuses_late_answers() -> None:
    book = ledger()
    assert book.submit(decision("alice", at(1)), at(1)).accepted
    assert book.deadline == OPENED + timedelta(hours=1)
    assert book.state(at(59)) is LedgerState.PENDING
    assert book.state(at(60)) is LedgerState.TIMED_OUT
    late = book.submit(decision("bob", at(61)), at(61))
    assert late.refusal is Refusal.TIMED_OUT
    assert not book.is_satisfied


def test_wait_timer_counts_from_the_trigger_not_from_the_approvals() -> None:
    slow = PROD.model_copy(update={"wait_timer": timedelta(minutes=30)})
    book = ledger(slow)
    book.submit(decision("alice", at(1)), at(1))
    book.submit(decision("bob", at(2)), at(2))
    assert book.state(at(2)) is LedgerState.SATISFIED
    assert not book.may_proceed(T0 + timedelta(minutes=29))
    assert book.may_proceed(T0 + timedelta(minutes=30))


# --- rejection -------------------------------------------------------------------------------


def test_a_verified_rejection_stops_the_promotion() -> None:
    book = ledger()
    book.submit(decision("alice", at(1)), at(1))
    result = book.submit(
        decision("bob", at(2), verdict=Verdict.REJECT, comment="CVE pending"), at(2)
    )
    assert result.accepted and result.state is LedgerState.REJECTED
    assert book.rejected and book.rejection_reason == "rejected by bob: CVE pending"
    after = book.submit(decision("carol", at(3)), at(3))
    assert after.refusal is Refusal.CLOSED


def test_rejection_after_approvals_are_complete_still_stops_it() -> None:
    book = ledger()
    book.submit(decision("alice", at(1)), at(1))
    book.submit(decision("bob", at(2)), at(2))
    extra = book.submit(decision("carol", at(3)), at(3))
    assert extra.refusal is Refusal.ALREADY_SATISFIED
    veto = book.submit(decision("carol", at(4), verdict=Verdict.REJECT), at(4))
    assert veto.accepted
    assert book.state(at(4)) is LedgerState.REJECTED
    assert not book.may_proceed(T0 + timedelta(hours=2))


def test_an_unverified_rejection_does_not_count() -> None:
    book = ledger()
    valid = {code("bob", at(1), back) for back in (-1, 0, 1)}
    wrong = next(c for c in ("000000", "000001", "000002", "000003") if c not in valid)
    forged = book.submit(decision("bob", at(1), verdict=Verdict.REJECT, code=wrong), at(1))
    assert not forged.accepted
    assert not book.rejected


def test_too_many_invalid_submissions_reject_the_promotion() -> None:
    book = ledger(PROD.model_copy(update={"max_invalid_submissions": 4}))
    for n in range(4):
        book.submit(decision("alice", at(1), approver=f"nobody{n}"), at(1))
    assert book.state(at(1)) is LedgerState.REJECTED
    assert "invalid approval submissions" in (book.rejection_reason or "")


def test_policy_for_another_environment_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="targets 'prod'"):
        ledger(PROD.model_copy(update={"environment": "staging"}))


# --- the approver directory ------------------------------------------------------------------


def _write_directory(path: Path, mode: int) -> None:
    path.write_text(
        "[[approver]]\n"
        'name = "alice"\n'
        'groups = ["security"]\n'
        'aliases = ["alice@example.com"]\n'
        f'totp_secret = "{SECRETS["alice"]}"\n'
    )
    path.chmod(mode)


def test_directory_loads_from_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "approvers.toml"
    _write_directory(path, 0o600)
    directory = ApproverDirectory.load(path)
    alice = directory.get("Alice")
    assert alice is not None and alice.groups == ("security",)
    assert SECRETS["alice"] not in repr(directory)


def test_directory_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "approvers.toml"
    _write_directory(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        ApproverDirectory.load(path)


def test_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "approvers.toml"
    _write_directory(path, 0o600)
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another account")  # CI runs as root
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigurationError, match="owned by uid 65534"):
        ApproverDirectory.load(path)


def test_directory_in_a_group_writable_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "deploy-side"
    folder.mkdir()
    path = folder / "approvers.toml"
    _write_directory(path, 0o600)
    folder.chmod(0o770)
    with pytest.raises(ConfigurationError, match="can be written by someone other"):
        ApproverDirectory.load(path)


def test_directory_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    # The attacker's copy sits in a world-writable folder; the configured path links to it.
    public = tmp_path / "public"
    public.mkdir()
    real = public / "approvers.toml"
    _write_directory(real, 0o600)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = private / "approvers.toml"
    link.symlink_to(real)
    with pytest.raises(ConfigurationError, match="symlink"):
        ApproverDirectory.load(link)
    linked_folder = tmp_path / "linked"
    linked_folder.symlink_to(public)
    with pytest.raises(ConfigurationError, match="symlink"):
        ApproverDirectory.load(linked_folder / "approvers.toml")


def test_directory_comes_from_deploy_side_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "approvers.toml"
    _write_directory(path, 0o600)
    monkeypatch.setenv("PORTCULLIS_APPROVERS_FILE", os.fspath(path))
    assert ApprovalSettings().load_directory().get("alice") is not None


def test_directory_refuses_shared_identities_and_weak_secrets() -> None:
    with pytest.raises(ValidationError, match="belongs to both"):
        ApproverDirectory(
            approvers=(
                approver("alice", ("security",), "ops@example.com"),
                approver("bob", ("platform",), "ops@example.com"),
            )
        )
    with pytest.raises(ValidationError, match="128 bits"):
        Approver.model_validate({"name": "x", "totp_secret": "JBSWY3DPEHPK3PXP"})
    with pytest.raises(ValidationError, match="base32"):
        Approver.model_validate({"name": "x", "totp_secret": "not base32 at all 1!"})


# --- the form's description ------------------------------------------------------------------


def test_description_shows_what_is_approved_and_neutralises_markdown() -> None:
    evil = SUBJECT.model_copy(
        update={"author": "[click me](http://evil.example) <x@example.com>\n# Approved"}
    )
    book = ledger(subject=evil)
    book.submit(decision("alice", at(1)), at(1))
    window = OneOffWindow(
        name="sale",
        reason="black friday",
        tz="UTC",
        start=datetime(2024, 5, 10),
        end=datetime(2024, 5, 13),
    )
    freeze = check_freeze(FreezePolicy(environment="prod", windows=(window,)), at(1))
    evil_commit = ChangeCommit(id="c" * 40, subject="[x](http://evil.example) fix", author="Eve <e@x>")
    high = Finding(vulnerability_id="CVE-2024-1", package="openssl", installed_version="3.1",
                   fixed_version="3.2", severity=Severity.HIGH)
    what = WhatChanged(
        running_digest="sha256:" + "9" * 64,
        change=Change(base="d" * 40, commit=COMMIT, commits=1, authors=("Eve <e@x>",),
                      entries=(evil_commit,)),
        base_before="portcullis/busybox:base@sha256:" + "1" * 64,
        base_after="portcullis/busybox:base@sha256:" + "2" * 64,
        findings_new=(high,), findings_kept=3, scan_compared=True,
    )
    text = render_approval_request(
        book, at(2), freeze=freeze, change=what, notice="Refused: the code for bob is wrong"
    )
    assert DIGEST in text and COMMIT in text
    assert "](http" not in text and "\\[click me\\]" in text
    assert "\n# Approved" not in text
    assert "alice" in text and "1 more approval" in text and "platform" in text
    plain = text.replace("\\", "")
    assert "1 commit(s)" in plain and "`cccccccccccc` [x](http://evil.example) fix" in plain
    assert "Base image changed" in plain and "1 new, 0 gone, 3 unchanged" in plain
    assert "HIGH** CVE-2024-1 in openssl 3.1 (fixed in 3.2)" in plain
    assert "next freeze 'sale'" in text.replace("\\", "")
    assert "Refused: the code for bob is wrong" in text.replace("\\", "")
