"""The Portcullis worker refuses what its host did not configure (issue 16).

Unit part (no server): the worker configuration file is refused when others could have changed
it; :func:`refusal_reason` decides; :func:`require_worker_run` checks a flow process against
its worker's file.

Given the production-like setup (PostgreSQL, a Prefect server, one Portcullis worker per pool)
and the shipped deployments, when someone holding the API auth string overrides a run's
``env`` or ``command``, opens the pool's base job template, or changes a deployment's job
variables or entrypoint, then the worker starts nothing: the run ends Failed with the reason,
and ``worker.refused`` is in the state store the deploy side's flows append to (PostgreSQL),
where ``python -m portcullis.audit verify`` checks it. A changed pull step is never run.
Normal and scheduled runs still complete, and no log carries a secret of the setup.

The setup is the session's (``production_stack``, tests/support/shared_production.py), shared
with other modules: each attack puts back what it changed, and this module reads only the
records made since it began.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, State, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import SCHEDULE_TYPES, IntervalSchedule
from prefect.exceptions import Pause
from prefect.states import Paused, Running, Suspended
from prefect.workers.process import ProcessWorker

from infra.production import (
    ENTRYPOINTS,
    POOLS,
    ProductionConfig,
    state_urls,
    worker_config_path,
)
from portcullis.audit import AuditRecord
from portcullis.errors import ConfigurationError
from portcullis.sides import (
    WORKER_CONFIG_VAR,
    WorkerConfig,
    load_worker_config,
    require_worker_run,
    worker_settings,
)
from portcullis.state import StoreAuditLog, open_state, open_state_url
from portcullis.worker import (
    PortcullisWorker,
    locked_base_job_template,
    refusal_reason,
    run_environment,
    waits_without_process,
)
from tasks.approval import termination_deferred
from tests.support.production import REPO_ROOT, secrets_found, wait_final
from tests.support.shared_production import SharedProduction

IMAGE = "127.0.0.1:1/portcullis/hello@sha256:" + "ab" * 32
pytestmark = [pytest.mark.timeout(600)]
F = TypeVar("F", bound=Callable[..., None])


def on_setup(test: F) -> F:
    """Mark a test that needs the production-like setup (PostgreSQL, a Prefect server, workers)."""
    marked: F = pytest.mark.slow(pytest.mark.prefect_server(test))
    return marked


# ---------------------------------------------------------- a waiting run outlives its process

def test_a_suspended_runs_process_exit_does_not_end_its_wait(
    prefect_harness: None, tmp_path: Path,
) -> None:
    """A durable wait holds no process: the exit of the one that suspended (e.g. killed while it
    tore down because its worker was stopped) leaves the run Suspended; a run that still needed
    its process (running, or paused with a polling process) is reported Crashed."""

    @flow
    def waiting() -> None:
        """Never run: only its runs' states matter here."""

    states: dict[str, State] = {"suspended": Suspended(timeout_seconds=600),
                                "paused": Paused(timeout_seconds=600), "running": Running()}
    with get_client(sync_client=True) as client:
        # From a deployment, as every worker run is: the server then accepts Crashed over a
        # suspension (it refuses to reschedule a run without one).
        deployment = client.create_deployment(flow_id=client.create_flow(waiting),
                                              name=f"exits-{uuid4().hex[:6]}")
        runs = {}
        for name, state in states.items():
            run = client.create_flow_run_from_deployment(
                deployment, name=f"exit-{name}-{uuid4().hex[:6]}")
            client.set_flow_run_state(run.id, Running(), force=True)
            if name != "running":
                client.set_flow_run_state(run.id, state, force=True)
            runs[name] = client.read_flow_run(run.id)
    assert [waits_without_process(r.state) for r in runs.values()] == [True, False, False]
    worker = PortcullisWorker(_config(tmp_path), tmp_path / "worker.toml")

    async def processes_exited() -> None:
        async with get_client() as client:
            for run in runs.values():
                await worker._propose_crashed_state(
                    run, "Flow run infrastructure exited with non-zero status code -15.",
                    client=client)

    asyncio.run(processes_exited())
    with get_client(sync_client=True) as client:
        after = {name: client.read_flow_run(run.id).state_name for name, run in runs.items()}
    assert after == {"suspended": "Suspended", "paused": "Crashed", "running": "Crashed"}


