"""The board and the DORA figures as pure functions of a hand-built audit trail.

Given a real hash-chained audit log written with a controlled clock (promotions, an approval
still waiting, a rollback with its pin, a failed canary), then the board shows what runs where
and who is waited for, and every DORA figure equals the one computed by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from portcullis.audit import AuditEntry, AuditLog, AuditRecord
from portcullis.board import build_board, cell_lines, render_markdown, render_text
from portcullis.dora import dora_figures, write_textfile
from portcullis.dora import render_markdown as dora_markdown
from portcullis.pins import Pin

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
D1, D2, D3, G1 = ("sha256:" + c * 64 for c in "123a")
C1, C2, C3 = ("a" * 40, "b" * 40, "c" * 40)
COMMIT_TIMES = {C1: T0, C2: T0 + timedelta(hours=20)}


class Trail:
    """Appends records to a real audit log at chosen instants."""

    def __init__(self, path: Path) -> None:
        self.now = T0
        self.log = AuditLog(path, clock=lambda: self.now)

    def add(self, at: timedelta, event: str, run: str, app: str, env: str, digest: str | None = None,
            commit: str | None = None, actor: str = "portcullis", **details: Any) -> None:
        self.now = T0 + at
        self.log.append(AuditEntry(event=event, actor=actor, run_id=run, app=app, environment=env,
                                   digest=digest, commit=commit, details=details))


@pytest.fixture()
def records(tmp_path: Path) -> Iterator[list[AuditRecord]]:
    t = Trail(tmp_path / "audit.jsonl")
    h = timedelta(hours=1)
    t.add(1 * h, "promotion.started", "r1", "hello", "dev", actor="trent")
    t.add(2 * h - timedelta(minutes=1), "canary.skipped", "r1", "hello", "dev", D1, C1)
    t.add(2 * h, "promotion.completed", "r1", "hello", "dev", D1, C1, approved_by=[])
    # prod, two approvals
    t.add(3 * h, "promotion.started", "r2", "hello", "prod", actor="trent")
    t.add(3 * h, "approval.requested", "r2", "hello", "prod", D1, C1, author="Ada <ada@example.com>",
          change_authors=["Ada <ada@example.com>"], triggered_by="trent", required_approvals=2,
          required_groups=["security", "platform"])
    t.add(4 * h, "approval.accepted", "r2", "hello", "prod", D1, C1, actor="alice")
    t.add(4 * h, "approval.accepted", "r2", "hello", "prod", D1, C1, actor="bob")
    t.add(4 * h, "approval.granted", "r2", "hello", "prod", D1, C1, approvers=["alice", "bob"])
    t.add(5 * h, "promotion.completed", "r2", "hello", "prod", D1, C1, approved_by=["alice", "bob"])
    # prod: D2, then rolled back after 30 minutes and pinned
    t.add(24 * h, "promotion.completed", "r3", "hello", "prod", D2, C2, approved_by=["alice", "carol"])
    t.add(24.5 * h, "promotion.started", "r4", "hello", "prod", actor="olga", rollback_reason="checkout broke")
    t.add(24.5 * h, "rollback.completed", "r4", "hello", "prod", D1, C1, rolled_back_from=D2,
          reason="checkout broke")
    t.add(24.5 * h, "environment.pinned", "r4", "hello", "prod", D1, C1, actor="olga", reason="checkout broke")
    # prod: D3's canary fails 10 minutes after the lock was taken
    t.add(48 * h, "lock.acquired", "r5", "hello", "prod", D3, C3)
    t.add(48 * h + timedelta(minutes=10), "canary.rolled-back", "r5", "hello", "prod", D3, C3, reason="errors")
    t.add(48 * h + timedelta(minutes=10), "promotion.refused", "r5", "hello", "prod", D3, C3,
          reason="canary of hello rolled back: errors")
    # greeter in staging waits for a second approval; carol approved
    t.add(50 * h, "approval.requested", "r6", "greeter", "staging", G1, C1, author="Ada <ada@example.com>",
          change_authors=["Ada <ada@example.com>", "Bob <bob@example.com>"], triggered_by="trent",
          required_approvals=2, required_groups=[])
    t.add(51 * h, "approval.accepted", "r6", "greeter", "staging", G1, C1, actor="carol")
    # an approval that ended (rejected) is not waiting any more
    t.add(52 * h, "approval.requested", "r7", "greeter", "dev", G1, C1, triggered_by="trent", required_approvals=1)
    t.add(52 * h, "approval.stopped", "r7", "greeter", "dev", G1, C1, reason="rejected")
    assert t.log.verify().ok
    yield t.log.records()


def test_the_board_shows_what_runs_where_and_who_is_waited_for(records: list[AuditRecord]) -> None:
    pin = Pin(app="hello", environment="prod", digest=D1, pinned_by="olga", reason="checkout broke",
              pinned_at=T0 + timedelta(hours=24.5))
    now = T0 + timedelta(hours=53)
    board = build_board(records, [pin], apps=["hello", "greeter", "quiet"], at=now)
    assert board.apps == ("hello", "greeter", "quiet")

    dev = board.cell("hello", "dev")
    assert (dev.digest, dev.commit, dev.how, dev.canary) == (D1, C1, "promoted", "skipped: first deploy")
    prod = board.cell("hello", "prod")
    assert (prod.digest, prod.how, prod.approved_by) == (D1, "rolled back by olga", ())
    assert prod.pinned == pin
    assert prod.last_refusal == "canary of hello rolled back: errors"
    assert board.cell("hello", "staging").digest is None

    (wait,) = board.cell("greeter", "staging").waiting
    assert (wait.needed, wait.approved_by, wait.requested_by, wait.digest) == (1, ("carol",), "trent", G1)
    assert wait.excluded == ("Ada <ada@example.com>", "Bob <bob@example.com>", "trent")
    assert board.cell("greeter", "dev").waiting == ()
    assert board.cell("hello", "prod").waiting == ()

    assert cell_lines(board.cell("greeter", "staging"), now) == [
        "-", "WAITING 3h: aaaaaaaaaaaa by trent needs 1 approval; has carol; not Ada, Bob, trent"]
    text = render_text(board)
    print(text)
    assert "111111111111 @ 11111111" not in text and "111111111111 @ aaaaaaaa" in text
    assert "rolled back by olga, 1d ago" in text and "PINNED by olga: checkout broke" in text
    assert "WAITING 3h: aaaaaaaaaaaa by trent needs 1" in text
    assert max(len(line) for line in text.splitlines()) < 160
    markdown = render_markdown(board)
    assert markdown.count("\n| **") == 3 and "| app | dev | staging | prod |" in markdown


def test_dora_figures_match_the_hand_computed_ones(records: list[AuditRecord], tmp_path: Path) -> None:
    week = {"since": T0, "until": T0 + timedelta(days=7), "commit_times": COMMIT_TIMES}
    prod = dora_figures(records, app="hello", environment="prod", **week)  # type: ignore[arg-type]
    assert prod.deployments == 2
    assert prod.deployment_frequency_per_day == pytest.approx(2 / 7)
    # C1: commit at T0, in prod at T0+5h; C2: commit at T0+20h, in prod at T0+24h.
    assert prod.lead_time_seconds == pytest.approx(((5 + 4) / 2) * 3600)
    # a rollback and a failed canary, over 2 deployments + 1 canary that reached traffic
    assert (prod.change_failures, prod.changes_reaching_traffic) == (2, 3)
    assert prod.change_failure_rate == pytest.approx(2 / 3)
    # restored after 30 min (rollback) and 10 min (canary): median 20 min
    assert prod.time_to_restore_seconds == pytest.approx(20 * 60)
    assert prod.deployments_per_week == (("2026-W45", 2),)

    dev = dora_figures(records, app="hello", environment="dev", **week)  # type: ignore[arg-type]
    assert (dev.deployments, dev.change_failure_rate, dev.time_to_restore_seconds) == (1, 0.0, None)
    assert dev.lead_time_seconds == pytest.approx(2 * 3600)
    later = dora_figures(records, app="hello", environment="prod", since=T0 + timedelta(days=3),
                         until=T0 + timedelta(days=10), commit_times=COMMIT_TIMES)
    assert (later.deployments, later.change_failure_rate, later.lead_time_seconds) == (0, None, None)

    chart = dora_markdown([prod, dev])
    assert "| hello | prod | 2 | 0.29 | 4.5h | 67% (2/3) | 20m |" in chart
    assert "hello        prod     2026-W45 ## 2" in chart

    path = tmp_path / "dora.prom"
    write_textfile(path, [prod, dev, later])
    samples = {(s.name, s.labels["environment"]): s.value
               for family in text_string_to_metric_families(path.read_text()) for s in family.samples
               if s.labels.get("app") == "hello"}
    assert samples[("portcullis_dora_change_failure_rate", "prod")] == pytest.approx(2 / 3)
    assert samples[("portcullis_dora_time_to_restore_seconds", "prod")] == 1200
    assert samples[("portcullis_dora_deployments", "dev")] == 1
