"""How fast the audit chain verifies and appends: JSONL file, SQLite store, PostgreSQL store.

``uv run python -m bench.state_store [--records N] [--appends M] [--no-postgres]``

Builds one chain of N records (100,000 by default), writes it as a JSONL log with its anchor
and imports it into an SQLite store and a PostgreSQL store (a private cluster started under
/tmp the way ``infra.production`` starts one, stopped afterwards); times a full verify of each
(in process, the stores also with one process per CPU as the CLI does, and the JSONL log also
through the CLI as an operator runs it), then M appends on
top of the N records. Prints a table. Figures in records/s are wall-clock and, because the
machine is shared, also per CPU second of this process (what a free core would do).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.report import figure
from infra.production import ProductionConfig, down, ensure_state_store
from infra.registry import free_port
from portcullis.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    AuditTrail,
    VerifyReport,
    canonical_json,
    verify_log,
)
from portcullis.state import StoreAuditLog, engine_for

DIGEST = "sha256:" + "ab" * 32
START = datetime(2026, 1, 1, tzinfo=UTC)


def chain_lines(count: int) -> list[bytes]:
    """``count`` JSONL lines of one valid chain, shaped like a promotion's records."""
    events = ("gate.passed", "scan.verdict", "approval.accepted", "promotion.completed")
    lines = []
    prev = GENESIS_HASH
    for seq in range(count):
        # The fields AuditRecord.fields() produces, built directly: pydantic per record
        # would make building the data the slowest part of the benchmark.
        fields = {
            "actor": "portcullis",
            "app": "hello",
            "at": (START + timedelta(milliseconds=seq)).isoformat().replace("+00:00", "Z"),
            "commit": f"{seq:040x}",
            "details": {"stage": "before-approval", "seq": seq, "summary": "0 critical, 2 high"},
            "digest": DIGEST,
            "environment": "prod",
            "event": events[seq % len(events)],
            "prev_hash": prev,
            "run_id": f"run-{seq // 20:06d}",
            "seq": seq,
        }
        body = canonical_json(fields)
        prev = hashlib.sha256(body).hexdigest()
        lines.append(canonical_json({**fields, "hash": prev}) + b"\n")
    return lines


def timed_verify(verify: Callable[[], VerifyReport], count: int) -> tuple[float, float]:
    """(records/s wall-clock, records/s per CPU second) of one verify that must pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    report = verify()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not report.ok or report.count != count:
        raise SystemExit(f"verify failed: {report}")
    return count / wall, count / cpu


def cli_verify(path: Path, count: int) -> float:
    """records/s of ``python -m portcullis.audit verify PATH`` (interpreter start included)."""
    wall = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "portcullis.audit", "verify", str(path)],
        capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - wall
    if done.returncode != 0 or f"OK: {count} record(s)" not in done.stdout:
        raise SystemExit(f"CLI verify failed: {done.stdout}{done.stderr}")
    return count / wall


def append_latency(log: AuditTrail, appends: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds of ``appends`` appends, one at a time."""
    took = []
    for i in range(appends):
        entry = AuditEntry(event="bench.append", actor="portcullis", run_id=f"bench-{i}",
                           app="hello", environment="prod", digest=DIGEST, details={"i": i})
        start = time.perf_counter()
        log.append(entry)
        took.append((time.perf_counter() - start) * 1000)
    cuts = statistics.quantiles(took, n=100)
    return cuts[49], cuts[98]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.state_store")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    count: int = args.records

    work = Path(tempfile.mkdtemp(prefix="portcullis-bench-state-"))
    work.chmod(0o711)  # the postgres account must traverse it to its own directory
    pg = None if args.no_postgres else ProductionConfig(
        state_dir=work / "postgres", postgres_port=free_port())
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        print(f"building a chain of {count} records ...", file=sys.stderr)
        lines = chain_lines(count)

        jsonl = AuditLog(work / "audit.jsonl")
        jsonl.path.write_bytes(b"".join(lines))
        # The anchor AuditLog would have written: the chain's length and last hash.
        last_hash = lines[-1].rsplit(b'"hash":"', 1)[1][:64].decode()
        jsonl.anchor_path.write_bytes(
            canonical_json({"count": count, "last_hash": last_hash}) + b"\n")
        wall, cpu = timed_verify(lambda: verify_log(jsonl.path, jsonl.anchor_path), count)
        cli = cli_verify(jsonl.path, count)
        p50, p99 = append_latency(jsonl, args.appends)
        rows.append(("JSONL file", f"{wall:,.0f}", f"{cpu:,.0f}", f"{p50:.2f}", f"{p99:.2f}"))
        rows.append(("JSONL file, CLI", f"{cli:,.0f}", "-", "-", "-"))

        stores: list[tuple[str, StoreAuditLog]] = [
            ("SQLite store", StoreAuditLog(engine_for(f"sqlite:///{work / 'state.db'}")))]
        if pg is not None:
            print("starting PostgreSQL ...", file=sys.stderr)
            flows, _admin = ensure_state_store(pg)
            stores.append(("PostgreSQL store", StoreAuditLog(engine_for(flows))))
        workers = min(os.cpu_count() or 1, 4)  # what the CLI uses
        for name, store in stores:
            store.import_records(lines)
            wall, cpu = timed_verify(store.verify, count)
            # The CPU figure of the parallel verify counts the parent only: not comparable.
            parallel, _ = timed_verify(lambda store=store: store.verify(workers=workers), count)
            p50, p99 = append_latency(store, args.appends)
            rows.append((name, f"{wall:,.0f}", f"{cpu:,.0f}", f"{p50:.2f}", f"{p99:.2f}"))
            rows.append((f"{name}, {workers} processes", f"{parallel:,.0f}", "-", "-", "-"))
    finally:
        if pg is not None:
            down(pg)
        shutil.rmtree(work, ignore_errors=True)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\naudit chain of {count:,} records, {args.appends} appends; "
          f"{os.cpu_count()} CPUs, load average {load}\n")
    header = ("backend", "verify rec/s (wall)", "verify rec/s (per CPU s)",
              "append p50 ms", "append p99 ms")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    for backend, verify_rate, _per_cpu, _p50_ms, p99_ms in rows:
        figure(f"audit verify ({backend})", f"{verify_rate}/s", ">= 200,000 records/s",
               "about 30,000/s (JSONL, CLI)")
        if p99_ms != "-":
            figure(f"audit append p99 ({backend})", f"{p99_ms} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
