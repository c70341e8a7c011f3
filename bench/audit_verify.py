"""Audit log verification throughput, append latency, and what a signed promotion record costs.

Run ``uv run python -m bench.audit_verify`` (``--records N``, default 100,000). It writes a log
of N records exactly as :class:`portcullis.audit.AuditLog` serialises them (realistic events;
one record in 50 carries a float, which takes the reference path), then measures:

* ``verify_log`` in one process and in one per CPU (at most 4, as the CLI does), and the same
  log through the reference check alone (the code before the fast path), records per second
  of wall time and of CPU time (the machine is shared: CPU time is the steadier figure);
* ``python -m portcullis.audit verify`` as a user runs it (interpreter start included);
* ``AuditLog.append`` latency (fsync of the line and of the anchor) on that full log;
* the signed promotion record, against a real registry started for the run: opening the
  environment's cosign key (scrypt), collecting the run's facts from the full log, signing
  and pushing the record as the promoter, and the next environment's check of it.
"""

from __future__ import annotations

import argparse
import os
import resource
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
from infra.registry import start_registry, stop_registry
from portcullis.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    AuditRecord,
    _check_line,
    canonical_json,
    default_anchor_path,
    record_hash,
    verify_log,
)
from portcullis.oci import RegistryClient
from portcullis.promotion_record import PromotionPredicate, sign_promotion, verify_promotion
from portcullis.signing.cosign_format import (
    decrypt_private_key,
    encrypt_private_key,
    generate_key_pair,
)
from tasks.promotion import run_facts, run_records

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "ab" * 32
EVENTS = [
    ("promotion.started", {"policy_sha256": "9f" * 32, "image": None, "commit": "HEAD"}),
    ("freeze.checked", {"stage": "run-start", "frozen": False,
                        "summary": "no change freeze for prod at 2026-11-30T19:00:00+00:00"}),
    ("verification.passed", {"stage": "before-approval", "checks": {
        "signature": "signed by key:c2bf77b05777d61e",
        "provenance": "file:///work/main main @ d0075b0baa46, key:c2bf77b05777d61e"}}),
    ("approval.accepted", {"claimed_approver": "alice", "verdict": "approve", "refusal": None,
                           "message": "accepted", "totp_step": 59_000_000, "state": "pending"}),
    ("lock.acquired", {"lock": "portcullis-deploy-prod"}),
    ("canary.step", {"weight": 20, "phase": "Running",
                     "summary": "traffic: canary 3168, baseline 12676 requests; errors 0 vs 1"}),
]


def run_of(seq: int) -> str:
    """The generated run a record belongs to (40 records per run)."""
    return f"run-{seq // 40:06d}"


def write_log(path: Path, count: int) -> None:
    """``count`` records serialised exactly as the writer does, chained, with their anchor."""
    prev, start = GENESIS_HASH, datetime(2026, 1, 1, tzinfo=UTC)
    with path.open("wb") as out:
        for seq in range(count):
            event, details = EVENTS[seq % len(EVENTS)]
            if seq % 50 == 49:
                details = {**details, "seconds": 0.0123 * seq}
            draft = AuditRecord(event=event, actor="alice" if "approval" in event else "portcullis",
                                run_id=run_of(seq), app="hello", environment="prod",
                                digest=DIGEST, commit="c" * 40, details=details, seq=seq,
                                at=start + timedelta(seconds=seq), prev_hash=prev, hash=GENESIS_HASH)
            body = draft.fields()
            body["hash"] = prev = record_hash(body)
            out.write(canonical_json(body) + b"\n")
    default_anchor_path(path).write_bytes(
        canonical_json({"count": count, "last_hash": prev}) + b"\n")


def reference_verify(path: Path) -> int:
    """The per-line check as it was before the fast path (parse, re-serialise, pydantic)."""
    prev = GENESIS_HASH
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            reason, prev = _check_line(index, raw, prev)
            if reason is not None:
                raise SystemExit(f"reference check refused record {index}: {reason}")
    return index + 1


def best(runs: int, fn: Callable[[], object]) -> tuple[float, float]:
    """Best wall time and best CPU time of ``runs`` calls (CPU time is what a busy, shared
    machine does not inflate)."""
    wall, cpu = [], []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time() + child_cpu()
        fn()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() + child_cpu() - started_cpu)
    return min(wall), min(cpu)


