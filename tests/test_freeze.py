"""Change-freeze rules: one-off and recurring windows, time zones and DST, and the external
change calendar asked over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr, TypeAdapter, ValidationError

from portcullis.errors import PolicyRefusal
from portcullis.freeze import (
    CalendarMode,
    ChangeCalendar,
    FreezePolicy,
    FreezeSource,
    FreezeWindow,
    OneOffWindow,
    RecurringWindow,
    check_freeze,
    evaluate_freeze,
)
from tests.support.http import serving


def utc(text: str) -> datetime:
    """An aware UTC instant from 'YYYY-MM-DDTHH:MM[:SS]'."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def policy(
    *windows: OneOffWindow | RecurringWindow, calendar: CalendarMode = CalendarMode.OFF
) -> FreezePolicy:
    return FreezePolicy(environment="prod", windows=windows, calendar=calendar)


WEEKEND_CRON = RecurringWindow(
    name="weekend",
    reason="nobody on call",
    tz="Europe/Berlin",
    cron="0 18 * * fri",
    duration=timedelta(hours=62),
)
WEEKEND_RRULE = RecurringWindow(
    name="weekend",
    reason="nobody on call",
    tz="Europe/Berlin",
    rrule="FREQ=WEEKLY;BYDAY=FR;BYHOUR=18;BYMINUTE=0;BYSECOND=0",
    duration=timedelta(hours=62),
)


# --- one-off windows -----------------------------------------------------------------------


def test_one_off_window_in_local_time_has_exclusive_end() -> None:
    release = OneOffWindow(
        name="release-weekend",
        reason="annual sale",
        tz="America/New_York",
        start=datetime(2024, 11, 29, 0, 0),
        end=datetime(2024, 12, 2, 9, 0),
    )
    p = policy(release)
    # New York is UTC-5 in late November.
    assert not check_freeze(p, utc("2024-11-29T04:59:59")).frozen
    status = check_freeze(p, utc("2024-11-29T05:00:00"))
    assert status.frozen
    assert status.active[0].ends_at == utc("2024-12-02T14:00:00")
    assert status.clear_at == utc("2024-12-02T14:00:00")
    assert not check_freeze(p, utc("2024-12-02T14:00:00")).frozen


def test_refusal_names_window_reason_and_end() -> None:
    release = OneOffWindow(
        name="release-weekend",
        reason="annual sale",
        tz="UTC",
        start=datetime(2024, 11, 29),
        end=datetime(2024, 12, 2, 9),
    )
    status = check_freeze(policy(release), utc("2024-11-30T12:00"))
    with pytest.raises(PolicyRefusal) as err:
        status.raise_if_frozen()
    text = str(err.value)
    assert "release-weekend" in text
    assert "annual sale" in text
    assert "2024-12-02T09:00:00+00:00" in text
    check_freeze(policy(release), utc("2024-12-03T00:00")).raise_if_frozen()  # no raise


def test_one_off_window_accepts_aware_times_and_instants_in_other_zones() -> None:
    window = OneOffWindow(
        name="migration",
        reason="db migration",
        tz="Asia/Tokyo",
        start=datetime(2024, 6, 1, 22, 0, tzinfo=UTC),
        end=datetime(2024, 6, 2, 2, 0, tzinfo=UTC),
    )
    tokyo_instant = datetime.fromisoformat("2024-06-02T08:30:00+09:00")  # 23:30 UTC
    assert check_freeze(policy(window), tokyo_instant).frozen


def test_naive_check_time_is_refused() -> None:
    with pytest.raises(PolicyRefusal, match="no time zone"):
        check_freeze(policy(WEEKEND_CRON), datetime(2024, 3, 29, 18, 0))


# --- recurring windows and DST ---------------------------------------------------------------


@pytest.mark.parametrize("window", [WEEKEND_CRON, WEEKEND_RRULE], ids=["cron", "rrule"])
def test_weekend_across_spring_forward_ends_at_local_monday_8(window: RecurringWindow) -> None:
    # Berlin switches CET -> CEST on Sunday 2024-03-31.
    p = policy(window)
    assert not check_freeze(p, utc("2024-03-29T16:59:59")).frozen  # 17:59:59 CET
    start = check_freeze(p, utc("2024-03-29T17:00:00"))  # 18:00 CET
    assert start.frozen
    assert start.active[0].started_at == utc("2024-03-29T17:00:00")
    assert start.clear_at == utc("2024-04-01T06:00:00")  # Monday 08:00 CEST
    assert check_freeze(p, utc("2024-04-01T05:59:59")).frozen
    after = check_freeze(p, utc("2024-04-01T06:00:00"))
    assert not after.frozen
    assert after.next_freeze is not None
    assert after.next_freeze.starts_at == utc("2024-04-05T16:00:00")  # 18:00 CEST