def test_a_stop_while_suspending_is_held_until_the_run_has_suspended() -> None:
    """SIGTERM inside ``termination_deferred``: dropped when the run suspended (``Pause``: the
    process exits next), delivered on leaving the block otherwise."""
    seen: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        seen.append("SIGTERM")

    shipped = signal.signal(signal.SIGTERM, handler)
    try:
        with termination_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("inside")
        assert seen == ["inside", "SIGTERM"]
        seen.clear()
        with pytest.raises(Pause), termination_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise Pause("suspended")
        assert seen == []
        # Still deferring: the engine's own signal scope restores its handler as it unwinds.
        assert signal.getsignal(signal.SIGTERM) is not handler
        signal.signal(signal.SIGTERM, handler)
        with pytest.raises(RuntimeError), termination_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("Flow run cannot be suspended")
        assert seen == ["SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, shipped)


# ---------------------------------------------------------------------------- unit: the file

def _config(tmp: Path, **changes: Any) -> WorkerConfig:
    fields: dict[str, Any] = {
        "side": "deploy", "pool": POOLS["deploy"], "name": "deploy-test", "checkout": REPO_ROOT,
        "deployments": ENTRYPOINTS["deploy"],
        "environment": {"PORTCULLIS_HOME": str(tmp), "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": "pw"},
    }
    fields.update(changes)
    return WorkerConfig.model_validate(fields)


def _written(tmp: Path, config: WorkerConfig, mode: int = 0o600) -> Path:
    path = tmp / "worker.toml"
    path.write_text(config.to_toml())
    path.chmod(mode)
    return path


def test_a_worker_file_reads_back_as_written(tmp_path: Path) -> None:
    config = _config(tmp_path, environment={"PORTCULLIS_HOME": 'quote " and \\ and ü'})
    assert load_worker_config(_written(tmp_path, config)) == config


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_worker_file_others_could_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = _written(tmp_path, _config(tmp_path), mode)
    with pytest.raises(ConfigurationError, match=f"mode {mode:o} lets group or others change it"):
        load_worker_config(path)


def test_a_worker_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = _written(tmp_path, _config(tmp_path))
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)
        uid = 0
    else:
        uid = os.getuid() + 1  # seen from a worker running under another account
    with pytest.raises(ConfigurationError, match=r"owned by uid \d+, not by root or the worker"):
        load_worker_config(path, uid=uid)


def test_a_symlinked_worker_file_is_refused(tmp_path: Path) -> None:
    real = _written(tmp_path, _config(tmp_path))
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    with pytest.raises(ConfigurationError, match="it is a symlink"):
        load_worker_config(link)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"side": "build"}, "the build side may not run"),
    ({"deployments": {"build-release/build": "flows/deployed.py:build_release"}},
     "the deploy side may not run build-release/build"),
    ({"deployments": {"promote-dev": "flows/deployed.py:promote_dev"}}, "may not run promote-dev"),
    ({"environment": {"PORTCULLIS_BUILD_COSIGN_PASSWORD": "x"}}, "belongs to the other side"),
    ({"environment": {"PATH": "/tmp"}}, "is not a PORTCULLIS_\\* setting"),
    ({"environment": {WORKER_CONFIG_VAR: "/tmp/x"}}, "is set by the worker"),
    ({"deployments": {"promote-dev/dev": "/abs/flows.py:promote_dev"}}, "is not 'relative"),
    ({"checkout": Path("relative")}, "must be an absolute path"),
])
def test_an_invalid_worker_file_is_refused(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(_config(tmp_path).model_copy(update=changes).to_toml())
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=reason):
        load_worker_config(path)


