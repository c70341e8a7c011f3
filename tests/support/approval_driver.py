"""Plays approvers against a paused flow run through the Prefect API only (no UI)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName


class Resumer:
    """Plays the approvers from another thread, through the Prefect API only."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name
        self.descriptions: list[str] = []
        self.error: BaseException | None = None

    def _paused(self, client: SyncPrefectClient, seen: set[UUID]) -> tuple[UUID, dict[str, str]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.run_name]))
            )
            for run in runs:
                state = run.state
                if (
                    state is not None
                    and state.is_paused()
                    and state.id not in seen
                    and state.state_details.run_input_keyset
                ):
                    keyset = state.state_details.run_input_keyset
                    # The schema is saved after the state is set: resuming earlier would
                    # skip the server's validation (see docs/platform.md).
                    try:
                        client.read_flow_run_input(run.id, keyset["schema"])
                        description = client.read_flow_run_input(run.id, keyset["description"])
                    except httpx.HTTPStatusError as exc:
                        if exc.response.status_code != 404:
                            raise
                        break  # not saved yet: look again
                    seen.add(state.id)
                    self.descriptions.append(json.loads(description))
                    return run.id, keyset
            time.sleep(0.1)
        raise TimeoutError(f"flow run {self.run_name} did not pause with a form")

    def play(self, answers: list[Callable[[], dict[str, Any]]]) -> threading.Thread:
        def run() -> None:
            try:
                seen: set[UUID] = set()
                with get_client(sync_client=True) as client:
                    for answer in answers:
                        run_id, _ = self._paused(client, seen)
                        result = client.resume_flow_run(run_id, run_input=answer())
                        assert result.status.value == "ACCEPT", result.details
            except Exception as exc:  # noqa: BLE001 - surfaced by the test thread
                self.error = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread
