"""The environments board: what runs where, what waits for whom, one row per app.

A pure function of the audit trail (and the pins): the same records always give the same
board, so the Prefect artifact the flows publish and ``python -m portcullis status`` agree.
Each cell says which digest and commit run in that environment, since when, who approved it,
the canary's verdict, whether a rollback pinned it, the last refused attempt since, and the
promotions waiting there (for how many approvals from which groups, and who may not give them).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from pydantic import Field

from portcullis.audit import AuditRecord
from portcullis.chain import COMPLETED
from portcullis.models import Frozen
from portcullis.pins import Pin

#: The Prefect artifact key the board is published under.
BOARD_ARTIFACT_KEY = "environments-board"
ROLLED_BACK = "rollback.completed"
REFUSED = "promotion.refused"
_WAIT_OPENED = ("approval.requested", "canary.decision-requested")
# Any of these ends a wait opened in the same run.
_WAIT_CLOSED = frozenset({
    "approval.granted", "approval.stopped", "approval.timed_out", "approval.frozen",
    "canary.decision", "canary.decision-timeout", COMPLETED, REFUSED,
})


class Waiting(Frozen):
    """A promotion paused for people."""

    run_id: str
    digest: str | None
    what: str = Field(description="'approval' or 'canary decision'")
    since: datetime
    requested_by: str
    needed: int = Field(description="accepted answers still missing")
    groups: tuple[str, ...] = Field(description="groups that must each be represented")
    approved_by: tuple[str, ...]
    excluded: tuple[str, ...] = Field(description="who may not answer: authors and the requester")


class Cell(Frozen):
    """One app in one environment."""

    digest: str | None = None
    commit: str | None = None
    since: datetime | None = None
    how: str = Field(default="", description="'promoted' or 'rolled back'")
    approved_by: tuple[str, ...] = ()
    canary: str = ""
    pinned: Pin | None = None
    last_refusal: str | None = Field(default=None, description="a refused attempt after the current version")
    waiting: tuple[Waiting, ...] = ()


class Board(Frozen):
    """Every app's cells, by environment."""

    apps: tuple[str, ...]
    environments: tuple[str, ...]
    cells: dict[str, dict[str, Cell]]
    at: datetime

    def cell(self, app: str, environment: str) -> Cell:
        """The cell of ``app`` in ``environment`` (empty when nothing happened there)."""
        return self.cells.get(app, {}).get(environment, Cell())


def _canary_of(run: list[AuditRecord]) -> str:
    for record in reversed(run):
        if record.event == "canary.promoted":
            return f"Successful ({record.details.get('decided_by', 'analysis')})"
        if record.event == "canary.skipped":
            return "skipped: first deploy"
        if record.event == "canary.rolled-back":
            return "Failed"
    return "none"


def _as_strings(value: object) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _waiting(run: list[AuditRecord]) -> Waiting | None:
    opened: AuditRecord | None = None
    approved: list[str] = []
    for record in run:
        if record.event in _WAIT_OPENED:
            opened, approved = record, []
        elif record.event in _WAIT_CLOSED:
            opened = None
        elif record.event == "approval.accepted" and opened is not None:
            approved.append(record.actor)
    if opened is None:
        return None
    d = opened.details
    required = d.get("required_approvals")
    needed = max(0, (required if isinstance(required, int) else 1) - len(approved))
    author = d.get("author")
    excluded = dict.fromkeys([*(_as_strings(d.get("change_authors")) or ((str(author),) if author else ())),
                              str(d.get("triggered_by", ""))])
    excluded.pop("", None)
    return Waiting(
        run_id=opened.run_id or "", digest=opened.digest,
        what="approval" if opened.event == "approval.requested" else "canary decision",
        since=opened.at, requested_by=str(d.get("triggered_by", "?")), needed=needed,
        groups=_as_strings(d.get("required_groups")), approved_by=tuple(approved),
        excluded=tuple(excluded),
    )


