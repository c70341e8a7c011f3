"""The tamper-evident audit trail.

Every decision is one JSON line in an append-only file. Each record carries the SHA-256 of
the record before it (``prev_hash``) and its own hash over its canonical JSON, so editing,
deleting or reordering any record breaks the chain at that point. Cutting records off the
end leaves a valid chain, so a separately kept *anchor* (the head file: last sequence number
and hash, rewritten after every append) is checked too; keep it, or the HTTP mirror, where
the people who can write the log cannot.

Hashes are unkeyed: someone who can rewrite the whole file *and* the anchor can forge a new
consistent history. The chain makes tampering evident to anyone holding an older anchor or
the central copy, not impossible.

Run ``python -m portcullis.audit verify PATH`` to check a log; it exits non-zero and names
the first broken record.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from pydantic import Field, JsonValue, SecretStr, ValidationError, field_validator

from portcullis.canonical import canonical_json
from portcullis.errors import PortcullisError, TransientError
from portcullis.models import Frozen

GENESIS_HASH = "0" * 64
#: Below this size a log is verified in one process: forking costs more than it saves.
PARALLEL_MIN_BYTES = 8 << 20
_EVENT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON of a record's fields without ``hash``."""
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


class AuditEntry(Frozen):
    """What to record: what happened, who did it, for which run, commit and image."""

    event: str = Field(description="what happened, dotted lower case, e.g. 'approval.accepted'")
    actor: str = Field(min_length=1, description="who: a verified approver, or 'portcullis'")
    run_id: str | None = Field(default=None, description="which flow run")
    app: str | None = None
    environment: str | None = None
    digest: str | None = Field(default=None, description="which image digest")
    commit: str | None = Field(default=None, description="which source commit")
    details: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("event")
    @classmethod
    def _event_name(cls, value: str) -> str:
        if not _EVENT_RE.fullmatch(value):
            raise ValueError(f"event name {value!r} must be dotted lower case, e.g. 'gate.passed'")
        return value


class AuditRecord(AuditEntry):
    """One line of the log: an entry plus when, its position and the chain hashes."""

    seq: int = Field(ge=0, description="position in the log, from 0")
    at: datetime = Field(description="when, UTC")
    prev_hash: str = Field(description="hash of the record before, zeros for the first")
    hash: str = Field(description="SHA-256 of this record's canonical JSON without 'hash'")

    def fields(self) -> dict[str, Any]:
        """The record as the JSON-ready mapping that is hashed and written."""
        return self.model_dump(mode="json")


def chain_fields(entry: AuditEntry, seq: int, at: datetime, prev_hash: str) -> dict[str, Any]:
    """The JSON fields of ``entry`` as record ``seq`` after ``prev_hash``, ``hash`` included."""
    # Serialise through the model so the hashed JSON is exactly what parsing the record
    # back produces (datetime formatting included).
    draft = AuditRecord(
        **entry.model_dump(), seq=seq, at=at.astimezone(UTC), prev_hash=prev_hash,
        hash=GENESIS_HASH,
    )
    body = draft.fields()
    body["hash"] = record_hash(body)
    return body


class AuditSink(ABC):
    """Somewhere records are copied to after the local chain accepted them."""

    @abstractmethod
    def emit(self, record: AuditRecord) -> None:
        """Deliver one record; raise :class:`TransientError` when it could not be delivered."""


