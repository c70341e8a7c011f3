"""A loopback server speaking ServiceNow's Table API for incidents, for tests.

It answers the documented shape: ``GET /api/now/table/incident`` with ``sysparm_query``,
``sysparm_fields``, ``sysparm_display_value`` and ``sysparm_exclude_reference_link``;
``{"result": [...]}`` on success; ``{"error": {"message", "detail"}, "status": "failure"}``
with 401 for missing or wrong credentials and 403 for an account without read rights.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.http import serving

#: Accounts the server knows: basic auth (USER or the role-less "no.role", both with
#: PASSWORD) and an OAuth bearer TOKEN.
USER, PASSWORD, TOKEN = "portcullis.reader", "s3cret-pw", "oauth-token-123"

STATES = {
    "1": "New",
    "2": "In Progress",
    "3": "On Hold",
    "5": "Awaiting Vendor",
    "6": "Resolved",
    "7": "Closed",
    "8": "Canceled",
}
PRIORITIES = {
    "1": "1 - Critical",
    "2": "2 - High",
    "3": "3 - Moderate",
    "4": "4 - Low",
    "5": "5 - Planning",
}


def incident_row(
    number: str,
    *,
    state: str = "2",
    priority: str = "1",
    ci: str | None = "hello",
    service: str | None = "Hello Web",
    opened: datetime | None = None,
) -> dict[str, Any]:
    """A stored incident: each field as (stored value, display value, referenced table).

    Args:
        number: ticket number, e.g. INC0010001.
        state: ServiceNow state code (see ``STATES``).
        priority: priority code 1-5.
        ci: configuration item (the app) the ticket names, or None.
        service: business service the ticket names, or None.
        opened: when it was opened (UTC); default three hours ago.

    Returns:
        The row as :class:`TableApi` stores it.
    """
    opened = opened or datetime.now(UTC) - timedelta(hours=3)
    sys_id = f"{abs(hash(number)):032x}"[:32]
    return {
        "number": (number, number, None),
        "sys_id": (sys_id, sys_id, None),
        "state": (state, STATES[state], None),
        "priority": (priority, PRIORITIES[priority], None),
        "cmdb_ci": ("a1" * 16 if ci else "", ci or "", "cmdb_ci"),
        "business_service": ("b2" * 16 if service else "", service or "", "cmdb_ci_service"),
        "short_description": ("Checkout returns 502", "Checkout returns 502", None),
        "opened_at": (
            opened.strftime("%Y-%m-%d %H:%M:%S"),
            # Display values are in the user's time zone; the stored value is UTC.
            (opened + timedelta(hours=1)).strftime("%d.%m.%Y %H:%M:%S"),
            None,
        ),
        "caller_id": ("c3" * 16, "Abel Tuter", "sys_user"),
    }


@dataclass
class TableApi:
    """What the loopback instance holds and how it behaves."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, list[str]]] = field(default_factory=list)
    no_rows_status: int = 200  # some releases answer an empty query with 404
    fail_with: int | None = None


def _shape(
    row: dict[str, Any], fields: list[str], display: str, exclude_links: bool, base: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields or list(row):
        if name not in row:
            continue
        value, shown, ref_table = row[name]
        if display == "all":
            cell: dict[str, Any] = {"display_value": shown, "value": value}
            if ref_table and value and not exclude_links:
                cell["link"] = f"{base}/api/now/table/{ref_table}/{value}"
            out[name] = cell
        elif display == "true":
            out[name] = shown
        elif ref_table and value and not exclude_links:
            out[name] = {"link": f"{base}/api/now/table/{ref_table}/{value}", "value": value}
        else:
            out[name] = value
    return out


def _handler(api: TableApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, detail: str) -> None:
            self._send(
                status, {"error": {"message": message, "detail": detail}, "status": "failure"}
            )

        def _user(self) -> str | None:
            header = self.headers.get("Authorization", "")
            scheme, _, cred = header.partition(" ")
            if scheme == "Bearer" and cred == TOKEN:
                return "oauth"
            if scheme == "Basic":
                user, _, pw = base64.b64decode(cred).decode().partition(":")
                if (user, pw) in ((USER, PASSWORD), ("no.role", PASSWORD)):
                    return user
            return None

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            api.requests.append(query)
            user = self._user()
            if user is None:
                self._error(401, "User Not Authenticated", "Required to provide Auth information")
                return
            if user == "no.role":
                self._error(
                    403,
                    "Insufficient rights to query records",
                    "Fields present in the query do not have permission to be read",
                )
                return
            if api.fail_with is not None:
                self._error(api.fail_with, "Service unavailable", "node is restarting")
                return
            if parts.path != "/api/now/table/incident":
                self._error(400, f"Invalid table {parts.path.rsplit('/', 1)[-1]}", "null")
                return
            conditions = [
                c.partition("=") for c in query.get("sysparm_query", [""])[0].split("^") if c
            ]
            rows = [r for r in api.rows if all(r.get(k, ("",))[0] == v for k, _, v in conditions)]
            limit = int(query.get("sysparm_limit", ["10000"])[0])
            rows = rows[:limit]
            if not rows and api.no_rows_status == 404:
                self._error(
                    404,
                    "No Record found",
                    "Records matching query not found. Check query parameter or offset parameter",
                )
                return
            fields = [f for f in query.get("sysparm_fields", [""])[0].split(",") if f]
            display = query.get("sysparm_display_value", ["false"])[0]
            exclude = query.get("sysparm_exclude_reference_link", ["false"])[0] == "true"
            base = f"http://{self.headers.get('Host')}"
            self._send(200, {"result": [_shape(r, fields, display, exclude, base) for r in rows]})

    return Handler


@contextmanager
def serve(api: TableApi) -> Iterator[str]:
    """Serve ``api`` on a free loopback port; yields the instance's base URL.

    Args:
        api: the incidents and behaviour to serve (may be changed while serving).

    Returns:
        A context manager whose value is ``http://127.0.0.1:<port>``.
    """
    with serving(_handler(api)) as port:
        yield f"http://127.0.0.1:{port}"