@pytest.mark.parametrize("window", [WEEKEND_CRON, WEEKEND_RRULE], ids=["cron", "rrule"])
def test_weekend_across_fall_back_ends_at_local_monday_8(window: RecurringWindow) -> None:
    # Berlin switches CEST -> CET on Sunday 2024-10-27.
    status = check_freeze(policy(window), utc("2024-10-27T12:00"))
    assert status.active[0].started_at == utc("2024-10-25T16:00:00")  # 18:00 CEST
    assert status.clear_at == utc("2024-10-28T07:00:00")  # 08:00 CET
    assert check_freeze(policy(window), utc("2024-10-28T06:30")).frozen
    assert not check_freeze(policy(window), utc("2024-10-28T07:00")).frozen


def test_start_in_spring_forward_gap_moves_forward_by_the_gap() -> None:
    nightly = RecurringWindow(
        name="backup",
        reason="nightly backup",
        tz="Europe/Berlin",
        cron="30 2 * * *",
        duration=timedelta(hours=1),
    )
    # 02:30 does not exist on 2024-03-31: the window runs 03:30-04:30 CEST (01:30-02:30 UTC).
    p = policy(nightly)
    assert not check_freeze(p, utc("2024-03-31T01:29")).frozen
    status = check_freeze(p, utc("2024-03-31T01:30"))
    assert status.frozen
    assert status.clear_at == utc("2024-03-31T02:30")
    # On an ordinary day 02:30-03:30 CEST is 00:30-01:30 UTC.
    assert check_freeze(p, utc("2024-04-01T00:30")).frozen
    assert not check_freeze(p, utc("2024-04-01T01:30")).frozen


def test_start_in_repeated_fall_back_hour_uses_its_first_occurrence() -> None:
    nightly = RecurringWindow(
        name="backup",
        reason="nightly backup",
        tz="Europe/Berlin",
        cron="30 2 * * *",
        duration=timedelta(minutes=20),
    )
    # 02:30 happens twice on 2024-10-27; the first is 02:30 CEST = 00:30 UTC.
    status = check_freeze(policy(nightly), utc("2024-10-27T00:35"))
    assert status.frozen
    assert status.active[0].started_at == utc("2024-10-27T00:30")


def test_cron_day_of_month_or_day_of_week_like_cron() -> None:
    # Both restricted: cron fires on the 13th OR on Fridays.
    w = RecurringWindow(
        name="unlucky",
        reason="superstition",
        tz="UTC",
        cron="0 0 13 * fri",
        duration=timedelta(hours=24),
    )
    p = policy(w)
    assert check_freeze(p, utc("2024-05-13T12:00")).frozen  # Monday the 13th
    assert check_freeze(p, utc("2024-05-17T12:00")).frozen  # Friday the 17th
    assert not check_freeze(p, utc("2024-05-14T12:00")).frozen  # Tuesday the 14th


def test_cron_lists_ranges_steps_and_names() -> None:
    w = RecurringWindow(
        name="business-hours-slots",
        reason="batch jobs",
        tz="UTC",
        cron="*/15 9-10 * jan,jul mon-fri",
        duration=timedelta(minutes=5),
    )
    p = policy(w)
    assert check_freeze(p, utc("2024-07-01T09:47")).frozen  # Monday, 09:45 slot
    assert not check_freeze(p, utc("2024-07-01T09:50")).frozen
    assert not check_freeze(p, utc("2024-07-01T11:00")).frozen  # outside hours
    assert not check_freeze(p, utc("2024-07-06T09:46")).frozen  # Saturday
    assert not check_freeze(p, utc("2024-08-01T09:46")).frozen  # August


def test_rrule_interval_counts_from_dtstart() -> None:
    fortnightly = RecurringWindow(
        name="sprint-review",
        reason="sprint review",
        tz="UTC",
        rrule="FREQ=WEEKLY;INTERVAL=2;BYDAY=WE;BYHOUR=14;BYMINUTE=0;BYSECOND=0",
        dtstart=datetime(2024, 1, 3),
        duration=timedelta(hours=2),
    )
    p = policy(fortnightly)
    assert check_freeze(p, utc("2024-01-17T15:00")).frozen
    assert not check_freeze(p, utc("2024-01-24T15:00")).frozen
    assert check_freeze(p, utc("2024-01-31T15:00")).frozen