class HttpAuditSink(AuditSink):
    """POSTs each record as JSON to a central store.

    The store should keep records by ``(seq, hash)`` and ignore exact duplicates, so a retried
    delivery is harmless. It also serves as the separately kept anchor.

    Args:
        url: endpoint that accepts one record per POST.
        token: bearer token from deploy-side configuration.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: SecretStr, timeout: float = 5.0) -> None:
        self.url = url
        self._token = token
        self.timeout = timeout

    def emit(self, record: AuditRecord) -> None:
        """POST the record; a network error or non-2xx answer is a :class:`TransientError`."""
        import httpx  # here, not at the top: it costs the verify CLI a second of start-up

        try:
            response = httpx.post(
                self.url,
                content=canonical_json(record.fields()),
                headers={
                    "Authorization": f"Bearer {self._token.get_secret_value()}",
                    "Content-Type": "application/json",
                },
                timeout=self.timeout,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            raise TransientError(
                f"audit record {record.seq} was not delivered to {self.url}: {exc}",
                hint="the local log has it; check the central audit store and retry",
            ) from exc
        if not response.is_success:
            raise TransientError(
                f"audit store {self.url} refused record {record.seq}: HTTP {response.status_code}",
                hint="the local log has it; check the store's token and logs",
            )


class Anchor(Frozen):
    """The separately kept head of the chain: how many records, and the last hash."""

    count: int = Field(ge=0)
    last_hash: str


class VerifyReport(Frozen):
    """Result of verifying a log."""

    ok: bool
    count: int = Field(description="records read")
    first_broken: int | None = Field(default=None, description="index of the first bad record")
    reason: str = ""
    warnings: tuple[str, ...] = ()


def default_anchor_path(path: Path) -> Path:
    """Where the head anchor lives unless told otherwise: ``PATH.head``."""
    return path.with_name(path.name + ".head")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), for concurrent writers."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half.

    Safe from several threads and processes at once: each writer has its own temporary file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _last_line(path: Path) -> bytes | None:
    """The last line of the file without reading all of it; None for an empty file."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return None
        pos = size
        chunk = b""
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + chunk
            if chunk.count(b"\n") >= 2 or pos == 0:
                break
        if not chunk.endswith(b"\n"):
            raise PortcullisError(
                f"audit log {path} ends in an incomplete line (torn write or tampering)",
                hint=f"run `python -m portcullis.audit verify {path}` and repair it by hand",
            )
        return chunk[:-1].rsplit(b"\n", 1)[-1]


class AuditTrail(ABC):
    """Where decisions are recorded: the JSONL :class:`AuditLog` or a database store.

    Every implementation chains records with :func:`record_hash`, so a record verifies the
    same way wherever it is kept.
    """

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the records are, for messages (a path or a URL without its password)."""

    @abstractmethod
    def append(self, entry: AuditEntry) -> AuditRecord:
        """Chain ``entry`` to the last record and keep it durably; returns the record."""

    @abstractmethod
    def records(self) -> list[AuditRecord]:
        """Every record in order (does not verify the chain: use :meth:`verify`)."""

    @abstractmethod
    def verify(self) -> VerifyReport:
        """Verify every record's hash, sequence number and link to the record before."""

    def run_records(self, run_id: str) -> list[AuditRecord]:
        """One flow run's records, in order (not verified: use :meth:`verify`)."""
        return [r for r in self.records() if r.run_id == run_id]

    @property
    def underlying(self) -> AuditTrail:
        """The trail that keeps the records: itself, or what a wrapper adding behaviour wraps."""
        return self


class AuditLog(AuditTrail):
    """The local append-only JSONL chain, with optional mirrors.

    Args:
        path: the JSONL file (created on first append, mode 0600).
        mirrors: sinks every record is copied to after it is in the local chain.
        anchor_path: where the head anchor is kept; defaults to ``PATH.head``.
        clock: source of "now"; injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        mirrors: Sequence[AuditSink] = (),
        anchor_path: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self.mirrors = tuple(mirrors)
        self.anchor_path = anchor_path or default_anchor_path(path)
        self._clock = clock
        self._lock_path = path.with_name(path.name + ".lock")

    @property
    def location(self) -> str:
        """The JSONL file."""
        return str(self.path)

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Chain ``entry`` to the last record, write it durably, then copy it to the mirrors.

        Returns:
            the record as written.

        Raises:
            PortcullisError: the log's last record is damaged (nothing is appended).
            TransientError: a mirror did not take the record (the local log has it).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock_path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.close(fd)
            last = _last_line(self.path)
            if last is None:
                seq, prev = 0, GENESIS_HASH
            else:
                try:
                    previous = AuditRecord.model_validate_json(last)
                except ValidationError:
                    raise PortcullisError(
                        f"the last record of audit log {self.path} is not a valid record",
                        hint=f"run `python -m portcullis.audit verify {self.path}`",
                    ) from None
                seq, prev = previous.seq + 1, previous.hash
            body = chain_fields(entry, seq, self._clock(), prev)
            record = AuditRecord.model_validate(body)
            line = canonical_json(body) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            anchor = Anchor(count=seq + 1, last_hash=body["hash"])
            write_atomic(self.anchor_path, canonical_json(anchor.model_dump()) + b"\n")
        for mirror in self.mirrors:
            mirror.emit(record)
        return record

    def records(self) -> list[AuditRecord]:
        """Every record, parsed (does not verify the chain: use :meth:`verify`)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            return [AuditRecord.model_validate_json(line) for line in f if line.strip()]

    def verify(self) -> VerifyReport:
        """Verify the chain and the anchor; see :func:`verify_log`.

        Holds the writers' lock: a record another run is appending (line written, anchor not
        yet) would otherwise look like one appended behind the writer's back.
        """
        if not self.path.parent.is_dir():
            return verify_log(self.path, None)
        with file_lock(self._lock_path):
            return verify_log(self.path, self.anchor_path if self.anchor_path.exists() else None)


