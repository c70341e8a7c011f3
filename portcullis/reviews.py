"""Post-incident reviews: the compensating control of the emergency path.

Every emergency deployment opens a review, due :data:`REVIEW_WINDOW` (48 hours) later. A
person closes it with notes once the change has been looked at after the fact; a scheduled
check reports reviews past their due time (:meth:`ReviewStore.overdue`, rendered by
:func:`render_report` as Markdown for a Prefect artifact).

The store is an append-only JSON-lines file in a directory (``reviews.jsonl``): an ``opened``
line per review and a ``closed`` line when it is closed; the current state is folded from the
lines. Writers take an exclusive lock on ``reviews.lock``.

Run ``python -m portcullis.reviews list|overdue|close`` against the configured state store
(:mod:`portcullis.state`, ``PORTCULLIS_STATE_URL``), where the flows keep reviews, or against a
file store directory (``--dir`` or ``PORTCULLIS_REVIEWS_DIR``).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, assert_never

from pydantic import AwareDatetime, Field, TypeAdapter, ValidationError

from portcullis.audit import file_lock
from portcullis.errors import PolicyRefusal, PortcullisError
from portcullis.models import Digest, Frozen

#: How long after an emergency deployment its review is due.
REVIEW_WINDOW = timedelta(hours=48)

#: Artifact key the scheduled check should publish :func:`render_report` under.
REPORT_ARTIFACT_KEY = "post-incident-reviews"

STORE_FILE = "reviews.jsonl"
LOCK_FILE = "reviews.lock"


class ReviewStatus(enum.StrEnum):
    """Where a review stands at a given moment."""

    OPEN = "open"
    OVERDUE = "overdue"
    CLOSED = "closed"


class PostIncidentReview(Frozen):
    """One emergency deployment that has to be reviewed after the fact."""

    ticket: str = Field(description="incident ticket the emergency deploy was made under")
    app: str
    environment: str
    digest: Digest = Field(description="image digest that was deployed")
    flow_run_id: str = Field(min_length=1, description="the emergency flow run")
    opened_at: AwareDatetime
    due_at: AwareDatetime = Field(description="opened_at + 48 hours")
    skipped_environments: tuple[str, ...] = Field(
        default=(), description="environments the emergency change went past (e.g. staging)"
    )
    closed_at: AwareDatetime | None = None
    closed_by: str | None = None
    notes: str | None = None

    @property
    def review_id(self) -> str:
        """Identifies the review: one per ticket and emergency flow run."""
        return f"{self.ticket}/{self.flow_run_id}"

    def status(self, now: datetime) -> ReviewStatus:
        """Closed, overdue (open past ``due_at``) or open, as of ``now``."""
        if self.closed_at is not None:
            return ReviewStatus.CLOSED
        return ReviewStatus.OVERDUE if now >= self.due_at else ReviewStatus.OPEN


class _Opened(Frozen):
    kind: Literal["opened"] = "opened"
    review: PostIncidentReview


class _Closed(Frozen):
    kind: Literal["closed"] = "closed"
    review_id: str
    closed_at: AwareDatetime
    closed_by: str
    notes: str


_LINE: TypeAdapter[_Opened | _Closed] = TypeAdapter(_Opened | _Closed)


def _aware(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now


class CloseRequest(Frozen):
    """A checked request to close the open reviews of one ticket."""

    ticket: str
    closed_by: str
    notes: str
    closed_at: AwareDatetime

    def apply(self, review: PostIncidentReview) -> PostIncidentReview:
        """``review`` as closed by this request."""
        return review.model_copy(
            update={"closed_at": self.closed_at, "closed_by": self.closed_by, "notes": self.notes}
        )


class ReviewBook(ABC):
    """Post-incident reviews wherever they are kept: the rules, over three storage steps.

    :class:`ReviewStore` keeps them in a file; :mod:`portcullis.state` in the shared database.
    """

    @abstractmethod
    def reviews(self) -> tuple[PostIncidentReview, ...]:
        """Every review, open and closed, in the order they were opened."""

    @abstractmethod
    def _add(self, review: PostIncidentReview) -> PostIncidentReview:
        """Keep ``review`` unless one with its id exists; return the one kept."""

    @abstractmethod
    def _close(self, request: CloseRequest) -> list[PostIncidentReview]:
        """Close every open review of ``request.ticket`` atomically; return those closed."""

    def for_ticket(self, ticket: str) -> tuple[PostIncidentReview, ...]:
        """The reviews opened under ``ticket``."""
        wanted = ticket.strip().upper()
        return tuple(r for r in self.reviews() if r.ticket == wanted)

    def open_review(
        self,
        *,
        ticket: str,
        app: str,
        environment: str,
        digest: str,
        flow_run_id: str,
        skipped_environments: tuple[str, ...] = (),
        now: datetime | None = None,
    ) -> PostIncidentReview:
        """Open the review of one emergency deployment, due 48 hours from ``now``.

        Opening the same ticket and flow run again (a retried task) returns the existing
        review unchanged.

        Args:
            ticket: the incident ticket the deploy was made under.
            app: the deployed app.
            environment: where it was deployed.
            digest: the deployed image digest.
            flow_run_id: the emergency flow run.
            skipped_environments: environments the change did not pass through.
            now: when the review opens; default the current time.

        Returns:
            The open review.
        """
        opened_at = _aware(now)
        return self._add(
            PostIncidentReview(
                ticket=ticket.strip().upper(),
                app=app,
                environment=environment,
                digest=digest,
                flow_run_id=flow_run_id,
                skipped_environments=skipped_environments,
                opened_at=opened_at,
                due_at=opened_at + REVIEW_WINDOW,
            )
        )

    def close_review(
        self, ticket: str, *, closed_by: str, notes: str, now: datetime | None = None
    ) -> tuple[PostIncidentReview, ...]:
        """Close every open review under ``ticket``: the incident has been reviewed.

        Args:
            ticket: the incident ticket.
            closed_by: who held the review.
            notes: what the review found (where the write-up lives, follow-up actions).
            now: when it was closed; default the current time.

        Returns:
            The reviews this call closed.

        Raises:
            PolicyRefusal: no one named, no notes, or no open review under ``ticket``.
        """
        closed_at = _aware(now)
        number = ticket.strip().upper()
        if not closed_by.strip():
            raise PolicyRefusal(
                f"closing the review of {number} needs the name of who held it",
                hint="pass --by NAME",
            )
        if not notes.strip():
            raise PolicyRefusal(
                f"closing the review of {number} needs notes",
                hint="say what the review found, or link the write-up",
            )
        closed = self._close(
            CloseRequest(
                ticket=number, closed_by=closed_by.strip(), notes=notes.strip(),
                closed_at=closed_at,
            )
        )
        if not closed:
            raise PolicyRefusal(
                f"there is no open post-incident review for {number}",
                hint="`python -m portcullis.reviews list` shows what is open",
            )
        return tuple(closed)

    def overdue(self, now: datetime) -> tuple[PostIncidentReview, ...]:
        """Open reviews whose due time has passed at ``now``, most overdue first."""
        at = _aware(now)
        late = [r for r in self.reviews() if r.status(at) is ReviewStatus.OVERDUE]
        return tuple(sorted(late, key=lambda r: r.due_at))


class ReviewStore(ReviewBook):
    """Post-incident reviews kept in ``directory`` (created on first write, mode 0700).

    Args:
        directory: where ``reviews.jsonl`` and its lock file live.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STORE_FILE
        self._lock = directory / LOCK_FILE

    def _append(self, line: _Opened | _Closed) -> None:
        data = line.model_dump_json().encode("utf-8") + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read(self) -> dict[str, PostIncidentReview]:
        """Fold the log into the current reviews, keyed by review id, in opening order."""
        reviews: dict[str, PostIncidentReview] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return reviews
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = _LINE.validate_json(raw)
            except ValidationError as exc:
                raise PortcullisError(
                    f"review store {self.path} line {number} is malformed: "
                    f"{exc.errors()[0]['msg']}",
                    hint="the file is append-only; restore it from backup, never edit it",
                ) from None
            match line:
                case _Opened(review=review):
                    reviews.setdefault(review.review_id, review)
                case _Closed():
                    current = reviews.get(line.review_id)
                    if current is None:
                        raise PortcullisError(
                            f"review store {self.path} line {number} closes review "
                            f"{line.review_id}, which was never opened",
                            hint="the file is append-only; restore it from backup",
                        )
                    if current.closed_at is None:
                        reviews[line.review_id] = current.model_copy(
                            update={
                                "closed_at": line.closed_at,
                                "closed_by": line.closed_by,
                                "notes": line.notes,
                            }
                        )
                case _:
                    assert_never(line)
        return reviews

    def reviews(self) -> tuple[PostIncidentReview, ...]:
        """Every review, open and closed, in the order they were opened."""
        if not self.path.exists():
            return ()
        with file_lock(self._lock):
            return tuple(self._read().values())

    def _add(self, review: PostIncidentReview) -> PostIncidentReview:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with file_lock(self._lock):
            existing = self._read().get(review.review_id)
            if existing is not None:
                return existing
            self._append(_Opened(review=review))
        return review

    def _close(self, request: CloseRequest) -> list[PostIncidentReview]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        closed: list[PostIncidentReview] = []
        with file_lock(self._lock):
            for review in self._read().values():
                if review.ticket != request.ticket or review.closed_at is not None:
                    continue
                self._append(
                    _Closed(
                        review_id=review.review_id,
                        closed_at=request.closed_at,
                        closed_by=request.closed_by,
                        notes=request.notes,
                    )
                )
                closed.append(request.apply(review))
        return closed


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip()