def build_board(
    records: Iterable[AuditRecord], pins: Iterable[Pin], *, apps: Sequence[str] = (),
    environments: Sequence[str] = ("dev", "staging", "prod"), at: datetime,
) -> Board:
    """The board for ``at`` from the audit trail and the pins. Pure.

    Args:
        records: the audit log's records, oldest first (verify the chain before trusting them).
        pins: the environment pins in force.
        apps: apps to show first and always (the catalog); apps seen only in the trail follow.
        environments: the columns, in order.
        at: "now", for ages.
    """
    by_run: dict[str, list[AuditRecord]] = {}
    seen_apps: dict[str, None] = dict.fromkeys(apps)
    current: dict[tuple[str, str], AuditRecord] = {}
    refusal: dict[tuple[str, str], AuditRecord] = {}
    for record in records:
        if record.app is None or record.environment is None:
            continue
        seen_apps.setdefault(record.app)
        by_run.setdefault(record.run_id or f"seq-{record.seq}", []).append(record)
        key = (record.app, record.environment)
        if record.event in (COMPLETED, ROLLED_BACK):
            current[key] = record
            refusal.pop(key, None)
        elif record.event == REFUSED:
            refusal[key] = record
    pinned = {(p.app, p.environment): p for p in pins}
    for app, environment in pinned:
        seen_apps.setdefault(app)
    waits: dict[tuple[str, str], list[Waiting]] = {}
    for run in by_run.values():
        wait = _waiting(run)
        if wait is not None:
            waits.setdefault((run[0].app or "", run[0].environment or ""), []).append(wait)

    cells: dict[str, dict[str, Cell]] = {}
    for app in seen_apps:
        row: dict[str, Cell] = {}
        for environment in environments:
            key = (app, environment)
            now = current.get(key)
            fields: dict[str, object] = {"pinned": pinned.get(key), "waiting": tuple(waits.get(key, ()))}
            if now is not None:
                fields.update(
                    digest=now.digest, commit=now.commit, since=now.at,
                    how="promoted" if now.event == COMPLETED
                    else f"rolled back by {_rollback_actor(by_run.get(now.run_id or '', []))}",
                    approved_by=_as_strings(now.details.get("approved_by")) if now.event == COMPLETED else (),
                    canary=_canary_of(by_run.get(now.run_id or "", [])) if now.event == COMPLETED else "",
                )
            refused = refusal.get(key)
            if refused is not None:
                fields["last_refusal"] = str(refused.details.get("reason", "refused"))
            row[environment] = Cell.model_validate(fields)
        cells[app] = row
    return Board(apps=tuple(seen_apps), environments=tuple(environments), cells=cells, at=at)


def _rollback_actor(run: list[AuditRecord]) -> str:
    started = next((r for r in run if r.event == "promotion.started"), None)
    return started.actor if started is not None else "?"


def age(delta: timedelta) -> str:
    """A short age: 45s, 12m, 3h, 6d."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "?"


def cell_lines(cell: Cell, at: datetime) -> list[str]:
    """The cell as short lines, for the table and the terminal."""
    lines: list[str] = []
    if cell.digest is None:
        lines.append("-")
    else:
        lines.append(f"{_short(cell.digest)} @ {(cell.commit or '?')[:8]}")
        lines.append(f"{cell.how}, {age(at - cell.since) if cell.since else '?'} ago")
        if cell.how == "promoted":
            lines.append("approved: " + (", ".join(cell.approved_by) or "not required"))
        if cell.canary:
            lines.append(f"canary: {cell.canary}")
    if cell.pinned is not None:
        lines.append(f"PINNED by {cell.pinned.pinned_by}: {cell.pinned.reason[:40]}")
    if cell.last_refusal:
        lines.append(f"last attempt refused: {cell.last_refusal.split(' (next: ')[0][:160]}")
    for wait in cell.waiting:
        groups = f" ({', '.join(wait.groups)})" if wait.groups else ""
        line = (f"WAITING {age(at - wait.since)}: {_short(wait.digest)} by {wait.requested_by} "
                f"needs {wait.needed} {wait.what}{groups}")
        if wait.approved_by:
            line += f"; has {', '.join(wait.approved_by)}"
        if wait.excluded:
            line += f"; not {', '.join(e.split(' <')[0] for e in wait.excluded)}"
        lines.append(line)
    return lines


def render_markdown(board: Board) -> str:
    """The board as one markdown table (the Prefect artifact)."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    head = "| app | " + " | ".join(board.environments) + " |"
    rule = "|---|" + "---|" * len(board.environments)
    rows = [
        f"| **{esc(app)}** | " + " | ".join(
            "<br>".join(esc(line) for line in cell_lines(board.cell(app, env), board.at))
            for env in board.environments) + " |"
        for app in board.apps
    ]
    return "\n".join([f"# Environments ({board.at.isoformat(timespec='seconds')})", "", head, rule, *rows]) + "\n"


def render_text(board: Board, width: int = 44) -> str:
    """The board for a terminal: one row per app, one column per environment."""
    columns = ["app", *board.environments]
    def wrapped(cell: Cell) -> list[str]:
        return [part for line in cell_lines(cell, board.at)
                for part in textwrap.wrap(line, width, subsequent_indent="  ")]

    grid = [[[app], *[wrapped(board.cell(app, env)) for env in board.environments]] for app in board.apps]
    widths = [max([len(columns[i]), *(len(line) for row in grid for line in row[i])]) for i in range(len(columns))]
    sep = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), sep]
    for row in grid:
        height = max(len(c) for c in row)
        for i in range(height):
            out.append(" | ".join((c[i] if i < len(c) else "").ljust(w)
                                  for c, w in zip(row, widths, strict=True)).rstrip())
        out.append(sep)
    return "\n".join(out) + "\n"
