"""Change freeze: windows as code per environment, and an optional external change calendar.

A freeze window is written in the wall-clock time of a named IANA time zone, because that is
how people decide freezes ("no deploys from Friday 18:00 to Monday 08:00 Berlin time").
Occurrences are therefore computed in local wall-clock time and only then turned into
absolute instants, which keeps them correct across daylight-saving transitions:

* a local time that does not exist (skipped by a spring-forward) moves forward by the gap,
  e.g. 02:30 on the day Berlin jumps from 02:00 to 03:00 means 03:30 CEST;
* a local time that happens twice (fall-back) means its first occurrence;
* a recurring window's duration is added in wall-clock time, so "Friday 18:00 + 62 h" ends
  on Monday 08:00 local even when the clocks changed over the weekend.

:func:`check_freeze` is pure: windows plus an instant give a :class:`FreezeStatus`.
:class:`ChangeCalendar` asks an external calendar over HTTP; :func:`evaluate_freeze` combines
both following the environment's :class:`CalendarMode` (production fails closed when the
calendar cannot be asked).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Literal, assert_never
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from cronsim import CronSim, CronSimError
from dateutil import rrule as du
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from portcullis.errors import PolicyRefusal
from portcullis.models import Frozen

# A window that chains into itself for longer than this many occurrences is reported as
# having no known end instead of searching forever ("* * * * *" with a one-minute duration).
_MAX_CHAIN = 20_000
# Wall-clock and absolute time differ by at most a few hours (DST offsets); one day of
# margin around a query is always enough to find every candidate occurrence.
_MARGIN = timedelta(days=1)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {name!r} (e.g. 'Europe/Berlin', 'UTC')") from None


def _to_utc(local_wall: datetime, tz: ZoneInfo) -> datetime:
    """Local wall-clock time to an absolute instant (fold=0: see the module docstring)."""
    return local_wall.replace(tzinfo=tz, fold=0).astimezone(UTC)


def plain_utc(at: datetime) -> datetime:
    """``at`` as a plain stdlib UTC datetime.

    Prefect hands out pendulum-based datetime subclasses whose arithmetic drops the time zone
    (``start_time + timedelta`` comes back naive); rules only ever see plain datetimes.
    """
    u = at.astimezone(UTC)
    return datetime(u.year, u.month, u.day, u.hour, u.minute, u.second, u.microsecond, tzinfo=UTC)


def _require_aware(at: datetime, what: str) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise PolicyRefusal(
            f"{what} {at.isoformat()} has no time zone",
            hint="pass an aware datetime, e.g. datetime.now(UTC)",
        )
    return plain_utc(at)


class Interval(Frozen):
    """One occurrence of a window as absolute instants: ``start <= t < end``."""

    start: datetime
    end: datetime

    def covers(self, at: datetime) -> bool:
        """True when ``at`` falls inside the interval (end excluded)."""
        return self.start <= at < self.end


class _WindowBase(Frozen):
    name: str = Field(min_length=1, description="short name shown in refusals, e.g. 'weekend'")
    reason: str = Field(min_length=1, description="why deploys are frozen, shown in refusals")
    tz: str = Field(description="IANA time zone the window's times are written in")

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        _zone(value)
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The window's time zone."""
        return _zone(self.tz)


class OneOffWindow(_WindowBase):
    """A single freeze, e.g. the release weekend. Naive times are wall-clock in ``tz``."""

    kind: Literal["once"] = "once"
    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _ordered(self) -> OneOffWindow:
        if self.interval.end <= self.interval.start:
            raise ValueError(f"freeze window {self.name!r} ends before it starts")
        return self

    @property
    def interval(self) -> Interval:
        """The window as absolute instants."""
        return Interval(start=self._abs(self.start), end=self._abs(self.end))

    def _abs(self, value: datetime) -> datetime:
        if value.tzinfo is None:
            return _to_utc(value, self.zone)
        return value.astimezone(UTC)

    def covering(self, at: datetime) -> Interval | None:
        """The occurrence active at ``at`` (UTC), or None."""
        iv = self.interval
        return iv if iv.covers(at) else None

    def next_start(self, at: datetime) -> datetime | None:
        """The first start strictly after ``at``, or None."""
        start = self.interval.start
        return start if start > at else None

    def chain_end(self, iv: Interval) -> datetime | None:
        """When this window stops covering, starting from occurrence ``iv``."""
        return iv.end


_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_CRON_ALLOWED = (
    "0-59",
    "0-23",
    "1-31 on a day the chosen months have",
    "1-12 or jan-dec",
    "0-7 or sun-sat",
)


