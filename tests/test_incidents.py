"""Emergency tickets read over HTTP from a loopback server speaking ServiceNow's Table API.

The server (:mod:`tests.support.servicenow`) answers the documented shape: ``GET
/api/now/table/incident`` with ``sysparm_query``, ``sysparm_fields``, ``sysparm_display_value``
and ``sysparm_exclude_reference_link``; ``{"result": [...]}`` on success; ``{"error":
{"message", "detail"}, "status": "failure"}`` with 401 for missing or wrong credentials.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.incidents import IncidentSystemBlock
from infra.registry import free_port
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.incidents import (
    Incident,
    IncidentState,
    IncidentSystem,
    ServiceNowIncidents,
    check_emergency_ticket,
)
from tests.support.servicenow import PASSWORD, TOKEN, USER, TableApi, incident_row, serve

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
OPENED = NOW - timedelta(hours=3)


@pytest.fixture()
def servicenow() -> Iterator[tuple[str, TableApi]]:
    """A ServiceNow-shaped Table API on a free loopback port, with a few incidents."""
    api = TableApi(
        rows=[
            incident_row("INC0010001", state="2", priority="1", opened=OPENED),
            incident_row("INC0010002", state="7", priority="1", opened=OPENED),
            incident_row("INC0010003", state="6", priority="2", opened=OPENED),
            incident_row("INC0010004", state="1", priority="3", opened=OPENED),
            incident_row("INC0010005", state="3", priority="2", ci="billing", service="Billing",
                         opened=OPENED),
            incident_row("INC0010006", state="2", priority="1", opened=NOW - timedelta(days=30)),
            incident_row("INC0010007", state="5", priority="1", opened=OPENED),
            incident_row("INC0010008", state="8", priority="4", ci=None, service=None,
                         opened=OPENED),
            incident_row("INC0010009", state="1", priority="2", ci=None, service="hello",
                         opened=OPENED),
        ]
    )
    with serve(api) as url:
        yield url, api


def client(url: str, **kw: Any) -> ServiceNowIncidents:
    """A basic-auth client for the loopback instance unless told otherwise."""
    kw.setdefault("username", USER)
    kw.setdefault("password", SecretStr(PASSWORD))
    return ServiceNowIncidents(url, timeout=2.0, **kw)


def test_open_p1_ticket_for_the_service_passes(servicenow: tuple[str, TableApi]) -> None:
    url, api = servicenow
    incident = client(url).get("inc0010001")
    assert incident.number == "INC0010001"
    assert incident.state is IncidentState.IN_PROGRESS and incident.state_label == "In Progress"
    assert incident.priority == 1 and incident.priority_label == "1 - Critical"
    assert incident.services == ("hello", "Hello Web")
    assert incident.opened_at == NOW - timedelta(hours=3)  # the stored UTC value, not display
    assert incident.url is not None and incident.system_id and incident.system_id in incident.url
    check_emergency_ticket(incident, "hello", NOW)
    check_emergency_ticket(incident, "Hello Web", NOW)
    (request,) = api.requests
    assert request["sysparm_query"] == ["number=INC0010001"]
    assert request["sysparm_display_value"] == ["all"]
    assert set(request["sysparm_fields"][0].split(",")) >= {
        "number",
        "state",
        "priority",
        "cmdb_ci",
        "business_service",
    }


def test_bearer_token_and_business_service_only(servicenow: tuple[str, TableApi]) -> None:
    url, _ = servicenow
    incidents = ServiceNowIncidents(url, token=SecretStr(TOKEN))
    incident = incidents.get("INC0010009")
    assert incident.services == ("hello",)
    assert isinstance(incidents, IncidentSystem)
    check_emergency_ticket(incident, "hello", NOW)


@pytest.mark.parametrize(
    ("ticket", "reason"),
    [
        ("INC0010002", "it is Closed (closed)"),
        ("INC0010003", "it is Resolved (resolved)"),
        ("INC0010004", "it is P3 (3 - Moderate); the emergency path is for P1 and P2"),
        ("INC0010005", "it names 'billing', 'Billing', not 'hello'"),
        ("INC0010006", "it was opened 30.0 days ago"),
    ],
)
def test_ticket_refused_with_reason(
    servicenow: tuple[str, TableApi], ticket: str, reason: str
) -> None:
    url, _ = servicenow
    incident = client(url).get(ticket)
    with pytest.raises(PolicyRefusal) as refused:
        check_emergency_ticket(incident, "hello", NOW)
    assert f"ticket {ticket} cannot authorise an emergency deploy of hello" in str(refused.value)
    assert reason in str(refused.value)


def test_every_failed_condition_is_named(servicenow: tuple[str, TableApi]) -> None:
    url, _ = servicenow
    incident = client(url).get("INC0010008")
    with pytest.raises(PolicyRefusal) as refused:
        check_emergency_ticket(incident, "hello", NOW)
    message = str(refused.value)
    assert "it is Canceled (canceled)" in message
    assert "it is P4" in message
    assert "it names no service" in message


def test_state_the_emergency_path_does_not_know_is_refused(
    servicenow: tuple[str, TableApi],
) -> None:
    url, _ = servicenow
    with pytest.raises(PolicyRefusal, match=r"state 'Awaiting Vendor' \(code '5'\)"):
        client(url).get("INC0010007")


@pytest.mark.parametrize("no_rows_status", [200, 404])
def test_unknown_ticket_does_not_exist(
    servicenow: tuple[str, TableApi], no_rows_status: int
) -> None:
    url, api = servicenow
    api.no_rows_status = no_rows_status
    with pytest.raises(PolicyRefusal, match="ticket INC0099999 does not exist") as refused:
        client(url).get("INC0099999")
    assert not isinstance(refused.value, ConfigurationError)


def test_malformed_ticket_never_reaches_the_query(servicenow: tuple[str, TableApi]) -> None:
    url, api = servicenow
    with pytest.raises(PolicyRefusal, match="is not an incident ticket number"):
        client(url).get("INC0010002^ORnumber=INC0010001")
    assert api.requests == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"password": SecretStr("wrong")},
        {"username": "someone.else"},
        {"username": None, "password": None, "token": SecretStr("not-the-token")},
        {"username": "no.role"},
    ],
)
def test_credentials_refused_is_configuration_error(
    servicenow: tuple[str, TableApi], kwargs: dict[str, Any]
) -> None:
    url, _ = servicenow
    with pytest.raises(ConfigurationError, match=r"refused our credentials \(HTTP 40[13]"):
        client(url, **kwargs).get("INC0010001")


def test_unreachable_server_is_transient() -> None:
    with pytest.raises(TransientError, match="cannot be reached while reading INC0010001"):
        client(f"http://127.0.0.1:{free_port()}").get("INC0010001")


def test_server_that_never_answers_is_transient() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections into the backlog, never reads or answers
        port = listener.getsockname()[1]
        incidents = ServiceNowIncidents(
            f"http://127.0.0.1:{port}", username=USER, password=SecretStr(PASSWORD), timeout=0.3
        )
        with pytest.raises(TransientError, match="did not answer within 0.3s"):
            incidents.get("INC0010001")


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_server_is_transient(servicenow: tuple[str, TableApi], status: int) -> None:
    url, api = servicenow
    api.fail_with = status
    with pytest.raises(TransientError, match=f"HTTP {status}"):
        client(url).get("INC0010001")


def test_wrong_base_url_is_configuration_error(servicenow: tuple[str, TableApi]) -> None:
    url, _ = servicenow
    with pytest.raises(ConfigurationError, match="did not answer like a ServiceNow Table API"):
        client(url + "/not-the-instance").get("INC0010001")


def test_plain_http_to_a_remote_host_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="plain http to a remote host"):
        ServiceNowIncidents("http://incidents.example.com", token=SecretStr(TOKEN))
    with pytest.raises(ConfigurationError, match="both a user and a token"):
        ServiceNowIncidents(
            "https://x.example.com", username="u", password=SecretStr("p"), token=SecretStr(TOKEN)
        )


def test_block_from_env_builds_a_working_client(
    servicenow: tuple[str, TableApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = servicenow
    monkeypatch.setenv("PORTCULLIS_INCIDENTS_BASE_URL", url)
    monkeypatch.setenv("PORTCULLIS_INCIDENTS_USERNAME", USER)
    monkeypatch.setenv("PORTCULLIS_INCIDENTS_PASSWORD", PASSWORD)
    block = IncidentSystemBlock.resolve(None)
    assert PASSWORD not in repr(block)
    incident = block.get_client().get("INC0010001")
    check_emergency_ticket(incident, "hello", NOW)


def test_block_without_credentials_is_a_configuration_error(
    servicenow: tuple[str, TableApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = servicenow
    for name in ("USERNAME", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"PORTCULLIS_INCIDENTS_{name}", raising=False)
    monkeypatch.setenv("PORTCULLIS_INCIDENTS_BASE_URL", url)
    with pytest.raises(ConfigurationError, match="IncidentSystemBlock not configured"):
        IncidentSystemBlock.from_env()
    monkeypatch.delenv("PORTCULLIS_INCIDENTS_BASE_URL")
    with pytest.raises(ConfigurationError, match="PORTCULLIS_INCIDENTS_BASE_URL"):
        IncidentSystemBlock.from_env()


def _incident(**kw: Any) -> Incident:
    values: dict[str, Any] = {
        "number": "INC0000042",
        "state": IncidentState.NEW,
        "state_label": "New",
        "priority": 2,
        "priority_label": "2 - High",
        "services": ("hello",),
        "opened_at": NOW - timedelta(days=1),
    }
    values.update(kw)
    return Incident(**values)


def test_ticket_age_limit_is_inclusive_and_adjustable() -> None:
    check_emergency_ticket(_incident(opened_at=NOW - timedelta(days=7)), "hello", NOW)
    with pytest.raises(PolicyRefusal, match="younger than 7.0 days"):
        check_emergency_ticket(
            _incident(opened_at=NOW - timedelta(days=7, seconds=1)), "hello", NOW
        )
    check_emergency_ticket(
        _incident(opened_at=NOW - timedelta(days=20)), "hello", NOW, max_age=timedelta(days=21)
    )
    check_emergency_ticket(
        _incident(state=IncidentState.ON_HOLD, state_label="On Hold"), " HELLO ", NOW
    )
