"""The audit log's fast verification path accepts nothing the reference check refuses.

``verify_log`` first tries ``_fast_line`` (orjson, hash over the raw bytes) and falls back to
``_check_line`` (parse, re-serialise canonically, validate with pydantic) for anything unusual.
Given lines the writer wrote and lines an attacker crafted, when both paths judge them, then
every line the fast path accepts is accepted by the reference, and the writer's ordinary
lines do take the fast path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from portcullis import audit
from portcullis.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    _check_line,
    _fast_line,
    canonical_json,
    record_hash,
    verify_log,
)

DETAILS: list[dict[str, Any]] = [
    {},
    {"reason": "ok", "n": 3, "flag": True, "none": None},
    {"nested": {"hash": "x", "list": [1, "two", {"three": None}]}},
    {"text": "caf\u00e9 \u2028 \U0001f600 \"quoted\" back\\slash\ttab\x01ctl"},
    {"seconds": 0.25},
    {"big": 1e16, "small": 1e-7},
    {"hash": "0" * 64},
    {"s": ',"hash":"' + "a" * 64 + '"'},
]


def _reference(path: Path) -> tuple[bool, int | None]:
    prev = GENESIS_HASH
    for index, raw in enumerate(path.read_bytes().splitlines(keepends=True)):
        reason, digest = _check_line(index, raw, prev)
        if reason is not None:
            return False, index
        prev = digest
    return True, None


def _written(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i, details in enumerate(DETAILS):
        log.append(AuditEntry(event="gate.passed", actor="alice", run_id=f"run-{i}",
                              app="hello", environment="dev", details=details))
    return log.path


def test_the_writers_lines_take_the_fast_path_unless_they_hold_floats(tmp_path: Path) -> None:
    path = _written(tmp_path)
    prev = GENESIS_HASH
    for index, raw in enumerate(path.read_bytes().splitlines(keepends=True)):
        fast = _fast_line(raw, index, prev)
        reason, digest = _check_line(index, raw, prev)
        assert reason is None
        floats = any(isinstance(v, float) for v in DETAILS[index].values())
        assert fast == (None if floats else digest), (index, raw)
        prev = digest
    report = verify_log(path, path.with_name("audit.jsonl.head"))
    assert report.ok and report.count == len(DETAILS)


def _self_consistent(body: bytes) -> bytes:
    """``body`` (some serialisation of a record) with a hash computed over those very bytes,
    i.e. what an attacker who controls the bytes can write."""
    stored = hashlib.sha256(body).hexdigest()
    text = body.decode()
    cut = text.index('"prev_hash"')
    return (text[:cut] + f'"hash":"{stored}",' + text[cut:] + "\n").encode()


def _record(prev: str, **over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "actor": "alice", "app": "hello", "at": "2026-01-01T00:00:00Z", "commit": None,
        "details": {"n": 1}, "digest": None, "environment": "dev", "event": "gate.passed",
        "prev_hash": prev, "run_id": "r", "seq": 0,
    }
    fields.update(over)
    return fields


def _canonical_line(fields: dict[str, Any]) -> bytes:
    body = dict(fields)
    body["hash"] = record_hash(body)
    return canonical_json(body) + b"\n"


HOSTILE: list[bytes] = [
    # Non-canonical bytes whose hash the fast path's formula would accept.
    _self_consistent(json.dumps(_record(GENESIS_HASH), sort_keys=True).encode()),
    _self_consistent(json.dumps(
        _record(GENESIS_HASH), sort_keys=True, separators=(",", ":")).encode().replace(
        b'"actor":"alice"', b'"actor":"alice","actor":"alice"')),
    _self_consistent(json.dumps(
        _record(GENESIS_HASH, details={"big": 1e16}), sort_keys=True,
        separators=(",", ":")).encode().replace(b"1e+16", b"1e16")),
    # Canonical lines the model refuses.
    _canonical_line(_record(GENESIS_HASH, event="Gate Passed")),
    _canonical_line(_record(GENESIS_HASH, event="gate.passed\n")),
    _canonical_line(_record(GENESIS_HASH, actor="")),
    _canonical_line(_record(GENESIS_HASH, at="yesterday")),
    _canonical_line(_record(GENESIS_HASH, at="2026-02-30T00:00:00Z")),
    _canonical_line(_record(GENESIS_HASH, seq=-1)),
    _canonical_line(_record(GENESIS_HASH, seq=1)),
    _canonical_line(_record("f" * 64)),
    _canonical_line(_record(GENESIS_HASH, app=7)),
    _canonical_line(_record(GENESIS_HASH, details=[1])),
    _canonical_line({**_record(GENESIS_HASH), "zzz": "extra"}),
    _canonical_line({k: v for k, v in _record(GENESIS_HASH).items() if k != "actor"}),
    _canonical_line(_record(GENESIS_HASH))[:-1],  # torn: no newline
    _canonical_line(_record(GENESIS_HASH)).replace(b'"n":1', b'"n":2'),  # edited
    b"not json\n",
    b"[]\n",
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_what_the_fast_path_accepts_the_reference_accepts(raw: bytes) -> None:
    fast = _fast_line(raw, 0, GENESIS_HASH)
    reason, digest = _check_line(0, raw, GENESIS_HASH)
    if fast is not None:
        assert reason is None and fast == digest
    # These are all broken or unusual: none may take the fast path to acceptance wrongly.
    if reason is not None:
        assert fast is None


def test_verify_log_agrees_with_the_reference_on_every_single_byte_change(tmp_path: Path) -> None:
    path = _written(tmp_path)
    original = path.read_bytes()
    for position in range(0, len(original), 7):
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        report = verify_log(path)
        ok, first = _reference(path)
        assert (report.ok, report.first_broken) == (ok, first), position


def test_parallel_verification_gives_the_same_answer_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit, "PARALLEL_MIN_BYTES", 0)
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(40):
        log.append(AuditEntry(event="gate.passed", actor="alice", run_id=f"run-{i}",
                              details=DETAILS[i % len(DETAILS)]))
    anchor = tmp_path / "audit.jsonl.head"
    original = log.path.read_bytes()
    assert verify_log(log.path, anchor, workers=3) == verify_log(log.path, anchor) \
        == audit.VerifyReport(ok=True, count=40)
    for position in range(0, len(original), 97):
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        log.path.write_bytes(bytes(damaged))
        assert verify_log(log.path, anchor, workers=3) == verify_log(log.path, anchor), position
    # Lines cut out at a span boundary, and a torn last line.
    lines = original.splitlines(keepends=True)
    for variant in (b"".join(lines[:20] + lines[21:]), original[:-5]):
        log.path.write_bytes(variant)
        assert verify_log(log.path, anchor, workers=3) == verify_log(log.path, anchor)
        assert not verify_log(log.path, anchor, workers=3).ok
