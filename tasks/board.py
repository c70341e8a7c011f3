"""Glue for the operator's views: read the audit trail and pins, publish the board and DORA.

The views themselves are pure (:mod:`portcullis.board`, :mod:`portcullis.dora`); this module
reads their inputs from the deploy side's files and publishes Prefect artifacts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote, urlsplit

from prefect.artifacts import create_markdown_artifact

from portcullis.audit import AuditEntry, AuditRecord, AuditTrail, VerifyReport
from portcullis.board import BOARD_ARTIFACT_KEY, Board, build_board, render_markdown
from portcullis.catalog import Catalog, load_catalog
from portcullis.chain import verified_records as _chain_records
from portcullis.dora import DORA_ARTIFACT_KEY, DoraFigures, all_figures
from portcullis.dora import render_markdown as dora_markdown
from portcullis.errors import ConfigurationError, PortcullisError, ToolError
from portcullis.settings import Settings
from portcullis.state import open_state
from portcullis.toolrun import run_tool
from tasks.gates import open_audit_log


def _catalog_or_none() -> Catalog | None:
    try:
        return load_catalog()
    except ConfigurationError as exc:
        # The views still show every app the audit trail knows; the catalog's fault is said.
        print(f"warning: {exc}", file=sys.stderr)
        return None


def verified_records(settings: Settings) -> list[AuditRecord]:
    """The audit trail, refused unless its hash chain verifies (a board must not show a forged history)."""
    return _chain_records(open_audit_log(settings))


def current_board(settings: Settings | None = None, at: datetime | None = None) -> Board:
    """The board as of now (or ``at``), from the verified audit trail, the pins and the catalog."""
    settings = settings or Settings()
    catalog = _catalog_or_none()
    return build_board(verified_records(settings), open_state(settings).pins.all(),
                       apps=catalog.names if catalog else (), at=at or datetime.now(UTC))


def publish_board(settings: Settings | None = None) -> Board | None:
    """Publish the board as the Prefect artifact ``environments-board`` and return it.

    Called after every promotion, refusal, rollback and pin. A board that cannot be built or
    published (an audit log that does not verify, the API away) must not turn a finished
    deploy into a failed run, nor hide the refusal being raised: it is printed and skipped.
    """
    try:
        board = current_board(settings)
        create_markdown_artifact(markdown=render_markdown(board), key=BOARD_ARTIFACT_KEY,
                                 description="what runs where, and what waits for whom")
    except Exception as exc:  # noqa: BLE001 - a view must never fail the promotion it shows
        print(f"the environments board was not published: {exc}")
        return None
    return board


class BoardPublishingLog(AuditTrail):
    """The same audit trail, republishing the board whenever a person is asked or answers, so
    the board shows who a paused promotion waits for while it waits."""

    def __init__(self, log: AuditTrail, settings: Settings | None = None) -> None:
        self._log = log
        self._settings = settings

    @property
    def location(self) -> str:
        """Where the wrapped trail keeps its records."""
        return self._log.location

    @property
    def underlying(self) -> AuditTrail:
        """The wrapped trail (where codes are burned is decided by it)."""
        return self._log.underlying

    def run_records(self, run_id: str) -> list[AuditRecord]:
        """The wrapped trail's records of one run."""
        return self._log.run_records(run_id)

    def append(self, entry: AuditEntry) -> AuditRecord:
        """Append as the trail does, then republish the board for the human decision events."""
        record = self._log.append(entry)
        if record.event.startswith(("approval.", "canary.decision")):
            publish_board(self._settings)
        return record

    def records(self) -> list[AuditRecord]:
        """The wrapped trail's records."""
        return self._log.records()

    def verify(self) -> VerifyReport:
        """The wrapped trail's verification."""
        return self._log.verify()


def commit_times(records: Sequence[AuditRecord], settings: Settings) -> dict[str, datetime]:
    """When each promoted commit was made, read with git from the source named in its build
    record (local ``file://`` sources and paths; remote ones from the deploy side's mirrors)."""
    sources: dict[str, str] = {}
    for r in records:
        if r.event == "build.completed" and r.commit and isinstance(r.details.get("source"), str):
            sources[r.commit] = str(r.details["source"])
    mirrors = settings.home / "sources"
    times: dict[str, datetime] = {}
    for commit, source in sources.items():
        parts = urlsplit(source)
        repo = unquote(parts.path) if parts.scheme in ("file", "") else None
        if repo is None:
            from portcullis.change import local_repository

            try:
                repo = str(local_repository(source, mirrors))
            except PortcullisError as exc:
                print(f"lead time: {commit[:12]} left undated: {exc}")
                continue
        try:
            out = run_tool(["git", "-C", repo, "show", "-s", "--format=%cI", commit], timeout=30)
        except ToolError as exc:
            print(f"lead time: {commit[:12]} left undated: {exc}")
            continue
        times[commit] = datetime.fromisoformat(out.stdout.decode().strip()).astimezone(UTC)
    return times


def dora_now(settings: Settings | None = None, days: int = 30, at: datetime | None = None) -> list[DoraFigures]:
    """DORA figures for the last ``days`` days, every app and environment."""
    settings = settings or Settings()
    records = verified_records(settings)
    until = at or datetime.now(UTC)
    catalog = _catalog_or_none()
    return all_figures(records, since=until - timedelta(days=days), until=until,
                       commit_times=commit_times(records, settings), apps=catalog.names if catalog else ())


def publish_dora(figures: Sequence[DoraFigures]) -> None:
    """Publish the figures as the Prefect artifact ``dora-metrics``."""
    create_markdown_artifact(markdown=dora_markdown(figures), key=DORA_ARTIFACT_KEY,
                             description="deployment frequency, lead time, change failure rate, time to restore")