def child_cpu() -> float:
    """CPU seconds used by finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def promotion_record_costs(work: Path, log: AuditLog, rounds: int, run_id: str) -> list[tuple[str, str]]:
    """Time what a promotion record adds, against a real registry in token mode. ``run_id``
    is the newest run: its records sit near the tail, as a running promotion's do."""
    if shutil.which("docker-registry") is None:
        return [("promotion record", "skipped: docker-registry is not installed")]
    users = {"builder": "bench-build", "deployer": "bench-deploy", "promoter": "bench-promote"}
    registry = start_registry(work / "registry", users=users)
    try:
        from tests.support.registry_fixture import push_tiny_image

        key = generate_key_pair()
        pem = encrypt_private_key(key, "pw")
        with RegistryClient(registry.address, username="builder", password="bench-build") as builder:
            images = [push_tiny_image(builder, "portcullis/bench", f"v{i}", f"v{i}".encode())
                      for i in range(rounds)]
        open_key, facts, sign, verify = [], [], [], []
        with RegistryClient(registry.address, username="promoter", password="bench-promote") as promoter, \
                RegistryClient(registry.address, username="deployer", password="bench-deploy") as deployer:
            for image in images:
                t0 = time.perf_counter()
                opened = decrypt_private_key(pem, "pw")
                t1 = time.perf_counter()
                approvals, freeze, started = run_facts(run_records(log, run_id), ("alice",))
                t2 = time.perf_counter()
                predicate = PromotionPredicate(
                    kind="promotion", app="hello", environment="staging", image=str(image),
                    digest=image.digest, policy_sha256="9f" * 32, approvals=approvals, freeze=freeze,
                    started_at=started, run_id=run_id, completed_at=datetime.now(UTC))
                sign_promotion(promoter, image, predicate, opened)
                t3 = time.perf_counter()
                verify_promotion(deployer, image, "staging", [key.public_key()], app="hello")
                t4 = time.perf_counter()
                open_key.append(t1 - t0)
                facts.append(t2 - t1)
                sign.append(t3 - t2)
                verify.append(t4 - t3)
    finally:
        stop_registry(work / "registry")

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:8.1f} ms median, {max(values) * 1000:.1f} ms max"

    total = [a + b + c for a, b, c in zip(open_key, facts, sign, strict=True)]
    return [
        ("record: open promotion key (scrypt)", ms(open_key)),
        (f"record: run facts from {len(log.path.read_bytes().splitlines()):,}-record log", ms(facts)),
        ("record: sign + push as promoter", ms(sign)),
        ("record: added to a promotion (sum)", ms(total)),
        ("chain check: verify the record", ms(verify)),
    ]


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.audit_verify")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--appends", type=int, default=300)
    parser.add_argument("--promotions", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.records
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(tmp)
        path = work / "audit.jsonl"
        write_log(path, n)
        anchor = default_anchor_path(path)
        report = verify_log(path, anchor)
        assert report.ok and report.count == n, report
        fast, fast_cpu = best(3, lambda: verify_log(path, anchor))
        workers = min(os.cpu_count() or 1, 4)
        par, par_cpu = best(3, lambda: verify_log(path, anchor, workers=workers))
        slow, slow_cpu = best(1, lambda: reference_verify(path))
        cpu0, started = child_cpu(), time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "portcullis.audit", "verify", str(path)],
                             capture_output=True, text=True, check=False, cwd=ROOT)
        cli_seconds, cli_cpu = time.perf_counter() - started, child_cpu() - cpu0
        assert cli.returncode == 0, cli.stdout + cli.stderr
        cpu0, started = child_cpu(), time.perf_counter()
        subprocess.run([sys.executable, "-c", "import portcullis.audit"], check=True, cwd=ROOT)
        import_seconds, import_cpu = time.perf_counter() - started, child_cpu() - cpu0

        log = AuditLog(path)
        latencies = []
        for i in range(args.appends):
            t0 = time.perf_counter()
            log.append(AuditEntry(event="bench.append", actor="portcullis", run_id="bench",
                                  details={"i": i}))
            latencies.append(time.perf_counter() - t0)
        assert log.verify().ok

        def rate(seconds: float, cpu: float) -> str:
            return (f"{n / seconds:10,.0f} /s wall ({seconds:5.2f} s), "
                    f"{n / cpu:10,.0f} /s CPU ({cpu:5.2f} s)")

        rows = [
            (f"verify_log, {n:,} records, 1 process", rate(fast, fast_cpu)),
            (f"verify_log, {workers} processes (the CLI's default here)", rate(par, par_cpu)),
            ("reference check only (before this change)", rate(slow, slow_cpu)),
            ("python -m portcullis.audit verify (CLI)", rate(cli_seconds, cli_cpu)),
            ("  of which interpreter start + imports",
             f"{import_seconds:5.2f} s wall, {import_cpu:5.2f} s CPU"),
            ("CLI without start-up",
             rate(max(cli_seconds - import_seconds, 1e-9), max(cli_cpu - import_cpu, 1e-9))),
            (f"append p50 ({args.appends} appends, fsync)", f"{percentile(latencies, 0.5) * 1000:8.2f} ms"),
            ("append p99", f"{percentile(latencies, 0.99) * 1000:8.2f} ms"),
        ]
        rows += promotion_record_costs(work, log, args.promotions, run_of(n - 1))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  result")
    print(f"{'-' * width}  {'-' * 50}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    figure("audit verify, 1 process (JSONL)", rate(fast, fast_cpu).split("/s")[0].strip() + "/s",
           ">= 200,000 records/s", "about 30,000/s through the CLI")
    figure(f"audit verify, {workers} processes (JSONL)", rate(par, par_cpu).split("/s")[0].strip() + "/s",
           ">= 200,000 records/s", "about 30,000/s through the CLI")
    figure("audit append p99 (JSONL)", f"{percentile(latencies, 0.99) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