def test_the_worker_does_not_start_with_a_file_others_could_change(tmp_path: Path) -> None:
    path = _written(tmp_path, _config(tmp_path), 0o664)
    started = subprocess.run([sys.executable, "-m", "portcullis.worker", "--side", "deploy",
                              "--config", str(path)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert started.returncode == 2
    assert "portcullis worker not started" in started.stderr
    assert "mode 664 lets group or others change it" in started.stderr
    path.chmod(0o600)
    other = subprocess.run([sys.executable, "-m", "portcullis.worker", "--side", "build",
                            "--config", str(path)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert other.returncode == 2 and "configures the deploy side, not build" in other.stderr


# ------------------------------------------------------------------- unit: the decision

def _decide(tmp: Path, run_vars: dict[str, Any] | None = None, with_deployment: bool = True,
            deployment_vars: dict[str, Any] | None = None,
            entrypoint: str = "flows/deployed.py:promote_staging", flow_name: str = "promote-staging",
            template: dict[str, Any] | None = None) -> str | None:
    deployment = DeploymentResponse(id=uuid4(), name="staging", flow_id=uuid4(), entrypoint=entrypoint,
                                    job_variables=deployment_vars or {}, labels={})
    run = FlowRun(flow_id=deployment.flow_id, name="r",
                  deployment_id=deployment.id if with_deployment else None, job_variables=run_vars)
    pool = WorkPool(name=POOLS["deploy"], type="process", default_queue_id=uuid4(),
                    base_job_template=locked_base_job_template() if template is None else template)
    return refusal_reason(run, deployment if with_deployment else None,
                          flow_name if with_deployment else None, pool, _config(tmp))


def test_the_decision_lets_a_configured_run_through(tmp_path: Path) -> None:
    assert _decide(tmp_path) is None
    assert _decide(tmp_path, run_vars={}, deployment_vars={}) is None


def test_the_decision_refuses_what_the_host_did_not_configure(tmp_path: Path) -> None:
    assert "the flow run sets job variables (command, env)" in str(
        _decide(tmp_path, run_vars={"env": {"A": "1"}, "command": "sh"}))
    assert "has no deployment" in str(_decide(tmp_path, with_deployment=False))
    assert "deployment promote-staging/staging sets job variables (working_dir)" in str(
        _decide(tmp_path, deployment_vars={"working_dir": "/tmp"}))
    assert "has entrypoint 'flows/promote.py:promote', but this worker runs it only from " \
        "'flows/deployed.py:promote_staging'" in str(_decide(tmp_path, entrypoint="flows/promote.py:promote"))
    assert "deployment build-release/staging is not configured on the deploy worker" in str(
        _decide(tmp_path, flow_name="build-release"))
    stock = ProcessWorker.get_default_base_job_template()
    assert "base job template of work pool portcullis-deploy was changed" in str(
        _decide(tmp_path, template=stock))
    assert "was changed" in str(_decide(tmp_path, template={}))


# ------------------------------------------------------- unit: the flow process's own check

def _records(config: WorkerConfig) -> list[AuditRecord]:
    """What the store the worker file names (here SQLite under its PORTCULLIS_HOME) holds."""
    return open_state(worker_settings(config)).audit_log().records()


def test_a_flow_process_under_its_workers_file_passes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = _written(tmp_path, config)
    env = run_environment(config, path, {"PATH": "/usr/bin", "PORTCULLIS_LEAK": "x", "SECRET": "y"},
                          {"PREFECT_API_URL": "http://127.0.0.1:1/api"})
    # Exactly the file's variables, the worker's Prefect connection and where the tools are.
    assert env == {**config.environment, WORKER_CONFIG_VAR: str(path), "PATH": "/usr/bin",
                   "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    assert require_worker_run("deploy", environ=env) == config
    assert _records(config) == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"PORTCULLIS_POLICY_DIR": "/tmp/mine"}, "not configured: PORTCULLIS_POLICY_DIR"),
    ({"PORTCULLIS_HOME": "/tmp/mine"}, "changed: PORTCULLIS_HOME"),
    ({"PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": None}, "missing: PORTCULLIS_DEPLOY_REGISTRY_PASSWORD"),
])
def test_a_flow_process_with_other_variables_is_refused_and_recorded(
    tmp_path: Path, change: dict[str, str | None], reason: str,
) -> None:
    config = _config(tmp_path)
    env = run_environment(config, _written(tmp_path, config), {}, {})
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(ConfigurationError, match=reason):
        require_worker_run("deploy", run_id="r1", app="hello", environment="staging", environ=env)
    (refused,) = _records(config)
    assert (refused.event, refused.run_id, refused.app, refused.environment) == (
        "promotion.refused", "r1", "hello", "staging")
    assert reason in str(refused.details["reason"])


def test_a_flow_process_on_the_other_side_or_without_a_worker_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(tmp_path)
    env = run_environment(config, _written(tmp_path, config), {}, {})
    with pytest.raises(ConfigurationError, match="build side's Portcullis worker, but its worker is on the deploy side"):
        require_worker_run("build", environ=env)
    # Without a usable worker file, the process's own settings name the store.
    local = f"sqlite:///{tmp_path / 'local.db'}"
    monkeypatch.setenv("PORTCULLIS_STATE_URL", local)
    with pytest.raises(ConfigurationError, match=f"{WORKER_CONFIG_VAR} is not set"):
        require_worker_run("deploy", environ={"PORTCULLIS_HOME": "/tmp"})
    env[WORKER_CONFIG_VAR] = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigurationError, match="missing.toml refused"):
        require_worker_run("deploy", environ=env)
    assert [r.event for r in open_state_url(local).audit_log().records()] == ["promotion.refused"] * 2
    assert [r.event for r in _records(config)] == ["promotion.refused"]