_HASH_MEMBER = b',"hash":"'
_RECORD_ORDER = ("actor", "app", "at", "commit", "details", "digest", "environment", "event",
                 "hash", "prev_hash", "run_id", "seq")
assert sorted(_RECORD_ORDER) == sorted(AuditRecord.model_fields) == list(_RECORD_ORDER)
_TEXT = (str, type(None))
_NESTED = (float, dict, list)
_AT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z$")


def _holds_float(value: object) -> bool:
    """Whether a parsed JSON value holds a float anywhere (orjson and the standard library
    may print a float differently, e.g. 1e16 / 1e+16)."""
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        for item in value.values():  # type: ignore[attr-defined]
            if _holds_float(item):
                return True
    elif kind is list:
        for item in value:  # type: ignore[attr-defined]
            if _holds_float(item):
                return True
    return False


def _fast_line(raw: bytes, index: int, prev_hash: str) -> str | None:
    """The hash of an intact line at ``index`` after ``prev_hash``, as the writer writes them;
    None whenever anything is unusual (then :func:`_check_line` decides and explains).

    Accepts only what :func:`_check_line` accepts. The line must be byte for byte the
    canonical JSON of what it parses to, so its hash (over the canonical JSON without
    ``hash``) is the SHA-256 of the line with the ``hash`` member cut out; no float may occur
    (the one type whose printing differs between orjson and the standard library); and the
    fields must pass a stricter check than :class:`AuditRecord` applies.
    """
    body = raw[:-1]
    if raw[-1:] != b"\n":
        return None
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(fields) is not dict or orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) != body:
        return None
    stored = fields.get("hash")
    # The top-level member is the last "hash" member: only prev_hash, run_id, seq sort after it.
    cut = body.rfind(_HASH_MEMBER)
    if type(stored) is not str or len(stored) != 64 or cut < 0 \
            or body[cut + 9:cut + 74] != stored.encode() + b'"':
        return None
    digest = hashlib.sha256(body[:cut])
    digest.update(body[cut + 74:])
    if digest.hexdigest() != stored:
        return None
    # The writer writes every field; the line is canonical, so the values come in key order.
    if tuple(fields) != _RECORD_ORDER:
        return None
    (actor, app, at, commit, details, image, environment, event, _, prev, run_id,
     seq) = fields.values()
    if type(seq) is not int or seq != index or prev != prev_hash or type(details) is not dict \
            or type(event) is not str or not _EVENT_RE.fullmatch(event) \
            or type(actor) is not str or not actor or type(at) is not str \
            or not _AT_RE.fullmatch(at) or type(app) not in _TEXT or type(commit) not in _TEXT \
            or type(image) not in _TEXT or type(environment) not in _TEXT \
            or type(run_id) not in _TEXT:
        return None
    for value in details.values():
        if type(value) in _NESTED and _holds_float(value):
            return None
    try:
        datetime.fromisoformat(at)
    except ValueError:
        return None
    return stored


def _check_line(index: int, raw: bytes, prev_hash: str) -> tuple[str | None, str]:
    """Check one line; returns (reason it is broken or None, its hash)."""
    if not raw.endswith(b"\n"):
        return "the last line is incomplete (torn write or truncated inside a record)", ""
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not valid JSON (the line was edited or damaged)", ""
    if not isinstance(fields, dict):
        return "not a JSON object", ""
    stored = fields.get("hash")
    if not isinstance(stored, str) or not _HASH_RE.fullmatch(stored):
        return "has no valid 'hash' field", ""
    if record_hash(fields) != stored:
        return "its content does not match its hash: the record was edited", stored
    try:
        record = AuditRecord.model_validate(fields)
    except ValidationError as exc:
        return f"not a valid audit record: {exc.errors()[0]['msg']}", stored
    if record.seq > index:
        return (
            f"it has sequence number {record.seq}: "
            f"{record.seq - index} record(s) before it were deleted"
        ), stored
    if record.seq < index:
        return (
            f"it has sequence number {record.seq}: records were reordered or duplicated"
        ), stored
    if record.prev_hash != prev_hash:
        return (
            "it does not chain to the record before it: that record was replaced, "
            "or records were deleted or reordered"
        ), stored
    return None, stored


