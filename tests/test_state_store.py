"""The shared state store against a real SQLite file and a real PostgreSQL cluster.

Given one store that several deploy workers use, when they append audit records, burn codes,
pin environments, open reviews and claim tickets, then they see one truth: one hash chain that
verifies exactly as the JSONL log does, a code or ticket used once across hosts, and (on
PostgreSQL) audit records that the flows' role cannot change and an administrator cannot
change unnoticed.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pyotp
import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.engine import URL

from infra.production import (
    BUILD_STATE_ROLE,
    DB_ADMIN,
    STATE_ROLE,
    ProductionConfig,
    _psql,
    _secrets,
    down,
    ensure_state_store,
    state_url,
)
from infra.registry import free_port
from portcullis import state
from portcullis.approval import (
    Approver,
    ApproverDirectory,
    FileReplayStore,
    replay_store_path,
    verify_requester,
)
from portcullis.audit import (
    AuditEntry,
    AuditLog,
    canonical_json,
    main,
    record_hash,
    verify_log,
)
from portcullis.errors import PolicyRefusal, TransientError
from portcullis.pins import Pin
from portcullis.settings import Settings
from portcullis.state import (
    FLOW_PRIVILEGES,
    StoreAuditLog,
    engine_for,
    install_schema,
    open_state,
    open_state_url,
    replay_store_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "ab" * 32
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]


@dataclass(frozen=True)
class Cluster:
    """A private PostgreSQL cluster set up the way infra.production sets it up."""

    config: ProductionConfig
    flows: URL
    admin: URL

    @property
    def flows_password(self) -> str:
        """The flows' role's password."""
        return str(self.flows.password)

    def new_database(self) -> tuple[URL, URL]:
        """A fresh state database: (the flows' URL, the admin's URL), passwords included."""
        name = f"state_{secrets.token_hex(4)}"
        _psql(
            self.config,
            str(self.admin.password),
            f"CREATE DATABASE {name} OWNER {DB_ADMIN};\n"
            f"REVOKE ALL ON DATABASE {name} FROM PUBLIC;\n"
            f"GRANT CONNECT ON DATABASE {name} TO {STATE_ROLE};\n",
        )
        admin = self.admin.set(database=name)
        install_schema(engine_for(admin, create_schema=False), {STATE_ROLE: FLOW_PRIVILEGES})
        return self.flows.set(database=name), admin


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the module, with the production state database and role."""
    # Under /tmp, not pytest's 0700 temp root: the postgres account must reach its files.
    state = Path(tempfile.mkdtemp(prefix="portcullis-state-"))
    config = ProductionConfig(state_dir=state, postgres_port=free_port())
    try:
        ensure_state_store(config)
        flows, admin = ensure_state_store(config)  # idempotent, as `up` must be
        yield Cluster(config, flows, admin)
    finally:
        down(config)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> URL:
    """A fresh, empty store in each backend (the flows' role on PostgreSQL)."""
    if request.param == "sqlite":
        return sa.make_url(f"sqlite:///{tmp_path / 'state.db'}")
    cluster: Cluster = request.getfixturevalue("cluster")
    flows, _admin = cluster.new_database()
    return flows


def ticking(start: datetime) -> Callable[[], datetime]:
    """A clock that moves one second per call."""
    calls = iter(range(10**9))
    return lambda: start + timedelta(seconds=next(calls))


def _entry(i: int, actor: str = "portcullis") -> AuditEntry:
    return AuditEntry(
        event="gate.passed", actor=actor, run_id=f"run-{i}", app="hello", environment="prod",
        digest=DIGEST, details={"i": i, "note": "ünïcode ✓", "nested": {"b": 1, "a": [1, 2]}},
    )