# --------------------------------------------------------------- on the production-like setup

@dataclass
class Setup:
    """The running setup and what the tests share."""

    config: ProductionConfig
    auth: str
    home: Path
    approvers: Path
    secrets: dict[str, str]
    #: The last record of the shared store before this module began (-1: none).
    since: int = -1

    @property
    def audit(self) -> StoreAuditLog:
        """The state store's trail, where the workers' refusals and the flows' records go."""
        return open_state_url(state_urls(self.config)[0]).audit_log()

    def recorded(self) -> list[AuditRecord]:
        """Everything recorded since this module began, in order (the store is the session's)."""
        return [r for r in self.audit.records() if r.seq > self.since]

    def events_of(self, run: FlowRun) -> list[str]:
        """Audit events recorded for one run."""
        return [r.event for r in self.recorded() if r.run_id == str(run.id)]

    def api(self) -> httpx.Client:
        """A raw REST client holding the auth string, as the attacker has it."""
        token = base64.b64encode(self.auth.encode()).decode()
        return httpx.Client(base_url=self.config.api_url, timeout=10,
                            headers={"Authorization": f"Basic {token}"})


@pytest.fixture(scope="module")
def setup(production_stack: SharedProduction) -> Iterator[Setup]:
    """The session's production-like setup (tests/support/shared_production.py): policies,
    approvers, credentials and the shipped deployments."""
    shared = production_stack
    # relatime: a read moves atime only while it is older than mtime; make it so.
    st = shared.approvers.stat()
    os.utime(shared.approvers, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
    try:
        with shared.client_settings():
            yield Setup(shared.config, shared.auth, shared.home, shared.approvers, shared.secrets,
                        since=shared.audit_mark())
    finally:
        shared.restore()  # the attacks above put pools and deployments back; checked here


def _run(client: SyncPrefectClient, deployment: str, name: str, **kwargs: Any) -> FlowRun:
    found = client.read_deployment_by_name(deployment)
    created = client.create_flow_run_from_deployment(found.id, name=name, **kwargs)
    return wait_final(client, created.id, timeout=120)


def _refused(setup: Setup, run: FlowRun, reason: str) -> None:
    message = str(run.state.message if run.state else "")
    assert run.state_name == "Failed", (run.state_name, message)
    assert message.startswith("refused by the Portcullis worker deploy-"), message
    assert reason in message, message
    # Nothing of the flow ran: the worker's refusal is the run's only audit record.
    assert setup.events_of(run) == ["worker.refused"]
    (record,) = [r for r in setup.recorded() if r.run_id == str(run.id)]
    assert record.details["side"] == "deploy" and reason in str(record.details["reason"])


def _reviews(client: SyncPrefectClient, name: str, **kwargs: Any) -> FlowRun:
    return _run(client, "post-incident-reviews/reviews", name, **kwargs)


@on_setup
def test_a_run_overriding_the_policy_directory_is_refused(setup: Setup) -> None:
    mine = setup.config.state_dir / "attacker-policies"
    mine.mkdir()
    (mine / "staging.toml").write_text('environment = "staging"\nallowed_branches = ["main"]\n'
                                       'allowed_repositories = ["file://*"]\n')
    with get_client(sync_client=True) as client:
        run = _run(client, "promote-staging/staging", "env-override",
                   parameters={"app": "hello", "image": IMAGE, "requested_by": "mallory"},
                   job_variables={"env": {"PORTCULLIS_POLICY_DIR": str(mine)}})
    _refused(setup, run, "the flow run sets job variables (env)")
    assert not [r for r in setup.recorded() if r.environment == "staging"
                and r.event.startswith("promotion.")]


@on_setup
def test_a_run_overriding_the_command_is_refused_and_never_runs(setup: Setup) -> None:
    marker, leak = setup.config.state_dir / "MARKER", setup.config.state_dir / "LEAK"
    with get_client(sync_client=True) as client:
        run = _reviews(client, "command-override", job_variables={
            "command": f"sh -c 'touch {marker}; cat {setup.approvers} > {leak}'"})
    _refused(setup, run, "the flow run sets job variables (command)")
    assert not marker.exists() and not leak.exists()


@on_setup
def test_a_reopened_pool_template_is_refused(setup: Setup) -> None:
    marker = setup.config.state_dir / "MARKER-POOL"
    opened = ProcessWorker.get_default_base_job_template()
    opened["variables"]["properties"]["command"]["default"] = f"sh -c 'touch {marker}'"
    opened["variables"]["properties"]["env"]["default"] = {"PORTCULLIS_POLICY_DIR": "/tmp"}
    with setup.api() as api:
        assert api.patch(f"/work_pools/{POOLS['deploy']}",
                         json={"base_job_template": opened}).status_code == 204
        try:
            with get_client(sync_client=True) as client:
                run = _reviews(client, "pool-reopened")
        finally:
            assert api.patch(f"/work_pools/{POOLS['deploy']}",
                             json={"base_job_template": locked_base_job_template()}).status_code == 204
    _refused(setup, run, "the base job template of work pool portcullis-deploy was changed")
    assert not marker.exists()


@pytest.mark.parametrize(("patch", "reason"), [
    ({"job_variables": {"env": {"PORTCULLIS_POLICY_DIR": "/tmp"}}},
     "deployment post-incident-reviews/reviews sets job variables (env)"),
    ({"entrypoint": "flows/promote.py:promote"},
     ("has entrypoint 'flows/promote.py:promote', but this worker runs it only from "
     "'flows/deployed.py:post_incident_reviews'")),
])
@on_setup
def test_a_changed_deployment_is_refused(setup: Setup, patch: dict[str, Any], reason: str) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("post-incident-reviews/reviews")
        shipped = {"job_variables": deployment.job_variables, "entrypoint": deployment.entrypoint}
        with setup.api() as api:
            assert api.patch(f"/deployments/{deployment.id}", json=patch).status_code == 204
            try:
                run = _reviews(client, f"deployment-{next(iter(patch))}")
            finally:
                assert api.patch(f"/deployments/{deployment.id}", json=shipped).status_code == 204
    _refused(setup, run, reason)


@on_setup
def test_a_changed_pull_step_is_never_run(setup: Setup) -> None:
    marker = setup.config.state_dir / "MARKER-PULL"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("post-incident-reviews/reviews")
        step = {"prefect.deployments.steps.run_shell_script": {"script": f"touch {marker}"}}
        with setup.api() as api:
            assert api.patch(f"/deployments/{deployment.id}",
                             json={"pull_steps": [step]}).status_code == 204
            try:
                run = _reviews(client, "pull-step")
            finally:
                api.patch(f"/deployments/{deployment.id}", json={"pull_steps": deployment.pull_steps})
    assert run.state_name == "Completed", run.state
    assert not marker.exists()


@on_setup
def test_refusals_are_in_the_chain_the_verify_command_checks(setup: Setup) -> None:
    # After the refusals above: the operator's command, with the deploy host's store settings.
    store = load_worker_config(worker_config_path(setup.config, "deploy")).environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTCULLIS_")}
    env.update({k: store[k] for k in ("PORTCULLIS_STATE_URL", "PORTCULLIS_STATE_PASSWORD")})
    done = subprocess.run([sys.executable, "-m", "portcullis.audit", "verify"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "chain intact" in done.stdout
    refused = [r for r in setup.recorded() if r.event == "worker.refused"]
    assert len(refused) >= 5 and {r.details["side"] for r in refused} == {"deploy"}


@on_setup
def test_refused_runs_never_read_the_approvers_file(setup: Setup) -> None:
    # After the refused runs above (one of them tried to copy the file): not read since setup.
    st = setup.approvers.stat()
    assert st.st_atime_ns < st.st_mtime_ns
    setup.approvers.read_bytes()  # control: on this filesystem a read does move atime
    assert setup.approvers.stat().st_atime_ns >= st.st_mtime_ns


def _scheduled_run(client: SyncPrefectClient, name: str, parameters: dict[str, Any]) -> FlowRun:
    """Add an hourly schedule to deployment ``name`` firing in 4 s, as anyone with the API can;
    return the run the server's scheduler created, once final (the schedule is removed)."""
    deployment = client.read_deployment_by_name(name)
    fire_at = datetime.now(UTC) + timedelta(seconds=4)
    hourly: list[tuple[SCHEDULE_TYPES, bool]] = [
        (IntervalSchedule(interval=timedelta(hours=1), anchor_date=fire_at), True)]
    (schedule,) = client.create_deployment_schedules(deployment.id, hourly, parameters=parameters)
    try:
        deadline = time.monotonic() + 60
        # Asked by deployment: an unfiltered read returns only one page of the server's runs.
        of_it = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        while not (fired := [r for r in client.read_flow_runs(deployment_filter=of_it)
                             if r.auto_scheduled and r.state_name != "Scheduled"]):
            assert time.monotonic() < deadline, f"the schedule of {name} did not start a run"
            time.sleep(0.5)
    finally:
        client.delete_deployment_schedule(deployment.id, schedule.id)
    return wait_final(client, fired[0].id, timeout=120)


@on_setup
def test_normal_and_scheduled_runs_still_complete(setup: Setup) -> None:
    with get_client(sync_client=True) as client:
        run = _reviews(client, "normal")
        assert run.state_name == "Completed", run.state
        assert setup.events_of(run) == []  # the reviews report records nothing
        started = (run.start_time - run.created).total_seconds()  # type: ignore[operator]
        print(f"\nPortcullis worker: trigger -> post-incident-reviews running {started:.1f}s "
              f"(worker poll {setup.config.worker_query_seconds:g} s)")
        scheduled = _scheduled_run(client, "post-incident-reviews/reviews", {})
    assert scheduled.state_name == "Completed", scheduled.state


@on_setup
def test_a_schedule_added_to_rollback_rolls_nothing_back(setup: Setup) -> None:
    # An insider adds a schedule to the rollback deployment, so that prod is rolled back and
    # pinned "by the scheduler", on nobody's word. The run the server's scheduler creates is
    # refused before it looks at any environment: only a person rolls back.
    with get_client(sync_client=True) as client:
        run = _scheduled_run(client, "rollback/rollback", {
            "app": "hello", "environment": "prod", "reason": "nightly", "requested_by": "alice"})
    assert run.state_name == "Failed", run.state
    assert "a rollback is a person's decision" in str(run.state.message if run.state else "")
    events = setup.events_of(run)
    assert "promotion.refused" in events
    assert not {"lock.acquired", "rollback.completed", "environment.pinned"} & set(events)


@on_setup
def test_no_log_carries_a_secret(setup: Setup) -> None:
    configured = (worker_config_path(setup.config, "build").read_text()
                  + worker_config_path(setup.config, "deploy").read_text())
    for name in ("build registry password", "cosign key password", "deploy registry password",
                 "incidents password"):
        assert setup.secrets[name] in configured, name  # the scan looks for values really used
    assert load_worker_config(worker_config_path(setup.config, "deploy")).environment[
        "PORTCULLIS_APPROVERS_FILE"] == str(setup.approvers)
    assert secrets_found(setup.secrets, setup.config, setup.auth) == {}