@lru_cache(maxsize=256)
def _check_cron(expr: str) -> None:
    """Refuse a cron expression that cronsim cannot read, naming the expression and field."""
    fields = expr.split()
    # cronsim also takes a leading seconds field; windows are written in classic 5-field cron.
    if len(fields) != 5:
        raise ValueError(
            f"cron expression {expr!r} must have 5 fields (minute hour day month weekday)"
        )
    try:
        CronSim(expr, datetime(2020, 1, 1))
    except CronSimError as exc:
        # cronsim only says "Bad <field>"; add the field's text and what it allows.
        for index, what in enumerate(_CRON_FIELDS):
            if str(exc) == f"Bad {what}":
                raise ValueError(
                    f"cron expression {expr!r}: {what} field {fields[index]!r} is not valid "
                    f"(a value outside {_CRON_ALLOWED[index]}, or a bad list, range or step)"
                ) from None
        raise ValueError(f"cron expression {expr!r} is not valid: {exc}") from None


@lru_cache(maxsize=256)
def _parse_rrule(text: str, dtstart: datetime) -> du.rrulebase:
    upper = text.upper()
    if "DTSTART" in upper or "TZID" in upper:
        raise ValueError("put the start in 'dtstart' and the zone in 'tz', not in the RRULE text")
    return du.rrulestr(text, dtstart=dtstart, cache=True)


class RecurringWindow(_WindowBase):
    """A freeze that repeats: an RFC 5545 RRULE or a 5-field cron expression, plus a duration.

    Exactly one of ``rrule`` or ``cron`` is set. Times are wall-clock in ``tz``.
    """

    kind: Literal["recurring"] = "recurring"
    rrule: str | None = Field(
        default=None, description="e.g. 'FREQ=WEEKLY;BYDAY=FR;BYHOUR=18;BYMINUTE=0;BYSECOND=0'"
    )
    dtstart: datetime = Field(
        default=datetime(2020, 1, 6),
        description="naive wall-clock anchor for the RRULE (INTERVAL/COUNT count from here)",
    )
    cron: str | None = Field(default=None, description="e.g. '0 18 * * fri' (start times)")
    duration: timedelta = Field(description="how long each occurrence lasts (wall-clock)")

    @model_validator(mode="after")
    def _one_rule(self) -> RecurringWindow:
        if (self.rrule is None) == (self.cron is None):
            raise ValueError(f"freeze window {self.name!r} needs exactly one of 'rrule' or 'cron'")
        if self.duration <= timedelta(0):
            raise ValueError(f"freeze window {self.name!r} needs a positive duration")
        if self.dtstart.tzinfo is not None:
            raise ValueError("'dtstart' is wall-clock time in 'tz': give it without an offset")
        if self.cron is not None:
            _check_cron(self.cron)
        else:
            assert self.rrule is not None
            _parse_rrule(self.rrule, self.dtstart)
        return self

    def _starts_from(self, local_from: datetime) -> Iterator[datetime]:
        """Naive local start times at or after ``local_from``, in order."""
        if self.cron is not None:
            # Started near the query so iteration never walks years of minutes. cronsim yields
            # times strictly after its start and ignores microseconds: one microsecond earlier
            # makes ``local_from`` itself count. Naive times: cronsim stays in wall-clock time.
            return CronSim(self.cron, local_from - timedelta(microseconds=1))
        assert self.rrule is not None
        return _parse_rrule(self.rrule, self.dtstart).xafter(local_from, inc=True)

    def _interval(self, local_start: datetime) -> Interval:
        tz = self.zone
        start = _to_utc(local_start, tz)
        # A start inside a spring-forward gap moves forward by the gap, and the whole
        # occurrence with it: re-read the real local start before adding the duration.
        real_local = start.astimezone(tz).replace(tzinfo=None)
        return Interval(start=start, end=_to_utc(real_local + self.duration, tz))

    def covering(self, at: datetime) -> Interval | None:
        """The occurrence active at ``at`` (UTC) that ends last, or None."""
        local = at.astimezone(self.zone).replace(tzinfo=None)
        best: Interval | None = None
        for start in self._starts_from(local - self.duration - _MARGIN):
            if start > local + _MARGIN:
                break
            iv = self._interval(start)
            if iv.covers(at) and (best is None or iv.end > best.end):
                best = iv
        return best

    def next_start(self, at: datetime) -> datetime | None:
        """The first start strictly after ``at``, or None when the rule has ended."""
        local = at.astimezone(self.zone).replace(tzinfo=None)
        for start in self._starts_from(local - _MARGIN):
            instant = _to_utc(start, self.zone)
            if instant > at:
                return instant
        return None

    def chain_end(self, iv: Interval) -> datetime | None:
        """When back-to-back occurrences starting at ``iv`` stop covering; None if not found."""
        end = iv.end
        local = iv.start.astimezone(self.zone).replace(tzinfo=None)
        for start in itertools.islice(self._starts_from(local), _MAX_CHAIN):
            nxt = self._interval(start)
            if nxt.start > end:
                return end
            end = max(end, nxt.end)
        return None


