"""Incident tickets: what the emergency path checks before it may skip the normal gates.

An emergency deployment names an incident ticket. The ticket is read from the incident system
(behind :class:`IncidentSystem`, so the rule does not care which product answers) and
:func:`check_emergency_ticket` decides whether it can justify an emergency deploy of one
service: the ticket must be open, P1 or P2, name that service, and be recent. Everything else
is refused with the reason, so an old or unrelated ticket cannot become a standing key to
production.

:class:`ServiceNowIncidents` reads ServiceNow's Table API (``/api/now/table/incident``).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, assert_never, runtime_checkable
from urllib.parse import urlsplit

import httpx
from pydantic import AwareDatetime, Field, SecretStr

from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.models import Frozen

# Ticket numbers are a letter prefix and digits (ServiceNow: INC0010001). Anything else is
# refused before it reaches a query string, where characters like ^ or = would change the query.
_TICKET_RE = re.compile(r"^[A-Z]{2,10}[0-9]{4,20}$")

#: How old an incident may be and still justify an emergency deploy.
DEFAULT_MAX_TICKET_AGE = timedelta(days=7)

#: How far a ticket's opening time may lie ahead of this host's clock (clock skew only).
TICKET_CLOCK_SKEW = timedelta(minutes=5)

#: The priorities (P-levels) the emergency path accepts.
EMERGENCY_PRIORITIES = frozenset({1, 2})


class IncidentState(enum.StrEnum):
    """Where an incident is in its life cycle (the states of ServiceNow's state model)."""

    NEW = "new"
    IN_PROGRESS = "in_progress"
    ON_HOLD = "on_hold"
    RESOLVED = "resolved"
    CLOSED = "closed"
    CANCELED = "canceled"


def is_open(state: IncidentState) -> bool:
    """True while the incident is still being worked on (new, in progress, on hold)."""
    match state:
        case IncidentState.NEW | IncidentState.IN_PROGRESS | IncidentState.ON_HOLD:
            return True
        case IncidentState.RESOLVED | IncidentState.CLOSED | IncidentState.CANCELED:
            return False
        case _:
            assert_never(state)


class Incident(Frozen):
    """One incident ticket as the incident system reported it."""

    number: str = Field(description="ticket number, e.g. INC0010001")
    state: IncidentState
    state_label: str = Field(description="the state as the incident system shows it")
    priority: int = Field(ge=1, le=5, description="P-level: 1 is the most urgent")
    priority_label: str = Field(description="the priority as shown, e.g. '1 - Critical'")
    services: tuple[str, ...] = Field(
        description="services the ticket names (configuration item, business service)"
    )
    short_description: str = ""
    opened_at: AwareDatetime = Field(description="when the incident was opened")
    system_id: str | None = Field(default=None, description="the system's own id (sys_id)")
    url: str | None = Field(default=None, description="where a person can open the ticket")


@runtime_checkable
class IncidentSystem(Protocol):
    """Somewhere incident tickets can be read."""

    def get(self, ticket: str) -> Incident:
        """Read ``ticket``.

        Raises:
            PolicyRefusal: the ticket does not exist or the number is malformed.
            ConfigurationError: the system refused our credentials or is misconfigured.
            TransientError: the system could not be reached; retrying may help.
        """
        ...


def normalise_ticket(ticket: str) -> str:
    """``ticket`` stripped and upper-cased, or a refusal when it is not a ticket number."""
    number = ticket.strip().upper()
    if not _TICKET_RE.fullmatch(number):
        raise PolicyRefusal(
            f"{ticket!r} is not an incident ticket number",
            hint="pass the ticket as its number, e.g. INC0010001",
        )
    return number


def check_emergency_ticket(
    incident: Incident,
    service: str,
    now: datetime,
    *,
    max_age: timedelta = DEFAULT_MAX_TICKET_AGE,
) -> None:
    """Refuse unless ``incident`` justifies an emergency deploy of ``service`` at ``now``.

    The ticket must be open, P1/P2, name ``service``, be opened no later than ``now`` (plus
    clock skew) and no earlier than ``max_age`` before it.

    Every failed condition is named in the refusal, not only the first.

    Args:
        incident: the ticket as read from the incident system.
        service: the service (app) being deployed; compared case-insensitively with the
            services the ticket names.
        now: the current time (timezone-aware).
        max_age: how long after it was opened a ticket still counts.

    Raises:
        PolicyRefusal: the ticket is not open, not P1/P2, names another service, is older
            than ``max_age``, or claims an opening time in the future.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    reasons: list[str] = []
    if not is_open(incident.state):
        reasons.append(
            f"it is {incident.state_label} ({incident.state.value}); only an open incident "
            "(new, in progress, on hold) can justify an emergency deploy"
        )
    if incident.priority not in EMERGENCY_PRIORITIES:
        reasons.append(
            f"it is P{incident.priority} ({incident.priority_label}); the emergency path is "
            "for P1 and P2 incidents only"
        )
    wanted = service.strip().casefold()
    if not incident.services:
        reasons.append(f"it names no service; it must name {service!r}")
    elif wanted not in {s.strip().casefold() for s in incident.services}:
        named = ", ".join(repr(s) for s in incident.services)
        reasons.append(f"it names {named}, not {service!r}")
    age = now - incident.opened_at
    if age < -TICKET_CLOCK_SKEW:
        reasons.append(
            f"it claims to be opened at {incident.opened_at:%Y-%m-%d %H:%M} UTC, in the future; "
            "a ticket's opening time must already have passed"
        )
    elif age > max_age:
        reasons.append(
            f"it was opened {_days(age)} ago ({incident.opened_at:%Y-%m-%d %H:%M} UTC); an "
            f"emergency ticket must be younger than {_days(max_age)}"
        )
    if reasons:
        raise PolicyRefusal(
            f"ticket {incident.number} cannot authorise an emergency deploy of {service}: "
            + "; ".join(reasons),
            hint="use the normal promotion path, or open a P1/P2 incident for this service",
        )


def _days(delta: timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:.1f} days"


# ServiceNow's state model: the stored value of incident.state and what it means.
SERVICENOW_STATES: dict[str, IncidentState] = {
    "1": IncidentState.NEW,
    "2": IncidentState.IN_PROGRESS,
    "3": IncidentState.ON_HOLD,
    "6": IncidentState.RESOLVED,
    "7": IncidentState.CLOSED,
    "8": IncidentState.CANCELED,
}

_SERVICENOW_FIELDS = (
    "number",
    "sys_id",
    "state",
    "priority",
    "cmdb_ci",
    "business_service",
    "short_description",
    "opened_at",
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServiceNowIncidents(IncidentSystem):
    """Reads incidents through ServiceNow's Table API.

    One ``GET /api/now/table/incident`` per ticket, asking for both stored and display values
    (``sysparm_display_value=all``) so the state and priority are read from their stored codes
    and the services from their names.

    Args:
        base_url: the instance, e.g. ``https://example.service-now.com``. Plain http is only
            accepted for loopback addresses, so credentials never cross a network unencrypted.
        username: account for basic auth (needs read access to the incident table).
        password: its password.
        token: an OAuth bearer token, instead of username and password.
        timeout: seconds per request (connect, read).
        verify: TLS verification: True, or the path of a CA bundle.
    """

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: SecretStr | None = None,
        token: SecretStr | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError(
                f"incident system URL {base_url!r} is not an http(s) URL",
                hint="set base_url to the instance, e.g. https://example.service-now.com",
            )
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ConfigurationError(
                f"incident system URL {base_url!r} uses plain http to a remote host",
                hint="use https; plain http is accepted for loopback test instances only",
            )
        basic = username is not None or password is not None
        if basic and token is not None:
            raise ConfigurationError(
                "incident system credentials name both a user and a token",
                hint="configure either username and password (basic auth) or a bearer token",
            )
        if token is None and (not username or password is None):
            raise ConfigurationError(
                "incident system credentials are incomplete",
                hint="configure username and password (basic auth), or a bearer token",
            )
        self.base_url = base_url.rstrip("/")
        self._username = username
        self._password = password
        self._token = token
        self.timeout = timeout
        self.verify = verify

    def __repr__(self) -> str:
        how = "token" if self._token is not None else f"user {self._username!r}"
        return f"ServiceNowIncidents({self.base_url!r}, {how})"

    def _auth_headers(self) -> tuple[httpx.Auth | None, dict[str, str]]:
        if self._token is not None:
            return None, {"Authorization": f"Bearer {self._token.get_secret_value()}"}
        assert self._username is not None and self._password is not None
        return httpx.BasicAuth(self._username, self._password.get_secret_value()), {}

    def get(self, ticket: str) -> Incident:
        """Read ``ticket`` from the instance's incident table.

        Args:
            ticket: the ticket number, e.g. INC0010001.

        Returns:
            The incident.

        Raises:
            PolicyRefusal: the number is malformed or no such ticket exists.
            ConfigurationError: HTTP 401/403 (credentials), or the URL is not a Table API.
            TransientError: network error, timeout, HTTP 429 or 5xx.
        """
        number = normalise_ticket(ticket)
        url = f"{self.base_url}/api/now/table/incident"
        params = {
            "sysparm_query": f"number={number}",
            "sysparm_fields": ",".join(_SERVICENOW_FIELDS),
            "sysparm_display_value": "all",
            "sysparm_exclude_reference_link": "true",
            # Two rows are enough to notice an ambiguous number.
            "sysparm_limit": "2",
        }
        auth, headers = self._auth_headers()
        headers["Accept"] = "application/json"
        try:
            response = httpx.get(
                url,
                params=params,
                headers=headers,
                auth=auth,
                timeout=httpx.Timeout(self.timeout),
                verify=self.verify,
                follow_redirects=False,
            )
        except httpx.TimeoutException as exc:
            raise TransientError(
                f"the incident system at {self.base_url} did not answer within "
                f"{self.timeout:g}s while reading {number}: {type(exc).__name__}",
                hint="retry; if it persists, check the instance's status",
            ) from exc
        except httpx.TransportError as exc:
            raise TransientError(
                f"the incident system at {self.base_url} cannot be reached while reading "
                f"{number}: {exc}",
                hint="check the network path to the instance and retry",
            ) from exc
        return self._parse(number, response)

    def _parse(self, number: str, response: httpx.Response) -> Incident:
        status = response.status_code
        body = _json_or_none(response)
        detail = _servicenow_error(body)
        if status in (401, 403):
            raise ConfigurationError(
                f"the incident system at {self.base_url} refused our credentials "
                f"(HTTP {status}{': ' + detail if detail else ''})",
                hint="check the incident block's username/password or token; the account "
                "needs read access to the incident table",
            )
        if status == 404 and body is not None and detail:
            # The Table API answers a query with no rows with 404 on some releases.
            raise PolicyRefusal(
                f"ticket {number} does not exist in the incident system at {self.base_url}",
                hint="check the ticket number",
            )
        if status == 429 or status >= 500:
            raise TransientError(
                f"the incident system at {self.base_url} answered HTTP {status} while "
                f"reading {number}{': ' + detail if detail else ''}",
                hint="retry later",
            )
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("result"), list):
            raise ConfigurationError(
                f"{self.base_url} did not answer like a ServiceNow Table API "
                f"(HTTP {status}, {response.headers.get('content-type', 'no content type')})",
                hint="set base_url to the instance root, e.g. https://example.service-now.com",
            )
        rows = [r for r in body["result"] if isinstance(r, dict)]
        # The query asked for an exact number; keep only exact matches all the same.
        rows = [r for r in rows if _value(r, "number").upper() == number]
        if not rows:
            raise PolicyRefusal(
                f"ticket {number} does not exist in the incident system at {self.base_url}",
                hint="check the ticket number",
            )
        if len(rows) > 1:
            raise PolicyRefusal(
                f"ticket number {number} matches more than one incident",
                hint="ask the incident system's administrators to fix the duplicate number",
            )
        return self._incident(number, rows[0])

    def _incident(self, number: str, row: dict[str, Any]) -> Incident:
        state_code = _value(row, "state")
        state = SERVICENOW_STATES.get(state_code)
        if state is None:
            raise PolicyRefusal(
                f"ticket {number} is in state {_display(row, 'state')!r} (code {state_code!r}), "
                "which the emergency path does not know",
                hint="only New, In Progress, On Hold, Resolved, Closed and Canceled are mapped",
            )
        priority_code = _value(row, "priority")
        if not priority_code.isdigit() or not 1 <= int(priority_code) <= 5:
            raise PolicyRefusal(
                f"ticket {number} has no usable priority ({_display(row, 'priority')!r})",
                hint="set the incident's impact and urgency so it gets a priority",
            )
        opened_raw = _value(row, "opened_at")
        try:
            # Stored date-times are UTC, "YYYY-MM-DD HH:MM:SS"; display values are local time.
            opened_at = datetime.strptime(opened_raw, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            raise ConfigurationError(
                f"ticket {number} has an opened_at value {opened_raw!r} that is not a "
                "ServiceNow date-time",
            ) from None
        services = tuple(
            name for name in (_display(row, "cmdb_ci"), _display(row, "business_service")) if name
        )
        sys_id = _value(row, "sys_id") or None
        url = f"{self.base_url}/nav_to.do?uri=incident.do%3Fsys_id%3D{sys_id}" if sys_id else None
        return Incident(
            number=number,
            state=state,
            state_label=_display(row, "state") or state.value,
            priority=int(priority_code),
            priority_label=_display(row, "priority") or priority_code,
            services=services,
            short_description=_display(row, "short_description"),
            opened_at=opened_at,
            system_id=sys_id,
            url=url,
        )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _servicenow_error(body: Any) -> str:
    """The message of a Table API error body ``{"error": {"message", "detail"}}``, or ''."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return ""
    err = body["error"]
    parts = [str(err[k]) for k in ("message", "detail") if err.get(k)]
    return " - ".join(parts)


def _field(row: dict[str, Any], name: str) -> tuple[str, str]:
    """(stored value, display value) of a field; plain strings count as both."""
    raw = row.get(name)
    if isinstance(raw, dict):
        value = raw.get("value")
        display = raw.get("display_value")
        return ("" if value is None else str(value), "" if display is None else str(display))
    if raw is None:
        return "", ""
    return str(raw), str(raw)


def _value(row: dict[str, Any], name: str) -> str:
    return _field(row, name)[0].strip()


def _display(row: dict[str, Any], name: str) -> str:
    return _field(row, name)[1].strip()


class TicketUse(Frozen):
    """The emergency promotions one ticket has served, and the re-authorisations for more."""

    ticket: str
    runs: tuple[str, ...] = ()
    reauthorisations: tuple[dict[str, str], ...] = Field(
        default=(), description="each: by (verified person), at, reason"
    )

    @property
    def allowed(self) -> int:
        """How many emergency promotions the ticket may serve: one, plus one per re-authorisation."""
        return 1 + len(self.reauthorisations)


class Emergency(Frozen):
    """Why the emergency path is taken: a verified, open incident."""

    ticket: str
    justification: str
    incident_summary: str
