"""The audit chain: every kind of tampering is found and named, by the library and the CLI."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from portcullis.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    HttpAuditSink,
    default_anchor_path,
    main,
    verify_log,
)
from portcullis.errors import PortcullisError, TransientError
from tests.support.http import serving

COMMIT = "a" * 40
DIGEST = "sha256:" + "b" * 64


def entry(n: int, actor: str = "alice") -> AuditEntry:
    return AuditEntry(
        event="approval.accepted",
        actor=actor,
        run_id=f"run-{n}",
        app="hello",
        environment="prod",
        digest=DIGEST,
        commit=COMMIT,
        details={"n": n, "note": "ü ok"},
    )


def ticking_clock(start: datetime) -> Any:
    now = [start]

    def clock() -> datetime:
        now[0] += timedelta(seconds=1)
        return now[0]

    return clock


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(
        tmp_path / "audit.jsonl", clock=ticking_clock(datetime(2024, 5, 1, tzinfo=UTC))
    )
    for n in range(5):
        audit.append(entry(n))
    return audit


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write(path: Path, content: list[bytes]) -> None:
    path.write_bytes(b"".join(content))


def test_intact_log_verifies_and_records_answer_what_who_which_when(log: AuditLog) -> None:
    report = log.verify()
    assert report.ok and report.count == 5 and not report.warnings
    records = log.records()
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    first = records[0]
    assert (first.event, first.actor, first.run_id, first.commit, first.digest) == (
        "approval.accepted",
        "alice",
        "run-0",
        COMMIT,
        DIGEST,
    )
    assert first.at == datetime(2024, 5, 1, 0, 0, 1, tzinfo=UTC)
    assert [r.seq for r in records] == [0, 1, 2, 3, 4]
    assert (log.path.stat().st_mode & 0o777) == 0o600


def test_edited_record_is_found(log: AuditLog) -> None:
    content = lines(log.path)
    edited = json.loads(content[2])
    edited["actor"] = "mallory"
    content[2] = json.dumps(edited).encode() + b"\n"
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 2)
    assert "edited" in report.reason


def test_edited_record_with_recomputed_hash_breaks_the_next_link(log: AuditLog) -> None:
    from portcullis.audit import canonical_json, record_hash

    content = lines(log.path)
    forged = json.loads(content[1])
    forged["actor"] = "mallory"
    forged["hash"] = record_hash(forged)
    content[1] = canonical_json(forged) + b"\n"
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 2)
    assert "does not chain" in report.reason


def test_rewritten_last_record_differs_from_the_anchor(log: AuditLog) -> None:
    from portcullis.audit import canonical_json, record_hash

    content = lines(log.path)
    forged = json.loads(content[-1])
    forged["details"] = {"n": 99}
    forged["hash"] = record_hash(forged)
    content[-1] = canonical_json(forged) + b"\n"
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 4)
    assert "anchor" in report.reason


def test_deleted_record_is_found(log: AuditLog) -> None:
    content = lines(log.path)
    del content[1]
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 1)
    assert "deleted" in report.reason


def test_reordered_records_are_found(log: AuditLog) -> None:
    content = lines(log.path)
    content[2], content[3] = content[3], content[2]
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 2)
    assert "deleted" in report.reason or "reordered" in report.reason


def test_cut_off_tail_is_found_through_the_anchor(log: AuditLog) -> None:
    write(log.path, lines(log.path)[:3])
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 3)
    assert "cut off the end" in report.reason
    without_anchor = verify_log(log.path)
    assert without_anchor.ok and without_anchor.warnings


def test_record_appended_behind_the_writers_back_is_found(log: AuditLog, tmp_path: Path) -> None:
    # A second log object with its own anchor appends to the same file: the real anchor
    # no longer covers the new record.
    rogue = AuditLog(log.path, anchor_path=tmp_path / "elsewhere.head")
    rogue.append(entry(5, actor="mallory"))
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 5)
    assert "not covered by the anchor" in report.reason


def test_torn_last_line_is_found_and_blocks_appends(log: AuditLog) -> None:
    content = lines(log.path)
    content[-1] = content[-1][:40]
    write(log.path, content)
    report = log.verify()
    assert (report.ok, report.first_broken) == (False, 4)
    with pytest.raises(PortcullisError, match="incomplete line"):
        log.append(entry(9))


def test_every_single_changed_byte_is_found(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", clock=ticking_clock(datetime(2024, 5, 1, tzinfo=UTC)))
    for n in range(2):
        audit.append(entry(n))
    original = audit.path.read_bytes()
    for position in range(len(original)):
        changed = bytearray(original)
        changed[position] = (changed[position] + 1) % 256
        audit.path.write_bytes(bytes(changed))
        assert main(["verify", str(audit.path)]) == 1, f"byte {position} changed unnoticed"
    audit.path.write_bytes(original)
    assert main(["verify", str(audit.path)]) == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portcullis.audit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_reports_first_broken_record_and_exits_non_zero(log: AuditLog) -> None:
    ok = _cli("verify", str(log.path))
    assert ok.returncode == 0, ok.stderr
    assert "OK: 5 record(s)" in ok.stdout
    raw = bytearray(log.path.read_bytes())
    third = raw.index(b"run-3")  # a byte inside record 3
    raw[third] = ord("X")
    log.path.write_bytes(bytes(raw))
    broken = _cli("verify", str(log.path))
    assert broken.returncode == 1
    assert "BROKEN: record 3 (line 4)" in broken.stdout
    assert "edited" in broken.stdout


def test_cli_demands_the_anchor_unless_told_otherwise(log: AuditLog) -> None:
    default_anchor_path(log.path).unlink()
    missing = _cli("verify", str(log.path))
    assert missing.returncode == 2
    assert "anchor" in missing.stderr
    accepted = _cli("verify", str(log.path), "--no-anchor")
    assert accepted.returncode == 0
    assert "cannot be detected" in accepted.stderr


def _append_many(path: str, worker: int, count: int) -> None:
    audit = AuditLog(Path(path))
    for n in range(count):
        audit.append(entry(worker * 1000 + n, actor=f"worker-{worker}"))


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    # spawn, not fork: by now the test process runs Prefect server threads, and a forked
    # copy of a threaded process can inherit held locks.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify_log(path, default_anchor_path(path))
    assert report.ok, report.reason
    assert report.count == 100


# --- HTTP sink against a real server on loopback ---------------------------------------------


@dataclass
class Store:
    url: str = ""
    status: int = 201
    received: list[tuple[str | None, bytes]] = field(default_factory=list)


@pytest.fixture
def store() -> Iterator[Store]:
    state = Store()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((self.headers.get("Authorization"), body))
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    with serving(Handler) as port:
        state.url = f"http://127.0.0.1:{port}/audit"
        yield state


def test_http_sink_receives_exactly_the_chained_record(tmp_path: Path, store: Store) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", mirrors=[HttpAuditSink(store.url, SecretStr("t0k"))])
    record = audit.append(entry(1))
    ((auth, body),) = store.received
    assert auth == "Bearer t0k"
    assert body + b"\n" == audit.path.read_bytes()
    assert json.loads(body)["hash"] == record.hash


def test_http_sink_failure_is_transient_and_local_record_stays(
    tmp_path: Path, store: Store
) -> None:
    store.status = 503
    audit = AuditLog(tmp_path / "a.jsonl", mirrors=[HttpAuditSink(store.url, SecretStr("t0k"))])
    with pytest.raises(TransientError, match="HTTP 503"):
        audit.append(entry(1))
    assert audit.verify().count == 1


def test_a_runs_audit_names_one_subject_and_never_changes_it(tmp_path: Path) -> None:
    """RunAudit is immutable: ``about`` gives a bound copy, and a run cannot be about two digests."""
    from dataclasses import FrozenInstanceError

    from tasks.gates import RunAudit

    log = AuditLog(tmp_path / "audit.jsonl")
    start = RunAudit(log, "run-1", "hello", "dev")
    start.record("promotion.started")
    bound = start.about("sha256:" + "a" * 64)
    with pytest.raises(FrozenInstanceError):
        bound.digest = "sha256:" + "b" * 64  # type: ignore[misc]
    bound.about("sha256:" + "a" * 64, "c0ffee").record("verification.passed")
    with pytest.raises(ValueError, match="is about sha256:a"):
        bound.about("sha256:" + "b" * 64)
    with pytest.raises(ValueError, match="commit c0ffee"):
        bound.about("sha256:" + "a" * 64, "c0ffee").about("sha256:" + "a" * 64, "deadbeef")
    assert start.digest is None and bound.commit is None

    # A refusal caught where only the unbound trail is at hand still names the subject.
    start.as_far_as_recorded().record("promotion.refused", reason="test")
    records = log.run_records("run-1")
    assert [(r.event, r.digest, r.commit) for r in records] == [
        ("promotion.started", None, None),
        ("verification.passed", "sha256:" + "a" * 64, "c0ffee"),
        ("promotion.refused", "sha256:" + "a" * 64, "c0ffee"),
    ]