FreezeWindow = Annotated[OneOffWindow | RecurringWindow, Field(discriminator="kind")]


class CalendarMode(enum.StrEnum):
    """Whether and how an environment consults the external change calendar."""

    OFF = "off"
    FAIL_OPEN = "fail-open"
    """Ask it; if it cannot answer, go on and record a warning."""
    FAIL_CLOSED = "fail-closed"
    """Ask it; if it cannot answer, the environment counts as frozen (production)."""


class FreezePolicy(Frozen):
    """The freeze rules of one environment. Loaded from deploy-side config, never parameters."""

    environment: str
    windows: tuple[FreezeWindow, ...] = ()
    calendar: CalendarMode = CalendarMode.OFF


class FreezeSource(enum.StrEnum):
    """Where an active freeze came from."""

    POLICY = "policy"
    CALENDAR = "calendar"
    CALENDAR_UNAVAILABLE = "calendar-unavailable"


class ActiveFreeze(Frozen):
    """One freeze in force at the time asked about."""

    name: str
    reason: str
    source: FreezeSource
    started_at: datetime | None = None
    ends_at: datetime | None = Field(default=None, description="None: no known end")


class UpcomingFreeze(Frozen):
    """The next policy window that will start."""

    name: str
    reason: str
    starts_at: datetime


class FreezeStatus(Frozen):
    """The answer for one environment at one instant."""

    environment: str
    at: datetime
    active: tuple[ActiveFreeze, ...] = ()
    clear_at: datetime | None = Field(
        default=None,
        description="when no freeze covers any more (None while frozen: no known end)",
    )
    next_freeze: UpcomingFreeze | None = None
    warnings: tuple[str, ...] = ()

    @property
    def frozen(self) -> bool:
        """True when at least one freeze is in force."""
        return bool(self.active)

    def summary(self) -> str:
        """One line for logs, the approval form and refusals."""
        if not self.active:
            text = f"no change freeze for {self.environment} at {self.at.isoformat()}"
            if self.next_freeze is not None:
                text += (
                    f"; next freeze '{self.next_freeze.name}' starts "
                    f"{self.next_freeze.starts_at.isoformat()}"
                )
            return text
        parts = []
        for freeze in self.active:
            until = freeze.ends_at.isoformat() if freeze.ends_at else "no known end"
            parts.append(f"'{freeze.name}' ({freeze.reason}; until {until})")
        ends = self.clear_at.isoformat() if self.clear_at else "no known end"
        return f"{self.environment} is frozen: {', '.join(parts)}; deploys possible again: {ends}"

    def raise_if_frozen(self) -> None:
        """Raise a :class:`PolicyRefusal` naming each window, its reason and when it ends."""
        if not self.active:
            return
        raise PolicyRefusal(
            f"change freeze: {self.summary()}",
            hint="wait until the freeze ends, or follow the emergency change procedure",
        )


def _clear_time(
    windows: Sequence[OneOffWindow | RecurringWindow],
    external: Sequence[ActiveFreeze],
    first: datetime,
) -> datetime | None:
    """Earliest instant from ``first`` on at which nothing covers any more."""
    t = first
    for _ in range(_MAX_CHAIN):
        ends: list[datetime] = []
        for window in windows:
            iv = window.covering(t)
            if iv is not None:
                end = window.chain_end(iv)
                if end is None:
                    return None
                ends.append(end)
        for freeze in external:
            if freeze.ends_at is None:
                return None
            starts = freeze.started_at or t
            if starts <= t < freeze.ends_at:
                ends.append(freeze.ends_at)
        if not ends:
            return t
        t = max(ends)
    return None


def check_freeze(
    policy: FreezePolicy,
    at: datetime,
    external: Sequence[ActiveFreeze] = (),
    warnings: Sequence[str] = (),
) -> FreezeStatus:
    """Decide whether ``policy.environment`` is frozen at ``at``. Pure.

    Args:
        policy: the environment's windows.
        at: the instant to judge; must carry a time zone.
        external: freezes reported by the change calendar (see :func:`evaluate_freeze`).
        warnings: notes to carry into the status (e.g. a fail-open calendar that was down).

    Returns:
        Every freeze in force, when all of them are over, and the next window to start.
    """
    at = _require_aware(at, "freeze check time")
    active: list[ActiveFreeze] = []
    for window in policy.windows:
        iv = window.covering(at)
        if iv is not None:
            active.append(
                ActiveFreeze(
                    name=window.name,
                    reason=window.reason,
                    source=FreezeSource.POLICY,
                    started_at=iv.start,
                    ends_at=window.chain_end(iv),
                )
            )
    active.extend(external)
    upcoming: UpcomingFreeze | None = None
    for window in policy.windows:
        start = window.next_start(at)
        if start is not None and (upcoming is None or start < upcoming.starts_at):
            upcoming = UpcomingFreeze(name=window.name, reason=window.reason, starts_at=start)
    clear_at: datetime | None = None
    if active:
        ends = [a.ends_at for a in active]
        if all(e is not None for e in ends):
            clear_at = _clear_time(policy.windows, external, max(e for e in ends if e))
    return FreezeStatus(
        environment=policy.environment,
        at=at,
        active=tuple(active),
        clear_at=clear_at,
        next_freeze=upcoming,
        warnings=tuple(warnings),
    )