def test_back_to_back_occurrences_and_windows_chain_into_one_end() -> None:
    minutely = RecurringWindow(
        name="night",
        reason="maintenance",
        tz="UTC",
        cron="* 0-5 * * *",
        duration=timedelta(minutes=1),
    )
    follow_up = OneOffWindow(
        name="follow-up",
        reason="cleanup",
        tz="UTC",
        start=datetime(2024, 3, 30, 6, 0),
        end=datetime(2024, 3, 30, 7, 30),
    )
    status = check_freeze(policy(minutely, follow_up), utc("2024-03-30T01:00:30"))
    assert [a.name for a in status.active] == ["night"]
    assert status.active[0].ends_at == utc("2024-03-30T06:00")
    assert status.clear_at == utc("2024-03-30T07:30")


def test_overlapping_windows_all_named() -> None:
    a = OneOffWindow(
        name="a", reason="ra", tz="UTC", start=datetime(2024, 1, 1), end=datetime(2024, 1, 3)
    )
    b = OneOffWindow(
        name="b", reason="rb", tz="UTC", start=datetime(2024, 1, 2), end=datetime(2024, 1, 5)
    )
    status = check_freeze(policy(a, b), utc("2024-01-02T12:00"))
    assert {f.name for f in status.active} == {"a", "b"}
    assert status.clear_at == utc("2024-01-05T00:00")


def test_windows_load_from_config_as_code() -> None:
    data: list[dict[str, Any]] = [
        {
            "kind": "once",
            "name": "x",
            "reason": "r",
            "tz": "UTC",
            "start": "2024-01-01T00:00:00",
            "end": "2024-01-02T00:00:00",
        },
        {
            "kind": "recurring",
            "name": "y",
            "reason": "r",
            "tz": "Europe/London",
            "cron": "0 18 * * fri",
            "duration": "PT62H",
        },
    ]
    windows = TypeAdapter(tuple[FreezeWindow, ...]).validate_python(data)
    assert isinstance(windows[0], OneOffWindow)
    assert isinstance(windows[1], RecurringWindow)
    assert windows[1].duration == timedelta(hours=62)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tz": "Mars/Olympus", "cron": "0 0 * * *"}, "unknown IANA time zone"),
        ({"tz": "UTC", "cron": "0 0 * *"}, "5 fields"),
        ({"tz": "UTC", "cron": "61 0 * * *"}, "outside 0-59"),
        ({"tz": "UTC", "cron": "0 0 * * *", "rrule": "FREQ=DAILY"}, "exactly one"),
        ({"tz": "UTC"}, "exactly one"),
        ({"tz": "UTC", "rrule": "DTSTART:20240101T000000\nRRULE:FREQ=DAILY"}, "dtstart"),
        ({"tz": "UTC", "rrule": "FREQ=SOMETIMES"}, "FREQ"),
        ({"tz": "UTC", "cron": "0 0 * * *", "duration": "PT0S"}, "positive duration"),
    ],
)
def test_invalid_recurring_windows_are_refused(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"name": "w", "reason": "r", "duration": "PT1H"} | kwargs
    with pytest.raises(ValidationError, match=message):
        RecurringWindow.model_validate(fields)


def test_one_off_window_ending_before_start_is_refused() -> None:
    with pytest.raises(ValidationError, match="ends before it starts"):
        OneOffWindow(
            name="w", reason="r", tz="UTC", start=datetime(2024, 1, 2), end=datetime(2024, 1, 1)
        )


# --- the change calendar over real HTTP ------------------------------------------------------

TOKEN = "calendar-token-for-tests"


@dataclass
class CalendarServer:
    """A real HTTP change calendar on loopback; tests set what it answers."""

    url: str
    status: int = 200
    body: bytes = b'{"freezes": []}'
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def calendar_server() -> Iterator[CalendarServer]:
    state = CalendarServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            state.requests.append(
                {
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "auth": self.headers.get("Authorization"),
                }
            )
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, body = 401, b'{"error": "bad token"}'
            else:
                status, body = state.status, state.body
            self.send_response(status)
            if status in (301, 302):
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    with serving(Handler) as port:
        state.url = f"http://127.0.0.1:{port}/api"
        yield state