def _ago(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"


def render_report(
    reviews: Iterable[PostIncidentReview], now: datetime, *, ui_url: str | None = None
) -> str:
    """The review status as Markdown for a Prefect artifact (key :data:`REPORT_ARTIFACT_KEY`).

    Lists overdue reviews first, then reviews still within their 48 hours; closed reviews are
    only counted.

    Args:
        reviews: every review (``ReviewStore.reviews()``).
        now: the time of the check.
        ui_url: the Prefect UI root (e.g. ``http://127.0.0.1:4200``) to link flow runs.

    Returns:
        Markdown text.
    """
    at = _aware(now)
    by_status: dict[ReviewStatus, list[PostIncidentReview]] = {s: [] for s in ReviewStatus}
    for review in reviews:
        by_status[review.status(at)].append(review)
    overdue = sorted(by_status[ReviewStatus.OVERDUE], key=lambda r: r.due_at)
    still_open = sorted(by_status[ReviewStatus.OPEN], key=lambda r: r.due_at)

    def run_link(review: PostIncidentReview) -> str:
        short = _cell(review.flow_run_id[:8])
        if ui_url:
            return f"[{short}]({ui_url.rstrip('/')}/runs/flow-run/{review.flow_run_id})"
        return f"`{short}`"

    def row(review: PostIncidentReview, when: str) -> str:
        return (
            f"| {_cell(review.ticket)} | {_cell(review.app)} | {_cell(review.environment)} "
            f"| `{review.digest[:19]}` | {run_link(review)} "
            f"| {review.opened_at.astimezone(UTC):%Y-%m-%d %H:%M} "
            f"| {review.due_at.astimezone(UTC):%Y-%m-%d %H:%M} "
            f"| {_cell(', '.join(review.skipped_environments)) or 'none'} | {when} |"
        )

    header = (
        "| ticket | app | environment | digest | flow run | opened (UTC) | due (UTC) | skipped "
        "| {} |\n|---|---|---|---|---|---|---|---|---|"
    )
    verdict = f"**{len(overdue)} overdue**" if overdue else "No review is overdue."
    lines = [
        "# Post-incident reviews",
        "",
        (
            f"Checked {at.astimezone(UTC):%Y-%m-%d %H:%M} UTC. {verdict} "
            f"{len(still_open)} open within {REVIEW_WINDOW.total_seconds() / 3600:.0f} h, "
            f"{len(by_status[ReviewStatus.CLOSED])} closed."
        ),
        "",
    ]
    if overdue:
        lines += ["## Overdue", "", header.format("overdue by")]
        lines += [row(r, _ago(at - r.due_at)) for r in overdue]
        lines.append("")
    if still_open:
        lines += ["## Open", "", header.format("due in")]
        lines += [row(r, _ago(r.due_at - at)) for r in still_open]
        lines.append("")
    if overdue or still_open:
        lines += [
            (
                "Close a review once it has been held: "
                "`python -m portcullis.reviews close TICKET --by NAME --notes TEXT`."
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m portcullis.reviews list|overdue|close``."""
    parser = argparse.ArgumentParser(prog="python -m portcullis.reviews", description=__doc__)
    parser.add_argument(
        "--dir",
        type=Path,
        default=os.environ.get("PORTCULLIS_REVIEWS_DIR"),
        help="a file store directory (default: $PORTCULLIS_REVIEWS_DIR, else the state store)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the report of open and overdue reviews")
    sub.add_parser("overdue", help="list overdue reviews; exit 1 when there are any")
    close = sub.add_parser("close", help="close the open reviews of a ticket")
    close.add_argument("ticket")
    close.add_argument("--by", required=True, help="who held the review")
    close.add_argument("--notes", required=True, help="what it found, or a link to it")
    args = parser.parse_args(argv)
    store: ReviewBook
    if args.dir is None:
        # Imported here: the state store builds on this module.
        from portcullis.settings import Settings
        from portcullis.state import open_state

        store = open_state(Settings()).reviews
    else:
        store = ReviewStore(Path(args.dir))
    now = datetime.now(UTC)
    try:
        if args.command == "list":
            print(render_report(store.reviews(), now))
            return 0
        if args.command == "overdue":
            late = store.overdue(now)
            for r in late:
                print(json.dumps(r.model_dump(mode="json")))
            return 1 if late else 0
        closed = store.close_review(args.ticket, closed_by=args.by, notes=args.notes, now=now)
    except PortcullisError as exc:
        print(f"reviews {args.command} failed: {exc}", file=sys.stderr)
        return 1
    for r in closed:
        print(f"closed {r.review_id} ({r.app} in {r.environment})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
