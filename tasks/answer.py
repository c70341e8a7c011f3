"""Answering a waiting promotion from the terminal, exactly as the Prefect UI does.

The run paused (or suspended) with a form; the UI posts ``{"run_input": {...}}`` to
``/api/flow_runs/<id>/resume`` and the server validates it against the form's schema. This
does the same through Prefect's client and checks that the server answered ACCEPT. What the
answer *means* is decided by the run's approval ledger (identity code, eligibility, digest
confirmation), never here: a refused answer comes back on the form the run offers next.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType

from portcullis.errors import PolicyRefusal, TransientError
from portcullis.models import Frozen


class WaitingRun(Frozen):
    """A paused or suspended run of a promotion, and what its form asks."""

    id: UUID
    name: str
    flow: str
    state: str
    state_id: UUID
    description: str
    decisions: tuple[str, ...]


def _environment_of(run: FlowRun, flow: str) -> str | None:
    # The in-process flow takes the environment as a parameter; deployment flows fix it by name.
    if flow == "promote":
        value = run.parameters.get("environment")
        return value if isinstance(value, str) else None
    if flow == "emergency-promote":
        return "prod"
    return flow.removeprefix("promote-") if flow.startswith("promote-") else None


def _form(client: SyncPrefectClient, run: FlowRun, deadline: float) -> tuple[str, tuple[str, ...]] | None:
    """The form's description and allowed decisions, once the run has saved its schema (the
    schema is written after the state: answering earlier would skip the server's validation)."""
    while True:
        state = run.state
        keyset = state.state_details.run_input_keyset if state is not None else None
        if keyset:
            try:
                schema = json.loads(client.read_flow_run_input(run.id, keyset["schema"]))
                description = json.loads(client.read_flow_run_input(run.id, keyset["description"]))
                enum = schema.get("properties", {}).get("decision", {}).get("enum", [])
                return str(description), tuple(str(e) for e in enum)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
        run = client.read_flow_run(run.id)


def waiting_runs(app: str, environment: str, *, wait: float = 0.0, schema_wait: float = 15.0) -> list[WaitingRun]:
    """The runs promoting ``app`` to ``environment`` that wait for a person, newest first.

    Args:
        app: the app.
        environment: the environment.
        wait: seconds to keep looking while none waits yet (0: look once).
        schema_wait: seconds to wait for a paused run to save its form.
    """
    deadline = time.monotonic() + wait
    while True:
        found = _waiting_now(app, environment, schema_wait)
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


#: Runs asked for per request: the server's default (and largest) page.
PAGE = 200


def _paused_runs(client: SyncPrefectClient) -> list[FlowRun]:
    # The server answers at most one page per request: read every page, so a busy server
    # with many paused runs cannot hide the one the operator is looking for.
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    runs: list[FlowRun] = []
    while page := client.read_flow_runs(flow_run_filter=paused, offset=len(runs), limit=PAGE):
        runs.extend(page)
        if len(page) < PAGE:
            break
    return runs


def _waiting_now(app: str, environment: str, schema_wait: float) -> list[WaitingRun]:
    with get_client(sync_client=True) as client:
        runs = _paused_runs(client)
        flows: dict[UUID, str] = {}
        found = []
        for run in sorted(runs, key=lambda r: str(r.created or ""), reverse=True):
            if run.flow_id not in flows:
                flows[run.flow_id] = client.read_flow(run.flow_id).name
            flow = flows[run.flow_id]
            if run.parameters.get("app") != app or _environment_of(run, flow) != environment:
                continue
            form = _form(client, run, time.monotonic() + schema_wait)
            if form is None or run.state is None:
                continue  # paused without a form (e.g. a crashed pause): nothing to answer
            fresh = client.read_flow_run(run.id)
            state = fresh.state or run.state
            found.append(WaitingRun(id=run.id, name=run.name, flow=flow, state=state.name,
                                    state_id=state.id, description=form[0], decisions=form[1]))
        return found


def submit_answer(run: WaitingRun, answer: dict[str, Any], *, outcome_wait: float = 120.0,
                  settle: float = 15.0) -> str:
    """Resume ``run`` with ``answer`` as the UI does; return what the run said next.

    A run that needs more answers offers its form again (with the last answer's outcome); one
    still running ``settle`` seconds later had what it needed.

    Raises:
        PolicyRefusal: the server rejected the input (it did not match the form).
        TransientError: the run did not move on within ``outcome_wait`` seconds.
    """
    if run.decisions and answer.get("decision") not in run.decisions:
        raise PolicyRefusal(f"this form takes decision {' or '.join(run.decisions)}, not {answer.get('decision')!r}")
    with get_client(sync_client=True) as client:
        result = client.resume_flow_run(run.id, run_input=answer)
        if result.status.value != "ACCEPT":
            reason = getattr(result.details, "reason", None) or result.details
            raise PolicyRefusal(f"the server did not take the answer for {run.name}: {result.status.value}: {reason}")
        deadline = time.monotonic() + outcome_wait
        running_since: float | None = None
        while time.monotonic() < deadline:
            fresh = client.read_flow_run(run.id)
            state = fresh.state
            moved = state is not None and state.id != run.state_id
            if moved and state is not None and state.is_paused():
                form = _form(client, fresh, time.monotonic() + 15)
                return f"{fresh.name} waits again: {_notice(form[0]) if form else '(no form yet)'}"
            if moved and state is not None and state.is_final():
                return f"{fresh.name} is {state.name}" + (f": {state.message}" if state.message else "")
            if moved and state is not None and state.type is StateType.RUNNING:
                # A run that needs more answers pauses again within moments; one that stays
                # running has what it needed and goes on to the next gate.
                running_since = running_since or time.monotonic()
                if time.monotonic() - running_since > settle:
                    return f"{fresh.name} runs on: the answer was accepted and the approval rules are met"
            time.sleep(0.3)
    raise TransientError(f"{run.name} did not move on within {outcome_wait:.0f}s after the answer",
                         hint="check the run in the Prefect UI; its worker may be busy or down")


def _notice(description: str) -> str:
    """The line of the form that reports the last answer (accepted, or why it was refused)."""
    for line in description.splitlines():
        if line.startswith("> "):
            return line.strip("*> ")
    return "(no notice on the form)"
