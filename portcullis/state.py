"""Shared state in one database: the audit chain, used codes, pins, reviews, ticket use.

Deploy workers on several hosts must see one truth: a TOTP code burned on one host is burned
on all, a pin set on one holds on all, and the audit trail is one hash chain. This module keeps
that state in a SQL database through SQLAlchemy Core, with two backends:

* an embedded SQLite file (the local stack's default, ``sqlite:///<home>/state.db``);
* PostgreSQL (the production-like setup), where the role the flows log in as may only
  INSERT and SELECT audit records: UPDATE, DELETE and TRUNCATE are refused by privileges *and*
  by triggers (:func:`install_schema`), so a later careless GRANT does not open the log.

The adapters implement the interfaces the file stores have (:class:`StoreAuditLog` is an
:class:`~portcullis.audit.AuditTrail`, :class:`StoreReplayStore` a
:class:`~portcullis.approval.ReplayStore`; the pin, review and ticket stores have the methods
of the pin rules (:class:`~portcullis.pins.Pin`), :class:`~portcullis.reviews.ReviewStore` and
the ticket rules of the emergency path), so callers change only where they construct a
store: :func:`open_state` returns them all for the configured URL.

Concurrency: audit appends serialise on a PostgreSQL advisory lock (SQLite: ``BEGIN
IMMEDIATE``) and the sequence number is the primary key, so two hosts can never fork the
chain; claiming a code or a ticket is one conditional INSERT/UPSERT decided by a unique
constraint, never a read-modify-write.

The chain head is derived from the table (the highest sequence number), not kept in a
separately writable anchor. An administrator who can bypass the triggers can still cut records
off the end unnoticed, as with any unkeyed chain; compare with a mirror
(:class:`~portcullis.audit.HttpAuditSink`) to catch that.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydantic_core
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from portcullis.approval import FileReplayStore, ReplayStore, replay_store_path
from portcullis.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    AuditRecord,
    AuditSink,
    AuditTrail,
    VerifyReport,
    canonical_json,
    chain_fields,
)
from portcullis.errors import ConfigurationError, PolicyRefusal, PortcullisError, TransientError
from portcullis.incidents import TicketUse
from portcullis.pins import Pin
from portcullis.reviews import CloseRequest, PostIncidentReview, ReviewBook
from portcullis.settings import Settings

metadata = sa.MetaData()

#: One row per audit record. ``body`` is the canonical JSON of the record without ``hash``,
#: exactly the bytes :func:`~portcullis.audit.record_hash` hashes; the other columns repeat
#: parts of it for queries and for the chain links checked by :meth:`StoreAuditLog.verify`.
audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text),
    sa.Column("app", sa.Text),
    sa.Column("environment", sa.Text),
    sa.Column("digest", sa.Text),
    sa.Column("body", sa.LargeBinary, nullable=False),
)

#: The last accepted TOTP time step of each approver.
totp_used = sa.Table(
    "totp_used",
    metadata,
    sa.Column("approver", sa.Text, primary_key=True),
    sa.Column("step", sa.BigInteger, nullable=False),
)

pins = sa.Table(
    "pins",
    metadata,
    sa.Column("app", sa.Text, primary_key=True),
    sa.Column("environment", sa.Text, primary_key=True),
    sa.Column("pin", sa.Text, nullable=False, comment="the Pin as JSON"),
)

reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("review_id", sa.Text, nullable=False, unique=True),
    sa.Column("ticket", sa.Text, nullable=False, index=True),
    sa.Column("review", sa.Text, nullable=False, comment="the PostIncidentReview as opened"),
    sa.Column("closed_at", sa.Text),
    sa.Column("closed_by", sa.Text),
    sa.Column("notes", sa.Text),
)

#: Emergency promotions a ticket served: slot n is its (n+1)-th; the unique slot is what stops
#: two hosts from both taking a ticket's last allowed promotion.
ticket_runs = sa.Table(
    "ticket_runs",
    metadata,
    sa.Column("ticket", sa.Text, primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.UniqueConstraint("ticket", "run_id"),
)

ticket_reauthorisations = sa.Table(
    "ticket_reauthorisations",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("ticket", sa.Text, nullable=False, index=True),
    sa.Column("by", sa.Text, nullable=False),
    sa.Column("at", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

#: What the build side's role may do: append audit records (a build is part of the trail)
#: and read them, nothing else (no codes, pins, reviews or tickets).
BUILD_PRIVILEGES: dict[str, str] = {"audit_records": "SELECT, INSERT"}

#: What the deploy flows' role may do on PostgreSQL, table by table (see :func:`install_schema`).
FLOW_PRIVILEGES: dict[str, str] = {
    "audit_records": "SELECT, INSERT",
    "totp_used": "SELECT, INSERT, UPDATE",
    "pins": "SELECT, INSERT, UPDATE, DELETE",
    "reviews": "SELECT, INSERT, UPDATE",
    "ticket_runs": "SELECT, INSERT",
    "ticket_reauthorisations": "SELECT, INSERT",
}

# Run through the driver with parameters: "%%" is a literal "%".
_APPEND_ONLY_SQL = """
CREATE OR REPLACE FUNCTION portcullis_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_records is append-only: %% refused', TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;
DROP TRIGGER IF EXISTS audit_records_no_change ON audit_records;
CREATE TRIGGER audit_records_no_change BEFORE UPDATE OR DELETE ON audit_records
  FOR EACH ROW EXECUTE FUNCTION portcullis_audit_append_only();