def _calendar(server: CalendarServer, token: str = TOKEN) -> ChangeCalendar:
    return ChangeCalendar(server.url, SecretStr(token), timeout=2.0)


def test_calendar_freeze_is_reported_with_its_end(calendar_server: CalendarServer) -> None:
    calendar_server.body = json.dumps(
        {
            "freezes": [
                {
                    "name": "CHG-4711",
                    "reason": "core banking upgrade",
                    "starts_at": "2024-05-01T00:00:00Z",
                    "ends_at": "2024-05-03T06:00:00+02:00",
                    "owner": "itsm",  # unknown fields from the calendar are ignored
                }
            ]
        }
    ).encode()
    at = utc("2024-05-02T12:00")
    status = evaluate_freeze(
        policy(calendar=CalendarMode.FAIL_CLOSED), at, _calendar(calendar_server)
    )
    assert status.frozen
    (freeze,) = status.active
    assert (freeze.name, freeze.source) == ("CHG-4711", FreezeSource.CALENDAR)
    assert freeze.ends_at == utc("2024-05-03T04:00")
    assert status.clear_at == utc("2024-05-03T04:00")
    (request,) = calendar_server.requests
    assert request["path"] == "/api/v1/freezes"
    assert request["query"]["environment"] == ["prod"]
    assert datetime.fromisoformat(request["query"]["at"][0]) == at


def test_calendar_and_windows_combine(calendar_server: CalendarServer) -> None:
    status = evaluate_freeze(
        policy(WEEKEND_CRON, calendar=CalendarMode.FAIL_CLOSED),
        utc("2024-03-30T12:00"),
        _calendar(calendar_server),
    )
    assert [f.name for f in status.active] == ["weekend"]
    assert not status.warnings


@pytest.mark.parametrize(
    ("status_code", "body", "why"),
    [
        (500, b"oops", "HTTP 500"),
        (200, b"not json", "unreadable"),
        (200, b'{"freezes": [{"name": "x", "ends_at": "2024-05-03T06:00:00"}]}', "unreadable"),
        (302, b"", "HTTP 302"),
    ],
    ids=["server-error", "garbage", "naive-time", "redirect-not-followed"],
)
def test_calendar_failure_fails_closed(
    calendar_server: CalendarServer, status_code: int, body: bytes, why: str
) -> None:
    calendar_server.status, calendar_server.body = status_code, body
    status = evaluate_freeze(
        policy(calendar=CalendarMode.FAIL_CLOSED),
        utc("2024-05-02T12:00"),
        _calendar(calendar_server),
    )
    assert status.frozen
    (freeze,) = status.active
    assert freeze.source is FreezeSource.CALENDAR_UNAVAILABLE
    assert why in freeze.reason
    assert status.clear_at is None
    with pytest.raises(PolicyRefusal, match="change-calendar"):
        status.raise_if_frozen()


def test_wrong_token_fails_closed(calendar_server: CalendarServer) -> None:
    status = evaluate_freeze(
        policy(calendar=CalendarMode.FAIL_CLOSED),
        utc("2024-05-02T12:00"),
        _calendar(calendar_server, token="stolen"),
    )
    assert status.frozen
    assert "HTTP 401" in status.active[0].reason


def test_unreachable_calendar_fails_closed_or_open_as_configured() -> None:
    # Bind a port and close it again: nothing listens there.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = ChangeCalendar(f"http://127.0.0.1:{port}", SecretStr(TOKEN), timeout=1.0)
    at = utc("2024-05-02T12:00")
    closed = evaluate_freeze(policy(calendar=CalendarMode.FAIL_CLOSED), at, dead)
    assert closed.frozen and "unreachable" in closed.active[0].reason
    opened = evaluate_freeze(policy(calendar=CalendarMode.FAIL_OPEN), at, dead)
    assert not opened.frozen
    assert opened.warnings and "fail-open" in opened.warnings[0]


def test_missing_calendar_configuration_fails_closed() -> None:
    status = evaluate_freeze(policy(calendar=CalendarMode.FAIL_CLOSED), utc("2024-05-02T12:00"))
    assert status.frozen
    assert "no change calendar is configured" in status.active[0].reason


def test_calendar_mode_off_never_asks(calendar_server: CalendarServer) -> None:
    status = evaluate_freeze(policy(), utc("2024-05-02T12:00"), _calendar(calendar_server))
    assert not status.frozen
    assert calendar_server.requests == []
