"""Warm starts (issue 12): the Portcullis worker forks runs from a pre-imported parent.

Given the production-like setup (PostgreSQL, a Prefect server: the session's, see
tests/support/shared_production.py) and a Portcullis worker of the test's own (its own pool, a
worker file mapping ``rollback/rollback`` to tests/support/warm_flows.py:hold, the shipped
deployment moved to that pool and entrypoint while the module runs), a deployment run is forked from the worker's warm parent
(its process's parent is the zygote, its pid is the run's ``infrastructure_pid``) and
completes; an API cancel ends it Cancelled; a SIGKILL of the flow process ends it Crashed;
killing the warm parent mid-run ends the run Crashed and the next run starts from a new
parent; a run with job variables is still refused before anything starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling

from infra.daemon import running_pid, start_daemon, stop_daemon
from infra.prefect_server import prefect_env
from infra.production import ProductionConfig
from portcullis.sides import WorkerConfig
from portcullis.worker import locked_base_job_template
from portcullis.zygote import process_ended
from tests.support.production import REPO_ROOT, wait_final
from tests.support.shared_production import SharedProduction

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow, pytest.mark.prefect_server]
POOL = "portcullis-warm-test"
ENTRY = "tests/support/warm_flows.py:hold"


@dataclass
class Setup:
    """The server, the test's warm worker and where its flows leave their markers."""

    config: ProductionConfig
    markers: Path
    #: The warm worker's folder: its file, pid and log.
    worker_dir: Path

    @property
    def worker_pid(self) -> int:
        pid = running_pid(self.worker_dir / "worker-warm.pid")
        assert pid is not None, "the warm worker is not running"
        return pid


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def zygote_pid(setup: Setup) -> int:
    """The warm parent: the worker's child running ``portcullis.zygote``."""
    for child in _children(setup.worker_pid):
        try:
            if b"portcullis.zygote" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    raise AssertionError("the worker runs no warm parent")


#: What the module changes on the shipped ``rollback/rollback`` deployment while it runs.
MOVED = ("work_pool_name", "work_queue_name", "entrypoint", "enforce_parameter_schema")


@pytest.fixture(scope="module")
def setup(production_stack: SharedProduction) -> Iterator[Setup]:
    """The session's PostgreSQL and Prefect server, and a Portcullis worker with the test flows.

    The worker may run only deployments the deploy side knows, so it runs ``rollback/rollback``:
    the shipped one, moved to the test's pool and entrypoint while the module runs, then put
    back as it was.
    """
    shared = production_stack
    state = Path(tempfile.mkdtemp(prefix="portcullis-warm-"))
    markers = state / "markers"
    markers.mkdir()
    api = httpx.Client(base_url=shared.config.api_url,
                       auth=tuple(shared.auth.split(":", 1)), timeout=10)  # type: ignore[arg-type]
    shipped: dict[str, Any] | None = None
    try:
        api.post("/work_pools/", json={"name": POOL, "type": "process",
                                       "base_job_template": locked_base_job_template()}
                 ).raise_for_status()

        def online() -> bool:
            found = api.post(f"/work_pools/{POOL}/workers/filter", json={})
            return any(w["status"] == "ONLINE" for w in found.json())

        path = state / "worker-warm.toml"
        path.write_text(WorkerConfig(
            side="deploy", pool=POOL, name="warm-test", checkout=REPO_ROOT,
            deployments={"rollback/rollback": ENTRY,
                         "clear-pin/clear-pin": "tests/support/warm_flows.py:second"},
            environment={"PORTCULLIS_HOME": str(state / "home")}, start="warm").to_toml())
        path.chmod(0o600)
        env = prefect_env(state / "worker-warm", shared.config.prefect_port)
        env.update(PREFECT_API_AUTH_STRING=shared.auth, PREFECT_WORKER_QUERY_SECONDS="1")
        start_daemon("worker-warm", [sys.executable, "-m", "portcullis.worker", "--side",
                                     "deploy", "--config", str(path)],
                     state_dir=state, env=env, ready=online, timeout=180)
        with shared.client_settings():
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("rollback/rollback")
                shipped = {name: getattr(deployment, name) for name in MOVED}
                moved = api.patch(f"/deployments/{deployment.id}", json={
                    "work_pool_name": POOL, "work_queue_name": "default", "entrypoint": ENTRY,
                    "enforce_parameter_schema": False})
                assert moved.status_code == 204, moved.text
            yield Setup(shared.config, markers, state)
    finally:
        try:
            if shipped is not None:
                with shared.client_settings(), get_client(sync_client=True) as client:
                    deployment = client.read_deployment_by_name("rollback/rollback")
                    back = api.patch(f"/deployments/{deployment.id}", json=shipped)
                    assert back.status_code == 204, back.text
                    again = client.read_deployment_by_name("rollback/rollback")
                    assert {name: getattr(again, name) for name in MOVED} == shipped
        finally:
            stop_daemon("worker-warm", state_dir=state)
            api.delete(f"/work_pools/{POOL}")
            api.close()
            shutil.rmtree(state, ignore_errors=True)
            shared.restore()