def _in_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """Run ``work(i)`` in ``count`` threads released together; results (or errors) by i."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each thread got
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- both backends --------------------------------------------------------------------------


def test_the_chain_is_the_one_the_jsonl_log_defines(store_url: URL, tmp_path: Path) -> None:
    log = StoreAuditLog(engine_for(store_url), clock=ticking(T0))
    appended = [log.append(_entry(i)) for i in range(5)]
    assert [r.seq for r in appended] == [0, 1, 2, 3, 4]
    assert all(r.hash == record_hash(r.fields()) for r in appended)
    assert all(b.prev_hash == a.hash for a, b in pairwise(appended))
    assert log.records() == appended
    report = log.verify()
    assert report.ok and report.count == 5
    # The same records written as JSONL verify with the file verifier: one definition.
    exported = tmp_path / "exported.jsonl"
    exported.write_bytes(b"".join(canonical_json(r.fields()) + b"\n" for r in appended))
    assert verify_log(exported).ok


def test_a_parallel_verify_agrees_with_the_sequential_one(
    store_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "_SPAN", 4)  # spans of 4 records: 19 records make 5 spans
    log = StoreAuditLog(engine_for(store_url), clock=ticking(T0))
    for i in range(19):
        log.append(_entry(i))
    report = log.verify(workers=2)
    assert report.ok and report.count == 19
    # A forged row the flows' role may insert: it chains to nothing, and verify names it.
    with log.engine.begin() as conn:
        conn.execute(sa.insert(state.audit_records).values(
            seq=19, prev_hash="0" * 64, hash="f" * 64, event="promotion.completed",
            body=b'{"forged":true}'))
    report = log.verify(workers=2)
    assert report == log.verify() and not report.ok and report.first_broken == 19


def test_a_used_code_is_refused_and_one_of_many_racing_claims_wins(store_url: URL) -> None:
    replay = open_state_url(store_url).replay
    assert replay.claim("dana", 100)
    assert not replay.claim("dana", 100)
    assert not replay.claim("dana", 99)
    assert replay.claim("dana", 101)
    assert replay.claim("erin", 100)  # per approver
    results = _in_threads(6, lambda _i: open_state_url(store_url).replay.claim("fay", 7))
    assert sorted(map(repr, results)) == ["False"] * 5 + ["True"]


def test_pins_are_set_replaced_and_cleared(store_url: URL) -> None:
    pins = open_state_url(store_url).pins
    assert pins.get("hello", "prod") is None
    first = Pin(app="hello", environment="prod", digest=DIGEST, pinned_by="dana", reason="bad")
    pins.pin(first)
    assert pins.get("hello", "prod") == first
    second = first.model_copy(update={"digest": "sha256:" + "cd" * 32, "reason": "worse"})
    pins.pin(second)
    assert pins.get("hello", "prod") == second
    assert pins.get("hello", "staging") is None
    assert pins.clear("hello", "prod") == second
    with pytest.raises(PolicyRefusal, match="not pinned"):
        pins.clear("hello", "prod")


def test_reviews_open_once_close_once_and_fall_overdue(store_url: URL) -> None:
    reviews = open_state_url(store_url).reviews
    opened = reviews.open_review(ticket="inc0010001", app="hello", environment="prod",
                                 digest=DIGEST, flow_run_id="run-1", now=T0,
                                 skipped_environments=("staging",))
    again = reviews.open_review(ticket="INC0010001", app="hello", environment="prod",
                                digest=DIGEST, flow_run_id="run-1", now=T0 + timedelta(hours=1))
    assert again == opened and opened.ticket == "INC0010001"
    reviews.open_review(ticket="INC0010002", app="hello", environment="prod", digest=DIGEST,
                        flow_run_id="run-2", now=T0 + timedelta(hours=2))
    assert [r.ticket for r in reviews.overdue(T0 + timedelta(hours=60))] == [
        "INC0010001", "INC0010002"]
    (closed,) = reviews.close_review("inc0010001", closed_by="dana", notes="held", now=T0)
    assert closed.closed_by == "dana" and closed.closed_at == T0
    with pytest.raises(PolicyRefusal, match="no open post-incident review"):
        reviews.close_review("INC0010001", closed_by="dana", notes="again")
    assert [r.ticket for r in reviews.overdue(T0 + timedelta(hours=60))] == ["INC0010002"]
    assert reviews.for_ticket("INC0010001") == (closed,)
    assert [r.ticket for r in reviews.reviews()] == ["INC0010001", "INC0010002"]


def test_a_ticket_serves_one_promotion_unless_reauthorised(store_url: URL) -> None:
    tickets = open_state_url(store_url).tickets
    assert tickets.claim("inc0010001", "run-1").runs == ("run-1",)
    assert tickets.claim("INC0010001", "run-1").runs == ("run-1",)  # a retried run keeps it
    with pytest.raises(PolicyRefusal, match="already served"):
        tickets.claim("INC0010001", "run-2")
    use = tickets.reauthorise("INC0010001", "olga", "second fix", T0)
    assert use.allowed == 2
    assert tickets.claim("INC0010001", "run-2").runs == ("run-1", "run-2")
    assert tickets.get("INC0010001").reauthorisations[0]["by"] == "olga"
    # Six runs racing for a fresh ticket: exactly one gets it.
    results = _in_threads(
        6, lambda i: open_state_url(store_url).tickets.claim("INC0010003", f"race-{i}"))
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert all(isinstance(r, PolicyRefusal) for r in results if r not in winners)
    assert len(tickets.get("INC0010003").runs) == 1


def _cli_url(url: URL, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL as a command line may carry it: the password goes through PGPASSWORD."""
    if url.password is not None:
        monkeypatch.setenv("PGPASSWORD", str(url.password))
    return url.set(password=None).render_as_string(hide_password=False)


