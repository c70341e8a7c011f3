"""Post-incident reviews: opened by an emergency deploy, due in 48 hours, closed with notes."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from portcullis.errors import PolicyRefusal, PortcullisError
from portcullis.reviews import (
    REVIEW_WINDOW,
    PostIncidentReview,
    ReviewStatus,
    ReviewStore,
    main,
    render_report,
)

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32


def _open(store: ReviewStore, ticket: str, run: str, at: datetime, app: str = "hello") -> None:
    store.open_review(
        ticket=ticket, app=app, environment="prod", digest=DIGEST, flow_run_id=run, now=at
    )


def test_review_is_due_48_hours_after_opening(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "reviews")
    review = store.open_review(
        ticket="inc0010001",
        app="hello",
        environment="prod",
        digest=DIGEST,
        flow_run_id="run-1",
        now=T0,
    )
    assert review.ticket == "INC0010001"
    assert review.due_at == T0 + timedelta(hours=48) == T0 + REVIEW_WINDOW
    assert review.status(T0 + timedelta(hours=47, minutes=59)) is ReviewStatus.OPEN
    assert review.status(T0 + timedelta(hours=48)) is ReviewStatus.OVERDUE
    assert store.reviews() == (review,)
    assert (tmp_path / "reviews" / "reviews.jsonl").stat().st_mode & 0o777 == 0o600


def test_reopening_the_same_run_is_idempotent(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path)
    first = store.open_review(
        ticket="INC0010001",
        app="hello",
        environment="prod",
        digest=DIGEST,
        flow_run_id="run-1",
        now=T0,
    )
    again = store.open_review(
        ticket="INC0010001",
        app="hello",
        environment="prod",
        digest=DIGEST,
        flow_run_id="run-1",
        now=T0 + timedelta(hours=5),
    )
    assert again == first
    assert len((tmp_path / "reviews.jsonl").read_text().splitlines()) == 1


def test_overdue_lists_only_open_reviews_past_due(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path)
    _open(store, "INC0010001", "run-1", T0)
    _open(store, "INC0010002", "run-2", T0 + timedelta(hours=10))
    _open(store, "INC0010003", "run-3", T0 - timedelta(days=3))
    store.close_review(
        "INC0010003", closed_by="dana", notes="RCA in PIR-17", now=T0 + timedelta(hours=1)
    )
    now = T0 + timedelta(hours=50)
    assert [r.ticket for r in store.overdue(now)] == ["INC0010001"]
    assert [r.ticket for r in store.overdue(T0 + timedelta(hours=60))] == [
        "INC0010001",
        "INC0010002",
    ]
    assert store.overdue(T0) == ()


def test_close_review_closes_every_open_review_of_the_ticket(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path)
    _open(store, "INC0010001", "run-1", T0)
    _open(store, "INC0010001", "run-2", T0 + timedelta(hours=2), app="hello-api")
    _open(store, "INC0010002", "run-3", T0)
    closed = store.close_review(
        "inc0010001", closed_by=" dana ", notes="PIR held; see PIR-9", now=T0 + timedelta(hours=20)
    )
    assert {r.flow_run_id for r in closed} == {"run-1", "run-2"}
    assert all(r.closed_by == "dana" and r.closed_at == T0 + timedelta(hours=20) for r in closed)
    states = {r.flow_run_id: r.status(T0 + timedelta(days=5)) for r in store.reviews()}
    assert states == {
        "run-1": ReviewStatus.CLOSED,
        "run-2": ReviewStatus.CLOSED,
        "run-3": ReviewStatus.OVERDUE,
    }
    with pytest.raises(PolicyRefusal, match="no open post-incident review for INC0010001"):
        store.close_review("INC0010001", closed_by="dana", notes="again")


@pytest.mark.parametrize(
    ("by", "notes", "reason"), [("", "notes", "needs the name"), ("dana", "  ", "needs notes")]
)
def test_close_needs_a_name_and_notes(tmp_path: Path, by: str, notes: str, reason: str) -> None:
    store = ReviewStore(tmp_path)
    _open(store, "INC0010001", "run-1", T0)
    with pytest.raises(PolicyRefusal, match=reason):
        store.close_review("INC0010001", closed_by=by, notes=notes)
    assert store.reviews()[0].closed_at is None


def test_store_is_append_only_and_survives_a_new_instance(tmp_path: Path) -> None:
    _open(ReviewStore(tmp_path), "INC0010001", "run-1", T0)
    ReviewStore(tmp_path).close_review("INC0010001", closed_by="dana", notes="ok", now=T0)
    lines = [json.loads(x) for x in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["opened", "closed"]
    (review,) = ReviewStore(tmp_path).reviews()
    assert review.closed_by == "dana" and review.notes == "ok"


def test_corrupt_store_names_the_line(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path)
    _open(store, "INC0010001", "run-1", T0)
    with (tmp_path / "reviews.jsonl").open("a") as fh:
        fh.write('{"kind": "closed", "review_id": "INC0010001/run-1"}\n')
    with pytest.raises(PortcullisError, match="line 2 is malformed"):
        store.reviews()


def test_naive_times_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ReviewStore(tmp_path).overdue(datetime(2025, 1, 1))


def _open_many(directory: str, worker: int) -> None:
    store = ReviewStore(Path(directory))
    for i in range(25):
        _open(store, f"INC00{worker:02d}{i:04d}", f"run-{worker}-{i}", T0)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    # spawn, not fork: by now the test process runs Prefect server threads, and a forked
    # copy of a threaded process can inherit held locks.
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_many, args=(str(tmp_path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(ReviewStore(tmp_path).reviews()) == 100


def _review(ticket: str, opened: datetime, **kw: object) -> PostIncidentReview:
    values: dict[str, object] = {
        "ticket": ticket,
        "app": "hello",
        "environment": "prod",
        "digest": DIGEST,
        "flow_run_id": f"0f1e2d3c-{ticket[-4:]}-4000-8000-000000000000",
        "opened_at": opened,
        "due_at": opened + REVIEW_WINDOW,
    }
    values.update(kw)
    return PostIncidentReview.model_validate(values)


def test_report_lists_overdue_then_open_and_counts_closed() -> None:
    now = T0 + timedelta(hours=60)
    reviews = [
        _review("INC0010002", T0 + timedelta(hours=30)),
        _review("INC0010001", T0, app="pay|ments"),
        _review(
            "INC0010003", T0, closed_at=T0 + timedelta(hours=3), closed_by="dana", notes="done"
        ),
    ]
    report = render_report(reviews, now, ui_url="http://127.0.0.1:4200/")
    assert report.startswith("# Post-incident reviews\n")
    assert "**1 overdue**" in report and "1 open within 48 h, 1 closed." in report
    overdue, still_open = report.split("## Overdue")[1].split("## Open")
    assert "INC0010001" in overdue and "INC0010002" not in overdue
    assert "| pay\\|ments |" in overdue  # a pipe in a value cannot break the table
    assert "| 12.0 h |" in overdue
    assert "INC0010002" in still_open and "| 18.0 h |" in still_open
    assert "INC0010003" not in report
    assert "(http://127.0.0.1:4200/runs/flow-run/0f1e2d3c-0001-4000-8000-000000000000)" in report
    assert f"`{DIGEST[:19]}`" in report


def test_report_when_nothing_is_overdue() -> None:
    report = render_report([_review("INC0010001", T0)], T0 + timedelta(hours=1))
    assert "No review is overdue." in report
    assert "## Overdue" not in report and "## Open" in report
    assert render_report([], T0).count("\n") < 6


def test_cli_close_and_overdue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _open(ReviewStore(tmp_path), "INC0010001", "run-1", T0)
    assert main(["--dir", str(tmp_path), "overdue"]) == 1
    assert "INC0010001" in capsys.readouterr().out
    assert (
        main(["--dir", str(tmp_path), "close", "INC0010001", "--by", "dana", "--notes", "held"])
        == 0
    )
    assert main(["--dir", str(tmp_path), "overdue"]) == 0
    assert (
        main(["--dir", str(tmp_path), "close", "INC0010001", "--by", "dana", "--notes", "held"])
        == 1
    )
    assert "no open post-incident review" in capsys.readouterr().err