def _start(setup: Setup, client: SyncPrefectClient, name: str, **kwargs: Any) -> UUID:
    deployment = client.read_deployment_by_name("rollback/rollback")
    parameters = {"marker_dir": str(setup.markers), **kwargs.pop("parameters", {})}
    return client.create_flow_run_from_deployment(deployment.id, name=name,
                                                  parameters=parameters, **kwargs).id


def _running(setup: Setup, client: SyncPrefectClient, run_id: UUID,
             timeout: float = 120) -> tuple[int, int]:
    """(pid, parent pid) of the run's flow process, once it runs the flow body."""
    marker = setup.markers / f"{run_id}.pid"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        run = client.read_flow_run(run_id)
        assert run.state_type is None or run.state_type.value not in {
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, run.state
        assert time.monotonic() < deadline, f"run {run_id} never reached its flow body"
        time.sleep(0.1)
    pid, parent = marker.read_text().split()
    return int(pid), int(parent)


def _pid_of(run: FlowRun) -> int:
    assert run.infrastructure_pid, run
    return int(str(run.infrastructure_pid).rsplit(":", 1)[-1])


def test_a_run_is_forked_from_the_warm_parent_and_completes(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run_id = _start(setup, client, "completes", parameters={"release": True})
        run = wait_final(client, run_id, timeout=120)
    assert run.state_name == "Completed", run.state
    pid, parent = (int(x) for x in (setup.markers / f"{run_id}.pid").read_text().split())
    assert parent == zygote_pid(setup)
    assert _pid_of(run) == pid


def test_an_api_cancel_of_a_warm_run_reaches_cancelled(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run_id = _start(setup, client, "cancelled")
        pid, parent = _running(setup, client, run_id)
        assert parent == zygote_pid(setup)
        client.set_flow_run_state(run_id, Cancelling(), force=True)
        run = wait_final(client, run_id, timeout=120)
    assert run.state_name == "Cancelled", run.state
    assert process_ended(pid)


def test_a_killed_flow_process_ends_crashed(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run_id = _start(setup, client, "killed")
        pid, _ = _running(setup, client, run_id)
        os.kill(pid, signal.SIGKILL)
        run = wait_final(client, run_id, timeout=120)
    assert run.state_name == "Crashed", run.state
    assert "-9" in str(run.state.message if run.state else ""), run.state


def test_a_killed_warm_parent_crashes_its_run_and_the_next_run_still_starts(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run_id = _start(setup, client, "orphaned")
        pid, parent = _running(setup, client, run_id)
        assert parent == zygote_pid(setup)
        os.kill(parent, signal.SIGKILL)
        run = wait_final(client, run_id, timeout=120)
        assert run.state_name == "Crashed", run.state
        assert process_ended(pid)
        after = _start(setup, client, "after", parameters={"release": True})
        following = wait_final(client, after, timeout=180)
    assert following.state_name == "Completed", following.state
    _, new_parent = (int(x) for x in (setup.markers / f"{after}.pid").read_text().split())
    assert new_parent != parent and new_parent == zygote_pid(setup)


def test_a_run_with_job_variables_is_refused_before_anything_starts(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run_id = _start(setup, client, "refused", parameters={"release": True},
                        job_variables={"env": {"PORTCULLIS_HOME": "/tmp/elsewhere"}})
        run = wait_final(client, run_id, timeout=120)
    message = str(run.state.message if run.state else "")
    assert run.state_name == "Failed", run.state
    assert message.startswith("refused by the Portcullis worker warm-test"), message
    assert "sets job variables (env)" in message
    assert not (setup.markers / f"{run_id}.pid").exists()