class _Span(NamedTuple):
    """What one stretch of lines verified to: how far, the last hash, or the first break."""

    next_index: int  # index after the last line read
    last_hash: str
    broken: int | None = None
    reason: str = ""


def _verify_span(path: Path, start: int, end: int | None, first_index: int, prev: str) -> _Span:
    """Verify the lines that begin in bytes [start, end) of ``path``; the first is line
    ``first_index`` and must chain to ``prev``."""
    index = first_index
    with path.open("rb", buffering=1 << 20) as f:
        f.seek(start)
        position = start
        for raw in f:
            if end is not None and position >= end:
                break
            position += len(raw)
            fast = _fast_line(raw, index, prev)
            if fast is None:
                reason, fast = _check_line(index, raw, prev)
                if reason is not None:
                    return _Span(index, prev, index, reason)
            prev = fast
            index += 1
    return _Span(index, prev)


def _span_args(path: Path, workers: int) -> list[tuple[Path, int, int | None, int, str]]:
    """Split the log at line boundaries into ``workers`` spans, each with its first line's
    index and the hash its first line must chain to (the stored hash of the line before:
    if that line is broken, an earlier span reports it first)."""
    data = path.read_bytes()
    size = len(data)
    bounds = [0]
    for j in range(1, workers):
        cut = data.find(b"\n", size * j // workers)
        if cut < 0 or cut + 1 >= size or cut + 1 <= bounds[-1]:
            break
        bounds.append(cut + 1)
    spans: list[tuple[Path, int, int | None, int, str]] = []
    index = 0
    for start, end in zip(bounds, [*bounds[1:], size], strict=True):
        prev = GENESIS_HASH
        if start:
            line = data[data.rfind(b"\n", 0, start - 1) + 1:start - 1]
            try:
                stored = orjson.loads(line).get("hash")
            except (orjson.JSONDecodeError, AttributeError):
                stored = None
            prev = stored if isinstance(stored, str) else ""
        spans.append((path, start, end if end < size else None, index, prev))
        index += data.count(b"\n", start, end)
    return spans


def _verify_span_args(args: tuple[Path, int, int | None, int, str]) -> _Span:
    return _verify_span(*args)


def verify_log(path: Path, anchor_path: Path | None = None, *, workers: int = 1) -> VerifyReport:
    """Verify every record's hash, sequence and link, then the anchor if one is given.

    Args:
        path: the JSONL log.
        anchor_path: the separately kept head; without it a cut-off tail cannot be detected.
        workers: processes to verify stretches of a large log in parallel (forked: only from
            a single-threaded program such as the CLI). The answer is the same as with one.

    Returns:
        a report naming the first broken record (0-based index, = line number - 1).
    """
    if workers > 1 and path.stat().st_size >= PARALLEL_MIN_BYTES:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            spans = list(pool.map(_verify_span_args, _span_args(path, workers)))
    else:
        spans = [_verify_span(path, 0, None, 0, GENESIS_HASH)]
    for span in spans:
        if span.broken is not None:
            return VerifyReport(ok=False, count=span.broken, first_broken=span.broken,
                                reason=span.reason)
    count, prev = spans[-1].next_index, spans[-1].last_hash
    if anchor_path is None:
        return VerifyReport(
            ok=True,
            count=count,
            warnings=("no anchor given: records cut off the end cannot be detected",),
        )
    try:
        anchor = Anchor.model_validate_json(anchor_path.read_bytes())
    except (OSError, ValidationError) as exc:
        return VerifyReport(
            ok=False, count=count, first_broken=count, reason=f"anchor unreadable: {exc}"
        )
    if count < anchor.count:
        return VerifyReport(
            ok=False,
            count=count,
            first_broken=count,
            reason=(
                f"the log ends after {count} record(s) but the anchor says {anchor.count}: "
                "records were cut off the end"
            ),
        )
    if count > anchor.count:
        return VerifyReport(
            ok=False,
            count=count,
            first_broken=anchor.count,
            reason=(
                f"records from index {anchor.count} on are not covered by the anchor "
                "(appended without the log's writer, or a crash between write and anchor)"
            ),
        )
    if count and prev != anchor.last_hash:
        return VerifyReport(
            ok=False,
            count=count,
            first_broken=count - 1,
            reason="the last record's hash differs from the anchor: the history was rewritten",
        )
    return VerifyReport(ok=True, count=count)


def _is_url(target: str) -> bool:
    return "://" in target



def _verify_jsonl(path: Path, anchor_arg: Path | None, no_anchor: bool,
                  workers: int = 1) -> VerifyReport | int:
    """Verify a JSONL log as the CLI does; an int is the exit code of a refusal to run."""
    anchor: Path | None = None
    if not no_anchor:
        anchor = anchor_arg or default_anchor_path(path)
        if not anchor.exists():
            print(
                f"error: anchor {anchor} not found; pass --anchor FILE, or --no-anchor "
                "to accept that records cut off the end go unnoticed",
                file=sys.stderr,
            )
            return 2
    try:
        return verify_log(path, anchor, workers=workers)
    except OSError as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        return 2


def _print_report(report: VerifyReport, where: str, *, lines: bool) -> int:
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.ok:
        print(f"OK: {report.count} record(s), chain intact")
        return 0
    line = f" (line {(report.first_broken or 0) + 1})" if lines else ""
    print(f"BROKEN: record {report.first_broken}{line} of {where}: {report.reason}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m portcullis.audit verify [PATH|URL]`` and ``import PATH [--to URL]``.

    ``verify`` reads a JSONL log (with its anchor) or, given a URL or nothing, the state store
    (default: this worker's ``PORTCULLIS_STATE_URL``; the password from
    ``PORTCULLIS_STATE_PASSWORD`` or ``PGPASSWORD``, never the command line). ``import``
    verifies a JSONL log and copies it into an empty store, then verifies the store.

    Returns:
        0 when the chain is intact, 1 when it is broken, 2 when it cannot be read.
    """
    # Imported here: the state store builds on this module.
    from sqlalchemy.exc import SQLAlchemyError

    from portcullis.settings import Settings
    from portcullis.state import open_state_url

    parser = argparse.ArgumentParser(prog="python -m portcullis.audit")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify a tamper-evident audit log or store")
    verify.add_argument(
        "target", nargs="?", help="a JSONL log or a store URL (default: the configured store)"
    )
    importing = sub.add_parser("import", help="copy a verified JSONL log into an empty store")
    importing.add_argument("target", type=Path, help="the JSONL log")
    importing.add_argument("--to", dest="url", help="store URL (default: the configured store)")
    for command in (verify, importing):
        command.add_argument("--anchor", type=Path, help="head anchor file (default: PATH.head)")
        command.add_argument(
            "--no-anchor", action="store_true", help="skip the anchor (tail cuts go unnoticed)"
        )
        command.add_argument(
            "--workers", type=int, default=min(os.cpu_count() or 1, 4),
            help="processes for a large log or store (default: the CPUs, at most 4); 1 verifies in one",
        )
    args = parser.parse_args(argv)
    if args.command == "verify" and args.target and not _is_url(args.target):
        path = Path(args.target)
        checked = _verify_jsonl(path, args.anchor, args.no_anchor, args.workers)
        return checked if isinstance(checked, int) else _print_report(checked, str(path), lines=True)
    url = (args.target if args.command == "verify" else args.url) or Settings().state_database_url
    store = open_state_url(url).audit_log()
    try:
        if args.command == "import":
            checked = _verify_jsonl(args.target, args.anchor, args.no_anchor, args.workers)
            if isinstance(checked, int):
                return checked
            if not checked.ok:
                return _print_report(checked, str(args.target), lines=True)
            with args.target.open("rb") as lines:
                count = store.import_records(lines)
            print(f"imported {count} record(s) from {args.target} into {store.location}")
        report = store.verify(workers=args.workers)
    except PortcullisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"error: cannot read {store.location}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return _print_report(report, store.location, lines=False)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "GENESIS_HASH",
    "Anchor",
    "AuditEntry",
    "AuditLog",
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "HttpAuditSink",
    "VerifyReport",
    "canonical_json",
    "chain_fields",
    "default_anchor_path",
    "file_lock",
    "record_hash",
    "verify_log",
    "write_atomic",
]