class CalendarFreeze(BaseModel):
    """One entry of the change calendar's answer (its wire format)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1)
    reason: str = ""
    starts_at: datetime | None = None
    ends_at: datetime | None = None

    @field_validator("starts_at", "ends_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("calendar times must carry a UTC offset")
        return value


class CalendarReply(BaseModel):
    """The change calendar's answer: the freezes in force at the time asked about."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    freezes: tuple[CalendarFreeze, ...]


class CalendarAnswer(Frozen):
    """What :meth:`ChangeCalendar.query` found: freezes, or why the calendar could not answer."""

    freezes: tuple[ActiveFreeze, ...] = ()
    error: str | None = None


class ChangeCalendar:
    """Client for an external change calendar.

    Protocol: ``GET {base_url}/v1/freezes?environment=ENV&at=ISO8601`` with
    ``Authorization: Bearer TOKEN`` answers ``{"freezes": [{"name", "reason", "starts_at",
    "ends_at"}]}`` listing the freezes in force at ``at``. Redirects are not followed, so the
    token never leaves for another host.

    Args:
        base_url: where the calendar answers, e.g. ``https://itsm.example/api``.
        token: bearer token, from deploy-side configuration.
        timeout: seconds for the whole request.
    """

    def __init__(self, base_url: str, token: SecretStr, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def query(self, environment: str, at: datetime) -> CalendarAnswer:
        """Ask which freezes are in force; never raises for an unreachable calendar.

        Returns:
            the freezes, or an answer whose ``error`` says why the calendar could not answer.
        """
        at = _require_aware(at, "calendar query time")
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
                response = client.get(
                    f"{self.base_url}/v1/freezes",
                    params={"environment": environment, "at": at.isoformat()},
                    headers={"Authorization": f"Bearer {self._token.get_secret_value()}"},
                )
        except httpx.HTTPError as exc:
            return CalendarAnswer(error=f"change calendar {self.base_url} unreachable: {exc}")
        if response.status_code != 200:
            return CalendarAnswer(
                error=f"change calendar {self.base_url} answered HTTP {response.status_code}"
            )
        try:
            reply = CalendarReply.model_validate_json(response.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            return CalendarAnswer(
                error=f"change calendar {self.base_url} sent an unreadable answer: {first['msg']}"
            )
        return CalendarAnswer(
            freezes=tuple(
                ActiveFreeze(
                    name=f.name,
                    reason=f.reason or "listed in the change calendar",
                    source=FreezeSource.CALENDAR,
                    started_at=f.starts_at.astimezone(UTC) if f.starts_at else None,
                    ends_at=f.ends_at.astimezone(UTC) if f.ends_at else None,
                )
                for f in reply.freezes
            )
        )


def evaluate_freeze(
    policy: FreezePolicy, at: datetime, calendar: ChangeCalendar | None = None
) -> FreezeStatus:
    """Windows plus, as the policy says, the external calendar.

    Args:
        policy: the environment's freeze policy.
        at: the instant to judge (aware).
        calendar: the configured calendar client; required unless the policy's mode is OFF.

    Returns:
        the combined status. In FAIL_CLOSED mode an unreachable or missing calendar is an
        active freeze named ``change-calendar``; in FAIL_OPEN mode it is a warning.
    """
    mode = policy.calendar
    if mode is CalendarMode.OFF:
        return check_freeze(policy, at)
    if mode is CalendarMode.FAIL_OPEN or mode is CalendarMode.FAIL_CLOSED:
        if calendar is None:
            answer = CalendarAnswer(error="no change calendar is configured for this deployment")
        else:
            answer = calendar.query(policy.environment, at)
        if answer.error is None:
            return check_freeze(policy, at, external=answer.freezes)
        if mode is CalendarMode.FAIL_OPEN:
            return check_freeze(policy, at, warnings=(f"{answer.error} (ignored: fail-open)",))
        unavailable = ActiveFreeze(
            name="change-calendar",
            reason=f"{answer.error}; this environment fails closed",
            source=FreezeSource.CALENDAR_UNAVAILABLE,
        )
        return check_freeze(policy, at, external=(unavailable,))
    assert_never(mode)