DROP TRIGGER IF EXISTS audit_records_no_truncate ON audit_records;
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
  FOR EACH STATEMENT EXECUTE FUNCTION portcullis_audit_append_only();
"""

_SQLITE_APPEND_ONLY = tuple(
    f"CREATE TRIGGER IF NOT EXISTS audit_records_no_{op.lower()} BEFORE {op} ON audit_records "
    f"BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: {op} refused'); END"
    for op in ("UPDATE", "DELETE")
)

#: Key of the PostgreSQL advisory lock that serialises audit appends across hosts.
_AUDIT_LOCK_KEY = 0x706F7274  # "port"

_HEAD_WARNING = (
    "the head is the newest row: records cut off the end by someone who can bypass the "
    "append-only triggers go unnoticed unless a mirror is compared"
)

_BATCH = 5000

#: Records one process of a parallel :meth:`StoreAuditLog.verify` checks at a time.
_SPAN = 25_000


def _parsed_json_encoder() -> Callable[[Any], str]:
    """:func:`~portcullis.audit.canonical_json`'s serialisation (as text) for parsed JSON.

    json.dumps builds an encoder per call; verifying a long chain calls this per record, so
    build the C encoder once. No cycle check: what JSON parsing returns has no cycles.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the same output, more slowly
        return json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode
    encode = make(None, None, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    return lambda value: "".join(encode(value, 0))


_CANONICAL = _parsed_json_encoder()

_RECORD_KEYS = frozenset(AuditRecord.model_fields) - {"hash"}


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_engine(url: URL) -> Engine:
    database = url.database
    if database and database != ":memory:":
        path = Path(database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The file holds used codes and the audit chain: owner only, from the first byte.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, say when a transaction starts (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front: a reader that upgrades later could deadlock,
        # and an append must read the head and write after it with nothing in between.
        # Readers take none (WAL gives them a snapshot), so a long verify blocks no append.
        reading = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


_READ_ONLY = "portcullis_read_only"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def engine_for(url: str | URL, *, create_schema: bool | None = None) -> Engine:
    """A (cached, per process) engine for ``url``; creates the SQLite schema on first use.

    Args:
        url: ``sqlite:///PATH`` or ``postgresql+psycopg://ROLE@HOST:PORT/DB`` (the password
            from the URL object or ``PGPASSWORD``).
        create_schema: create missing tables; default only for SQLite (on PostgreSQL the
            schema belongs to the administrator, see :func:`install_schema`).
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    key = parsed.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            if parsed.get_backend_name() == "sqlite":
                engine = _sqlite_engine(parsed)
            elif parsed.get_backend_name() == "postgresql":
                engine = sa.create_engine(parsed, pool_pre_ping=True)
            else:
                raise ConfigurationError(
                    f"unsupported state store {parsed.render_as_string()}",
                    hint="use sqlite:///PATH or postgresql+psycopg://ROLE@HOST:PORT/DB",
                )
            _retry_when_unreachable(engine)
            if create_schema if create_schema is not None else _is_sqlite(engine):
                install_schema(engine)
            _engines[key] = engine
    return engine


def _retry_when_unreachable(engine: Engine) -> None:
    """Raise :class:`TransientError` (retried) when the database cannot be reached or is busy.

    Refusals (permission denied, the append-only triggers) stay what they are.
    """
    where = engine.url.render_as_string(hide_password=True)

    @sa.event.listens_for(engine, "handle_error")
    def _transient(context: sa.engine.ExceptionContext) -> BaseException | None:
        if isinstance(context.sqlalchemy_exception, sa.exc.OperationalError | sa.exc.InterfaceError):
            detail = str(context.original_exception).strip().splitlines()
            return TransientError(
                f"the state store {where} is unreachable or busy: "
                f"{detail[0] if detail else type(context.original_exception).__name__}",
                hint="check that the database runs and PORTCULLIS_STATE_URL points at it",
            )
        return None


def install_schema(engine: Engine, grants: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Create the tables (idempotent); on PostgreSQL also the append-only triggers and grants.

    Run as the role that should own the tables (an administrator), never as a flows' role.

    Args:
        engine: an engine logged in as the owner.
        grants: PostgreSQL role -> its privileges per table (e.g. :data:`FLOW_PRIVILEGES`);
            whatever else a listed role held on these tables is revoked.
    """
    metadata.create_all(engine)
    with engine.begin() as conn:
        if _is_sqlite(engine):
            # Whoever owns the file can drop these; they stop a careless statement, and
            # verify() catches the rest.
            for statement in _SQLITE_APPEND_ONLY:
                conn.exec_driver_sql(statement)
            return
        conn.exec_driver_sql(_APPEND_ONLY_SQL)
        for name, privileges in (grants or {}).items():
            role = conn.dialect.identifier_preparer.quote(name)
            for table in metadata.tables:
                conn.exec_driver_sql(f"REVOKE ALL ON {table} FROM {role}")
            for table, allowed in privileges.items():
                conn.exec_driver_sql(f"GRANT {allowed} ON {table} TO {role}")
                if "INSERT" in allowed and "id" in metadata.tables[table].c:
                    conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE {table}_id_seq TO {role}")


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection in a read-only transaction (on SQLite: one that takes no write lock)."""
    with engine.connect().execution_options(**{_READ_ONLY: True}) as conn, conn.begin():
        yield conn


def _insert(engine: Engine, table: sa.Table) -> Any:
    """The dialect's INSERT (both have ON CONFLICT)."""
    return (sqlite.insert if _is_sqlite(engine) else postgresql.insert)(table)


class StoreAuditLog(AuditTrail):
    """The hash-chained audit trail in a database table, with optional mirrors.

    Args:
        engine: the state store.
        mirrors: sinks every record is copied to after it is committed.
        clock: source of "now"; injectable for tests.
    """

    def __init__(
        self,
        engine: Engine,
        mirrors: Sequence[AuditSink] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.mirrors = tuple(mirrors)
        self._clock = clock

    @property
    def location(self) -> str:
        """The store's URL, without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _appending(self) -> Iterator[tuple[Connection, int, str]]:
        """A transaction holding the append lock, with the next sequence number and link."""
        with self.engine.begin() as conn:
            if not _is_sqlite(self.engine):
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_AUDIT_LOCK_KEY)))
            head = conn.execute(
                sa.select(audit_records.c.seq, audit_records.c.hash)
                .order_by(audit_records.c.seq.desc())
                .limit(1)
            ).first()
            if head is None:
                yield conn, 0, GENESIS_HASH
            else:
                yield conn, head.seq + 1, head.hash

    @staticmethod
    def _row(body: dict[str, Any]) -> dict[str, Any]:
        """The table row of a record given as its JSON fields (``hash`` included)."""
        without_hash = {k: v for k, v in body.items() if k != "hash"}
        return {
            "seq": body["seq"],
            "prev_hash": body["prev_hash"],
            "hash": body["hash"],
            "event": body["event"],
            "run_id": body["run_id"],
            "app": body["app"],
            "environment": body["environment"],
            "digest": body["digest"],
            "body": canonical_json(without_hash),
        }

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Chain ``entry`` to the newest record in the table, commit it, then mirror it.

        Raises:
            TransientError: a mirror did not take the record (the store has it).
        """
        with self._appending() as (conn, seq, prev):
            fields = chain_fields(entry, seq, self._clock(), prev)
            conn.execute(audit_records.insert().values(self._row(fields)))
        record = AuditRecord.model_validate(fields)
        for mirror in self.mirrors:
            mirror.emit(record)
        return record

    def import_records(self, lines: Iterable[bytes]) -> int:
        """Copy a verified JSONL log's lines into this (empty) store, unchanged.

        Returns:
            how many records were imported.

        Raises:
            PolicyRefusal: the store already holds records (chains are not merged).
        """
        count = 0
        with self._appending() as (conn, seq, _prev):
            if seq != 0:
                raise PolicyRefusal(
                    f"the audit store {self.location} already holds {seq} record(s)",
                    hint="import into an empty store; two chains cannot be merged",
                )
            batch: list[dict[str, Any]] = []
            for raw in lines:
                if not raw.strip():
                    continue
                batch.append(self._row(pydantic_core.from_json(raw)))
                if len(batch) == 5000:
                    conn.execute(audit_records.insert(), batch)
                    count += len(batch)
                    batch = []
            if batch:
                conn.execute(audit_records.insert(), batch)
                count += len(batch)
        return count

    def _batches(self) -> Iterator[Sequence[Any]]:
        """(seq, prev_hash, hash, body) of every record in order, in batches from one snapshot.

        Through the driver's own cursor (server-side on PostgreSQL): SQLAlchemy's row
        processing would cost as much as checking a record.
        """
        sql = "SELECT seq, prev_hash, hash, body FROM audit_records ORDER BY seq"
        with reading(self.engine) as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            if _is_sqlite(self.engine):
                cursor = dbapi.cursor()
            else:
                # Binary: bodies arrive as they are stored, not hex-encoded by the server.
                cursor = dbapi.cursor(name="portcullis_audit_scan", binary=True)
            try:
                cursor.execute(sql)
                while batch := cursor.fetchmany(_BATCH):
                    yield batch
            finally:
                cursor.close()

    def records(self) -> list[AuditRecord]:
        """Every record in order (does not verify the chain: use :meth:`verify`)."""
        return [
            AuditRecord.model_validate({**pydantic_core.from_json(body), "hash": digest})
            for batch in self._batches()
            for _seq, _link, digest, body in batch
        ]

    def run_records(self, run_id: str) -> list[AuditRecord]:
        """One flow run's records, in order, by the table's ``run_id`` column."""
        query = (sa.select(audit_records.c.hash, audit_records.c.body)
                 .where(audit_records.c.run_id == run_id).order_by(audit_records.c.seq))
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [AuditRecord.model_validate({**pydantic_core.from_json(body), "hash": digest})
                for digest, body in rows]

    def verify(self, workers: int = 1) -> VerifyReport:
        """Verify every record exactly as the JSONL verifier does, reading from the table.

        Each record's ``hash`` must equal :func:`~portcullis.audit.record_hash` of its
        fields (the stored body must be their canonical JSON), its sequence number must be its
        position and its ``prev_hash`` the hash of the record before. The head is the newest
        row, so there is no anchor to compare with.

        Args:
            workers: processes that check spans of the chain side by side (each reads its own
                span; on PostgreSQL all from the same snapshot); the links between spans are
                checked here. 1: everything in this process.

        Returns:
            a report naming the first broken record (its 0-based position).
        """
        if workers > 1:
            parallel = self._verify_parallel(workers)
            if parallel is not None:
                return parallel
        # Sequential: the reference, and the one that explains a broken record.
        prev = GENESIS_HASH
        count = 0
        for batch in self._batches():
            bad = _first_unverified(batch, count, prev)
            if bad is not None:
                index = count + bad
                reason = _check_row(index, batch[bad], batch[bad - 1][2] if bad else prev)
                return VerifyReport(ok=False, count=index, first_broken=index, reason=reason)
            count += len(batch)
            prev = batch[-1][2]
        return VerifyReport(ok=True, count=count, warnings=(_HEAD_WARNING,))

    def _verify_parallel(self, workers: int) -> VerifyReport | None:
        """The report when every span verifies and links to the one before; None when the
        chain is short, or something is wrong (the sequential check then finds and explains
        the first broken record)."""
        url = self.engine.url.render_as_string(hide_password=False)
        sqlite = _is_sqlite(self.engine)
        options: dict[str, Any] = (
            {_READ_ONLY: True} if sqlite else {"isolation_level": "REPEATABLE READ"})
        with self.engine.connect().execution_options(**options) as conn, conn.begin():
            # On PostgreSQL every process reads this transaction's snapshot: one chain.
            snapshot = None if sqlite else str(
                conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one())
            count = conn.execute(sa.select(sa.func.count()).select_from(audit_records)).scalar_one()
            if count < 2 * _SPAN:
                return None
            spans = [(url, lo, min(lo + _SPAN, count), snapshot) for lo in range(0, count, _SPAN)]
            # fork: the children need none of this process's state but the code (and forking
            # is what keeps their start cheap); each opens its own connection.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                results = list(pool.map(_verify_span, spans))
        prev = GENESIS_HASH
        for first_link, last_hash in results:
            if first_link != prev or last_hash is None:
                return None
            prev = last_hash
        return VerifyReport(ok=True, count=count, warnings=(_HEAD_WARNING,))


def _verify_span(args: tuple[str, int, int, str | None]) -> tuple[str | None, str | None]:
    """(link of the first record, hash of the last) of records ``lo`` to ``hi`` - 1 when
    each passes its own checks and links to the one before; (None, None) otherwise.

    Runs in a forked process: it opens its own connection (never one inherited from the
    parent's pool) and, on PostgreSQL, reads the parent's exported ``snapshot``.
    """
    url, lo, hi, snapshot = args
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    options: dict[str, Any] = {} if snapshot is None else {"isolation_level": "REPEATABLE READ"}
    try:
        with engine.connect().execution_options(**options) as conn, conn.begin():
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            if snapshot is not None:
                # From pg_export_snapshot(), not from a user; the statement takes no parameter.
                conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                cursor = dbapi.cursor(name="portcullis_audit_span", binary=True)
                cursor.execute("SELECT seq, prev_hash, hash, body FROM audit_records "
                               "WHERE seq >= %s AND seq < %s ORDER BY seq", (lo, hi))
            else:
                cursor = dbapi.cursor()
                cursor.execute("SELECT seq, prev_hash, hash, body FROM audit_records "
                               "WHERE seq >= ? AND seq < ? ORDER BY seq", (lo, hi))
            first_link: str | None = None
            prev: str | None = None
            index = lo
            while batch := cursor.fetchmany(_BATCH):
                if first_link is None:
                    first_link = prev = batch[0][1]
                assert prev is not None
                if _first_unverified(batch, index, prev) is not None:
                    return None, None
                index += len(batch)
                prev = batch[-1][2]
            cursor.close()
            if index != hi:
                return None, None  # records of the span are missing
            return first_link, prev
    finally:
        engine.dispose()


def _first_unverified(batch: Sequence[Sequence[Any]], start: int, prev: str) -> int | None:
    """Position in ``batch`` of the first record that fails a check, or None.

    The fast path of :func:`_check_row`: the same checks without the explanations, with the
    names it calls bound locally (this loop is what verify throughput is made of).
    """
    sha256, parse, canonical, keys = hashlib.sha256, pydantic_core.from_json, _CANONICAL, _RECORD_KEYS
    for offset, (seq, link, digest, body) in enumerate(batch):
        if (
            type(body) is not bytes
            or seq != start + offset
            or link != prev
            or sha256(body).hexdigest() != digest
        ):
            return offset
        fields = parse(body)
        if (
            type(fields) is not dict
            or fields.keys() != keys
            or fields["seq"] != seq
            or fields["prev_hash"] != link
            or canonical(fields).encode("utf-8") != body
        ):
            return offset
        prev = digest
    return None


def _check_row(index: int, row: Sequence[Any], prev_hash: str) -> str:
    """Why the record at ``index`` is broken: the same rules as the JSONL check."""
    seq, link, digest, body = row
    # SQLite keeps whatever type a statement wrote, so an edit can change the type too.
    if not isinstance(body, bytes) or not isinstance(seq, int):
        return "a column holds a value of the wrong type: the record was edited"
    if hashlib.sha256(body).hexdigest() != digest:
        return "its content does not match its hash: the record was edited"
    try:
        fields = pydantic_core.from_json(body)
    except ValueError:
        return "not valid JSON (the record was edited or damaged)"
    if not isinstance(fields, dict) or fields.keys() != _RECORD_KEYS:
        return "not a valid audit record: its fields were changed"
    if canonical_json(fields) != body:
        return "its content is not in canonical form: the record was edited"
    if fields["seq"] != seq or fields["prev_hash"] != link:
        return "its sequence number or link column differs from its content: edited"
    if seq > index:
        return f"it has sequence number {seq}: {seq - index} record(s) before it were deleted"
    if seq < index:
        return f"it has sequence number {seq}: records were reordered or duplicated"
    if link != prev_hash:
        return (
            "it does not chain to the record before it: that record was replaced, "
            "or records were deleted or reordered"
        )
    return "it fails a check the explanation does not cover"


class StoreReplayStore(ReplayStore):
    """Used TOTP steps in the shared store: a code burned on one host is burned on all."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim(self, approver: str, step: int) -> bool:
        """See :meth:`~portcullis.approval.ReplayStore.claim`; one atomic conditional upsert."""
        insert = _insert(self.engine, totp_used).values(approver=approver, step=step)
        statement = insert.on_conflict_do_update(
            index_elements=[totp_used.c.approver],
            set_={"step": insert.excluded.step},
            where=totp_used.c.step < insert.excluded.step,
        ).returning(totp_used.c.step)
        with self.engine.begin() as conn:
            return conn.execute(statement).first() is not None


class StorePinStore:
    """Environment pins (:class:`~portcullis.pins.Pin`) in the shared store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, app: str, environment: str) -> Pin | None:
        """The pin on ``app`` in ``environment``, if any."""
        with reading(self.engine) as conn:
            text = conn.execute(
                sa.select(pins.c.pin).where(pins.c.app == app, pins.c.environment == environment)
            ).scalar_one_or_none()
        return None if text is None else Pin.model_validate_json(text)

    def all(self) -> list[Pin]:
        """Every pin in force."""
        with reading(self.engine) as conn:
            texts = conn.execute(
                sa.select(pins.c.pin).order_by(pins.c.app, pins.c.environment)
            ).scalars().all()
        return [Pin.model_validate_json(text) for text in texts]

    def pin(self, pin: Pin) -> None:
        """Set (or replace) a pin."""
        insert = _insert(self.engine, pins).values(
            app=pin.app, environment=pin.environment, pin=pin.model_dump_json()
        )
        with self.engine.begin() as conn:
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[pins.c.app, pins.c.environment],
                    set_={"pin": insert.excluded.pin},
                )
            )

    def clear(self, app: str, environment: str) -> Pin:
        """Remove the pin and return it; refuses when there is none."""
        with self.engine.begin() as conn:
            text = conn.execute(
                pins.delete()
                .where(pins.c.app == app, pins.c.environment == environment)
                .returning(pins.c.pin)
            ).scalar_one_or_none()
        if text is None:
            raise PolicyRefusal(f"{app} in {environment} is not pinned")
        return Pin.model_validate_json(text)


def _review(row: sa.Row[Any]) -> PostIncidentReview:
    review = PostIncidentReview.model_validate_json(row.review)
    if row.closed_at is None:
        return review
    return review.model_copy(
        update={
            "closed_at": datetime.fromisoformat(row.closed_at),
            "closed_by": row.closed_by,
            "notes": row.notes,
        }
    )


class StoreReviewStore(ReviewBook):
    """Post-incident reviews in the shared store (the rules are :class:`ReviewBook`'s)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def reviews(self) -> tuple[PostIncidentReview, ...]:
        """Every review, open and closed, in the order they were opened."""
        with reading(self.engine) as conn:
            rows = conn.execute(sa.select(reviews).order_by(reviews.c.id)).all()
        return tuple(_review(row) for row in rows)

    def _add(self, review: PostIncidentReview) -> PostIncidentReview:
        insert = _insert(self.engine, reviews).values(
            review_id=review.review_id, ticket=review.ticket, review=review.model_dump_json()
        )
        with self.engine.begin() as conn:
            conn.execute(insert.on_conflict_do_nothing(index_elements=[reviews.c.review_id]))
            row = conn.execute(
                sa.select(reviews).where(reviews.c.review_id == review.review_id)
            ).one()
        return _review(row)

    def _close(self, request: CloseRequest) -> list[PostIncidentReview]:
        # One conditional UPDATE: two hosts closing at once cannot both close a review.
        with self.engine.begin() as conn:
            rows = conn.execute(
                reviews.update()
                .where(reviews.c.ticket == request.ticket, reviews.c.closed_at.is_(None))
                .values(
                    closed_at=request.closed_at.isoformat(),
                    closed_by=request.closed_by,
                    notes=request.notes,
                )
                .returning(*reviews.c)
            ).all()
        return [_review(row) for row in sorted(rows, key=lambda r: r.id)]


class StoreTicketUseStore:
    """Emergency ticket use in the shared store (the methods of
    :class:`~portcullis.incidents.TicketUse`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def _read(conn: Connection, key: str) -> TicketUse:
        runs = conn.execute(
            sa.select(ticket_runs.c.run_id)
            .where(ticket_runs.c.ticket == key)
            .order_by(ticket_runs.c.slot)
        ).scalars().all()
        grants = conn.execute(
            sa.select(
                ticket_reauthorisations.c.by,
                ticket_reauthorisations.c.at,
                ticket_reauthorisations.c.reason,
            )
            .where(ticket_reauthorisations.c.ticket == key)
            .order_by(ticket_reauthorisations.c.id)
        ).all()
        return TicketUse(
            ticket=key,
            runs=tuple(runs),
            reauthorisations=tuple({"by": g.by, "at": g.at, "reason": g.reason} for g in grants),
        )

    def get(self, ticket: str) -> TicketUse:
        """What ``ticket`` has served so far."""
        with reading(self.engine) as conn:
            return self._read(conn, ticket.strip().upper())

    def claim(self, ticket: str, run_id: str) -> TicketUse:
        """Let ``ticket`` serve the emergency promotion ``run_id`` (idempotent per run).

        The run takes the next free slot; the slot's uniqueness decides a race between hosts,
        and the loser re-reads and is refused when no slot is left.

        Raises:
            PolicyRefusal: the ticket already served as many promotions as it is allowed.
        """
        key = ticket.strip().upper()
        while True:
            with self.engine.begin() as conn:
                use = self._read(conn, key)
                if run_id in use.runs:
                    return use
                if len(use.runs) >= use.allowed:
                    raise PolicyRefusal(
                        f"ticket {key} already served emergency promotion(s) "
                        f"{', '.join(use.runs)}; one ticket opens one emergency promotion",
                        hint=f"an on-call approver may re-authorise it: python -m portcullis "
                        f"reauthorise-ticket {key} --approver ID --code CODE --reason WHY",
                    )
                inserted = conn.execute(
                    _insert(self.engine, ticket_runs)
                    .values(ticket=key, slot=len(use.runs), run_id=run_id)
                    .on_conflict_do_nothing()
                    .returning(ticket_runs.c.slot)
                ).first()
                if inserted is not None:
                    return use.model_copy(update={"runs": (*use.runs, run_id)})

    def reauthorise(self, ticket: str, by: str, reason: str, at: datetime) -> TicketUse:
        """Allow ``ticket`` one more emergency promotion; ``by`` must be a verified person."""
        key = ticket.strip().upper()
        if not reason.strip():
            raise PolicyRefusal("a ticket re-authorisation needs a reason")
        with self.engine.begin() as conn:
            conn.execute(
                ticket_reauthorisations.insert().values(
                    ticket=key, by=by, at=at.astimezone(UTC).isoformat(), reason=reason.strip()
                )
            )
            return self._read(conn, key)


def replay_store_for(audit: AuditTrail) -> ReplayStore:
    """Where codes are burned for decisions recorded in ``audit``: the same store's table, or
    for a JSONL log the file next to it (one-host setups and tests)."""
    audit = audit.underlying
    if isinstance(audit, StoreAuditLog):
        return StoreReplayStore(audit.engine)
    if isinstance(audit, AuditLog):
        return FileReplayStore(replay_store_path(audit.path))
    raise ConfigurationError(f"no used-code store is known for the audit trail {audit.location}")


@dataclass(frozen=True)
class State:
    """The shared stores of one state database."""

    engine: Engine
    replay: StoreReplayStore
    pins: StorePinStore
    reviews: StoreReviewStore
    tickets: StoreTicketUseStore

    def audit_log(self, mirrors: Sequence[AuditSink] = ()) -> StoreAuditLog:
        """The audit trail, copying each record to ``mirrors`` after it is committed."""
        return StoreAuditLog(self.engine, mirrors=mirrors)


def open_state_url(url: str | URL) -> State:
    """The stores of the database at ``url`` (see :func:`engine_for`)."""
    engine = engine_for(url)
    return State(
        engine=engine,
        replay=StoreReplayStore(engine),
        pins=StorePinStore(engine),
        reviews=StoreReviewStore(engine),
        tickets=StoreTicketUseStore(engine),
    )


def open_state(settings: Settings) -> State:
    """The stores of this worker's configured database (``PORTCULLIS_STATE_URL``).

    Args:
        settings: this worker's settings.
    """
    return open_state_url(settings.state_database_url)


def check_readable(state: State) -> None:
    """Fail early, naming the store, when the database cannot be reached or read."""
    try:
        with reading(state.engine) as conn:
            conn.execute(sa.select(sa.func.count()).select_from(audit_records))
    except sa.exc.SQLAlchemyError as exc:
        raise PortcullisError(
            f"the state store {state.engine.url.render_as_string(hide_password=True)} cannot "
            f"be read: {exc.__class__.__name__}: {str(exc).splitlines()[0]}",
            hint="check PORTCULLIS_STATE_URL, the password, and that the schema is installed",
        ) from None


__all__ = [
    "BUILD_PRIVILEGES",
    "FLOW_PRIVILEGES",
    "State",
    "StoreAuditLog",
    "StorePinStore",
    "StoreReplayStore",
    "StoreReviewStore",
    "StoreTicketUseStore",
    "check_readable",
    "engine_for",
    "install_schema",
    "metadata",
    "open_state",
    "open_state_url",
    "replay_store_for",
]