def test_a_jsonl_log_is_imported_after_verifying_and_the_store_verifies(
    store_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    jsonl = AuditLog(tmp_path / "audit.jsonl", clock=ticking(T0))
    originals = [jsonl.append(_entry(i)) for i in range(30)]
    url = _cli_url(store_url, monkeypatch)
    assert main(["import", str(jsonl.path), "--to", url]) == 0
    assert main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "imported 30 record(s)" in out and "OK: 30 record(s)" in out
    store = open_state_url(store_url).audit_log()
    assert store.records() == originals
    # It continues the imported chain.
    assert store.append(_entry(30)).prev_hash == originals[-1].hash
    assert store.verify().ok
    # A second import would merge two chains: refused.
    assert main(["import", str(jsonl.path), "--to", url]) == 2
    assert "already holds 31 record(s)" in capsys.readouterr().err


def test_a_broken_jsonl_log_is_not_imported(
    store_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    jsonl = AuditLog(tmp_path / "audit.jsonl", clock=ticking(T0))
    for i in range(4):
        jsonl.append(_entry(i))
    lines = jsonl.path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"actor":"portcullis"', b'"actor":"mallory"')
    jsonl.path.write_bytes(b"".join(lines))
    url = _cli_url(store_url, monkeypatch)
    assert main(["import", str(jsonl.path), "--to", url]) == 1
    assert "BROKEN: record 2" in capsys.readouterr().out
    assert open_state_url(store_url).audit_log().verify().count == 0


def test_two_processes_appending_at_once_make_one_chain(store_url: URL) -> None:
    count = 150
    env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": str(store_url.password or "")}
    url = store_url.set(password=None).render_as_string(hide_password=False)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.state_appender", url, str(count), label],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for label in ("host-a", "host-b")
    ]
    for p in procs:  # both connected before either starts
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "done"
        assert p.wait(timeout=60) == 0
    log = open_state_url(store_url).audit_log()
    report = log.verify()
    assert report.ok and report.count == 2 * count
    records = log.records()
    assert [r.seq for r in records] == list(range(2 * count))
    by_actor = {a: [r.details["i"] for r in records if r.actor == a] for a in ("host-a", "host-b")}
    assert by_actor == {"host-a": list(range(count)), "host-b": list(range(count))}


# --- SQLite --------------------------------------------------------------------------------


def test_sqlite_refuses_changes_and_an_edit_past_the_triggers_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    log = open_state_url(url).audit_log()
    for i in range(5):
        log.append(_entry(i))
    engine = engine_for(url)
    for statement in ("UPDATE audit_records SET event = 'x'", "DELETE FROM audit_records"):
        with pytest.raises(sa.exc.IntegrityError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(statement)
    assert (tmp_path / "state.db").stat().st_mode & 0o077 == 0
    # Whoever owns the file can drop the triggers; the chain still names the edit.
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER audit_records_no_update")
        conn.exec_driver_sql(
            "UPDATE audit_records SET body = CAST(replace(body, 'portcullis', 'mallory') AS BLOB)"
            " WHERE seq = 3"
        )
    report = log.verify()
    assert not report.ok and report.first_broken == 3
    assert "does not match its hash" in report.reason
    monkeypatch.setattr(state, "_SPAN", 2)  # the parallel verify finds it too
    assert log.verify(workers=2) == report
    with engine.begin() as conn:  # a value of another type is caught as well
        conn.exec_driver_sql("UPDATE audit_records SET body = 'x' WHERE seq = 1")
    report = log.verify()
    assert not report.ok and report.first_broken == 1 and "wrong type" in report.reason
    assert main(["verify", url]) == 1
    assert "BROKEN: record 1 of sqlite:///" in capsys.readouterr().out


# --- PostgreSQL ----------------------------------------------------------------------------


def test_the_flows_role_can_only_append_even_after_a_careless_grant(cluster: Cluster) -> None:
    flows_url, admin_url = cluster.new_database()
    log = open_state_url(flows_url).audit_log()
    for i in range(3):
        log.append(_entry(i))
    flows = engine_for(flows_url)
    attempts = (
        "UPDATE audit_records SET event = 'x' WHERE seq = 1",
        "DELETE FROM audit_records WHERE seq = 2",
        "TRUNCATE audit_records",
    )
    for statement in attempts:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), \
                flows.begin() as conn:
            conn.exec_driver_sql(statement)
    # Someone grants too much later: the triggers still refuse.
    with engine_for(admin_url).begin() as conn:
        conn.exec_driver_sql(f"GRANT UPDATE, DELETE, TRUNCATE ON audit_records TO {STATE_ROLE}")
    for statement in attempts:
        with pytest.raises(sa.exc.ProgrammingError, match="append-only"), flows.begin() as conn:
            conn.exec_driver_sql(statement)
    # Nor can the role drop the triggers: it does not own the table.
    with pytest.raises(sa.exc.ProgrammingError, match="must be owner"), flows.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER audit_records_no_change ON audit_records")
    report = log.verify()
    assert report.ok and report.count == 3


def test_an_administrator_editing_a_record_is_named_by_verify(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flows_url, admin_url = cluster.new_database()
    log = open_state_url(flows_url).audit_log()
    for i in range(6):
        log.append(_entry(i))
    admin = engine_for(admin_url)
    with admin.begin() as conn:
        # An insider DBA switches the triggers off for the session and edits record 2.
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.exec_driver_sql(
            "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), "
            "'\"actor\":\"portcullis\"', '\"actor\":\"mallory\"'), 'UTF8') WHERE seq = 2"
        )
    report = log.verify()
    assert not report.ok and report.first_broken == 2
    assert "does not match its hash" in report.reason
    # ... and recomputes that record's hash: the next record no longer chains to it.
    with admin.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
        conn.exec_driver_sql(
            "UPDATE audit_records SET hash = encode(sha256(body), 'hex') WHERE seq = 2"
        )
    report = log.verify()
    assert not report.ok and report.first_broken == 3
    assert "does not chain to the record before it" in report.reason
    assert main(["verify", _cli_url(flows_url, monkeypatch)]) == 1
    assert "BROKEN: record 3 of postgresql+psycopg://" in capsys.readouterr().out


def test_two_deploy_workers_with_their_own_homes_share_codes_pins_and_tickets(
    cluster: Cluster, tmp_path: Path
) -> None:
    flows_url, _admin = cluster.new_database()

    def worker(home: str) -> Settings:
        return Settings(
            home=tmp_path / home,
            state_url=flows_url.set(password=None).render_as_string(hide_password=False),
            state_password=SecretStr(cluster.flows_password),
        )

    host_a, host_b = open_state(worker("a")), open_state(worker("b"))
    secret = pyotp.random_base32()
    directory = ApproverDirectory(approvers=(
        Approver(name="dana", groups=("sre",), totp_secret=SecretStr(secret)),))
    code = pyotp.TOTP(secret).at(T0)
    assert verify_requester(directory, "dana", code, T0, host_a.replay).name == "dana"
    with pytest.raises(PolicyRefusal, match="already used"):
        verify_requester(directory, "dana", code, T0, host_b.replay)

    host_a.pins.pin(Pin(app="hello", environment="prod", digest=DIGEST, pinned_by="dana",
                        reason="rolled back"))
    pin = host_b.pins.get("hello", "prod")
    assert pin is not None and pin.digest == DIGEST

    host_a.tickets.claim("INC0010009", "run-on-a")
    with pytest.raises(PolicyRefusal, match="already served"):
        host_b.tickets.claim("INC0010009", "run-on-b")

    host_a.audit_log().append(_entry(0, actor="host-a"))
    host_b.audit_log().append(_entry(1, actor="host-b"))
    assert [r.actor for r in host_a.audit_log().records()] == ["host-a", "host-b"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing local


def test_the_build_role_may_append_audit_records_and_nothing_else(cluster: Cluster) -> None:
    made = _secrets(cluster.config.state_dir)
    build = open_state_url(
        state_url(cluster.config, BUILD_STATE_ROLE, made.build_state_password))
    record = build.audit_log().append(_entry(0, actor="build-side"))
    assert build.audit_log().records()[-1] == record
    refused: list[Callable[[], object]] = [
        lambda: build.replay.claim("dana", 1),
        lambda: build.pins.pin(Pin(app="hello", environment="prod", digest=DIGEST,
                                   pinned_by="mallory", reason="x")),
        lambda: build.tickets.claim("INC0010001", "run-1"),
        lambda: build.reviews.reviews(),
    ]
    for attempt in refused:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            attempt()


def test_codes_are_burned_where_the_decisions_are_recorded(store_url: URL, tmp_path: Path) -> None:
    state = open_state_url(store_url)
    assert replay_store_for(state.audit_log()).claim("dana", 5)
    assert not state.replay.claim("dana", 5)  # the same table
    jsonl = AuditLog(tmp_path / "audit.jsonl")
    file_replay = replay_store_for(jsonl)
    assert isinstance(file_replay, FileReplayStore)
    assert file_replay.path == replay_store_path(jsonl.path)


def test_an_unreachable_store_is_a_transient_error() -> None:
    log = open_state_url(f"postgresql+psycopg://{STATE_ROLE}@127.0.0.1:{free_port()}/x").audit_log()
    with pytest.raises(TransientError, match="unreachable or busy"):
        log.append(_entry(0))
