"""How long the board, DORA figures and chain verification take on a large audit trail.

``uv run python -m bench.board [APPS] [PROMOTIONS_PER_APP]`` writes a real hash-chained audit
log (default 50 apps x 40 promotions over dev/staging/prod, ~20 records per promotion, like a
real run's trail) and prints the time to verify it, build the board and compute DORA for all.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.report import figure
from portcullis.audit import AuditEntry, AuditLog
from portcullis.board import build_board, render_markdown, render_text
from portcullis.dora import all_figures

# What one promotion leaves behind besides its completion (names as the flows record them).
FILLER = ("requester.established", "freeze.checked", "chain.checked", "verification.passed",
          "change.listed", "approval.requested", "approval.accepted", "approval.granted",
          "lock.acquired", "freeze.checked", "verification.passed", "deploy.switched",
          "canary.step", "canary.step", "canary.promoted", "lock.released")


def main(apps: int = 50, per_app: int = 40) -> None:
    """Write the trail, then time the views."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        now = [start]
        log = AuditLog(Path(tmp) / "audit.jsonl", clock=lambda: now[0])
        written = time.perf_counter()
        commits: dict[str, datetime] = {}
        for i in range(per_app):
            for a in range(apps):
                env = ("dev", "staging", "prod")[i % 3]
                digest = f"sha256:{a:08x}{i:08x}" + "0" * 48
                commit = f"{a:020x}{i:020x}"
                commits[commit] = now[0] - timedelta(hours=3)
                run = f"run-{a}-{i}"
                for event in ("promotion.started", *FILLER):
                    now[0] += timedelta(seconds=1)
                    log.append(AuditEntry(event=event, actor="portcullis", run_id=run, app=f"app-{a}",
                                          environment=env, digest=digest, commit=commit))
                log.append(AuditEntry(event="promotion.completed", actor="portcullis", run_id=run,
                                      app=f"app-{a}", environment=env, digest=digest, commit=commit,
                                      details={"approved_by": ["alice", "bob"]}))
        written = time.perf_counter() - written
        t = time.perf_counter()
        assert log.verify().ok
        verified = time.perf_counter() - t
        t = time.perf_counter()
        records = log.records()
        parsed = time.perf_counter() - t
        t = time.perf_counter()
        board = build_board(records, [], at=now[0])
        markdown, text = render_markdown(board), render_text(board)
        built = time.perf_counter() - t
        t = time.perf_counter()
        figures = all_figures(records, since=start, until=now[0], commit_times=commits)
        dora = time.perf_counter() - t
        print(f"audit trail: {len(records)} records, {apps} apps ({log.path.stat().st_size / 1e6:.1f} MB), "
              f"written in {written:.1f}s")
        print(f"verify chain {verified:.2f}s; parse {parsed:.2f}s; board {built:.2f}s "
              f"({len(markdown) / 1e3:.0f} kB markdown, {len(text.splitlines())} terminal lines); "
              f"DORA for {len(figures)} app/environment pairs {dora:.2f}s")
        figure(f"board publish at {len(records):,} records (verify + parse + build)",
               f"{verified + parsed + built:.2f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
