"""The Portcullis worker: a Prefect process worker that runs only what its host configured.

Prefect OSS lets anyone holding the API auth string set a flow run's job variables (``env``,
``command``, ``working_dir``), rewrite a pool's base job template and change a deployment's
job variables, entrypoint and pull steps. A stock process worker obeys all of them. This
worker obeys none:

* before starting a run it calls :func:`refusal_reason`; a run whose flow run or deployment
  carries job variables, whose deployment is not configured for this worker or points at
  another entrypoint, or whose pool's base job template is not :func:`locked_base_job_template`
  is moved to Failed with the reason (shown in the UI) and recorded as ``worker.refused`` in
  the state store the worker's file names for its flow runs; nothing is started;
* it builds each run's process from its own :class:`~portcullis.sides.WorkerConfig` only:
  the command is always :mod:`portcullis.engine` (which loads the flow from the configured
  entrypoint in the configured checkout and never runs pull steps), the environment is the
  configured one plus the Prefect connection settings, the working directory the checkout.

Run it as ``python -m portcullis.worker --side deploy --config /etc/portcullis/deploy.toml``
(see docs/operating-workers.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, cast
from uuid import UUID

import anyio
import anyio.abc
import anyio.to_thread
import httpx
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, State, StateType, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.exceptions import Abort, ObjectNotFound
from prefect.flows import Flow
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.settings import get_current_settings
from prefect.states import Failed
from prefect.utilities.engine import propose_state
from prefect.utilities.processutils import run_process
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from portcullis.audit import AuditEntry
from portcullis.errors import PolicyRefusal, PortcullisError
from portcullis.sides import (
    WORKER_CONFIG_VAR,
    Side,
    WorkerConfig,
    load_worker_config,
    record_refusal,
    worker_settings,
)
from portcullis.zygote import Zygote, ZygoteUnavailable

#: The run this submission checked and its ``flow/deployment`` (set around each submission).
_CHECKED: ContextVar[tuple[UUID, str] | None] = ContextVar("portcullis_checked", default=None)

#: Variables of the worker's own environment a flow process needs to find its tools.
PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")


def locked_base_job_template() -> dict[str, Any]:
    """The base job template of a Portcullis pool: no variable a run could set.

    The worker ignores the job configuration anyway (it builds every process from its own
    file); the template is locked so the pool shows in the UI what really happens, and the
    worker refuses runs when someone changed it.
    """
    return {
        "job_configuration": {
            "command": "python -m portcullis.engine",
            "env": {},
            "labels": {},
            "name": None,
            "stream_output": True,
            "working_dir": None,
        },
        "variables": {"type": "object", "properties": {}},
    }


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spacing: equal templates give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def deployment_key(flow_name: str, deployment_name: str) -> str:
    """``flow/deployment``, the key of :attr:`WorkerConfig.deployments`."""
    return f"{flow_name}/{deployment_name}"


def refusal_reason(
    flow_run: FlowRun,
    deployment: DeploymentResponse | None,
    flow_name: str | None,
    pool: WorkPool,
    config: WorkerConfig,
) -> str | None:
    """Why this worker must not start ``flow_run`` (None: it may). A pure function.

    Args:
        flow_run: the run as the API returns it now.
        deployment: its deployment as the API returns it now (None: the run has none).
        flow_name: the name of the deployment's flow.
        pool: the work pool as the API returns it now.
        config: this worker's configuration.
    """
    if flow_run.job_variables:
        return (f"the flow run sets job variables ({', '.join(sorted(flow_run.job_variables))}); "
                "this worker runs flows only as its host configuration says")
    if deployment is None or flow_name is None:
        return "the flow run has no deployment; this worker runs only configured deployments"
    key = deployment_key(flow_name, deployment.name)
    if deployment.job_variables:
        return (f"deployment {key} sets job variables "
                f"({', '.join(sorted(deployment.job_variables))}); remove them")
    allowed = config.deployments.get(key)
    if allowed is None:
        return (f"deployment {key} is not configured on the {config.side} worker "
                f"{config.name}; it runs only {', '.join(sorted(config.deployments))}")
    if deployment.entrypoint != allowed:
        return (f"deployment {key} has entrypoint {deployment.entrypoint!r}, but this worker "
                f"runs it only from {allowed!r}")
    if canonical(pool.base_job_template) != canonical(locked_base_job_template()):
        return (f"the base job template of work pool {pool.name} was changed; reset it with "
                "`python -m infra.production up --reset-pools` (see docs/operating-workers.md)")
    return None


def run_environment(config: WorkerConfig, config_path: Path,
                    worker_environ: Mapping[str, str],
                    prefect_settings: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a flow process: what the file configures, the Prefect
    connection settings of the worker, and where the tools are. Nothing from the run."""
    env = {k: worker_environ[k] for k in PASSED_THROUGH if k in worker_environ}
    env.update(prefect_settings)
    env.update(config.environment)
    env[WORKER_CONFIG_VAR] = str(config_path)
    return env


@dataclass(frozen=True)
class FlowProcessStarter:
    """Starts one flow process (:mod:`portcullis.engine`) with exactly ``env`` in ``cwd``.

    With a ``zygote`` (a warm start, the default) the process is forked from the worker's
    pre-imported parent (:mod:`portcullis.zygote`), which has exactly this environment and
    directory; when that parent cannot be started or does not fork, the run starts cold as
    ``argv``. Either way the run was checked (:func:`refusal_reason`) before.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    control_channel: Any = None
    zygote: Zygote | None = None
    deployment: str | None = None

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the process, hand its handle to ``task_status``, wait until it exits."""
        env = dict(self.env)
        env["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
        # Hooks run in the flow process only; the worker never loads flow code for them.
        env["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
        control: tuple[int, str] | None = None
        if self.control_channel is not None:
            try:
                control = self.control_channel.register(flow_run.id)
            except RuntimeError:
                pass  # no loopback listener: cancellation falls back to killing the process
            else:
                assert control is not None
                env["PREFECT__CONTROL_PORT"], env["PREFECT__CONTROL_TOKEN"] = str(control[0]), control[1]
        handed_off = False

        def handed(process: anyio.abc.Process) -> ProcessHandle:
            nonlocal handed_off
            handed_off = True
            return ProcessHandle(process)

        try:
            if self.zygote is not None and self.deployment is not None:
                try:
                    child = await self.zygote.fork(flow_run.id, self.deployment, control)
                except ZygoteUnavailable as exc:
                    print(f"portcullis worker: warm start of {flow_run.id} failed ({exc}); "
                          "starting it cold", file=sys.stderr, flush=True)
                else:
                    handed_off = True
                    task_status.started(ProcessHandle(cast(Any, child)))
                    await child.wait()
                    return
            await run_process(self.argv, stream_output=True, task_status=task_status,
                              task_status_handler=handed, env=env, cwd=self.cwd)
        except BaseException:
            if control is not None and not handed_off:
                self.control_channel.unregister(flow_run.id)
            raise


class PortcullisWorker(ProcessWorker):
    """A process worker that refuses what it did not configure (see the module docstring)."""

    @classmethod
    def __dispatch_key__(cls) -> str:
        # Registered under its own key: importing this module must not replace Prefect's
        # stock "process" worker type for anything else in the process.
        return "portcullis-process"

    def __init__(self, config: WorkerConfig, config_path: Path, *, limit: int | None = None) -> None:
        super().__init__(work_pool_name=config.pool, name=config.name,
                         work_queues=list(config.queues) or None,
                         create_pool_if_not_found=False, limit=limit)
        self.config = config
        self.config_path = config_path
        self.zygote: Zygote | None = None

    def _run_environment(self) -> dict[str, str]:
        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        return run_environment(self.config, self.config_path, os.environ,
                               {k: str(v) for k, v in settings.items() if v is not None})

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        if self.config.start == "warm":
            env = self._run_environment()
            env["PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS"] = "false"
            self.zygote = Zygote(self.config_path, env, self.config.checkout)
            try:
                await self.zygote.start()
            except ZygoteUnavailable as exc:  # each run tries again, and starts cold meanwhile
                self._logger.warning("warm starts unavailable for now: %s", exc)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await super().__aexit__(*exc_info)
        finally:
            if self.zygote is not None:
                await self.zygote.stop()

    async def _submit_run_and_capture_errors(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[int | Exception] | None = None,
    ) -> Any:
        try:
            reason, key = await self._check(flow_run)
        except (httpx.HTTPError, ObjectNotFound) as exc:  # start nothing it could not check
            reason, key = f"the worker could not check the run: {type(exc).__name__}: {exc}", None
        if reason is not None or key is None:
            refusal = PolicyRefusal(f"refused by the Portcullis worker {self.name}: {reason}")
            await self._refuse(flow_run, refusal)
            self._release_limit_slot(flow_run.id)
            if task_status is not None:
                task_status.started(refusal)
            return refusal
        # Handed to run() through the context of this submission, not a dict keyed by run id:
        # a resumed run can be submitted again while its suspended attempt is still ending.
        token = _CHECKED.set((flow_run.id, key))
        try:
            return await super()._submit_run_and_capture_errors(flow_run, task_status)
        finally:
            _CHECKED.reset(token)

    async def _check(self, flow_run: FlowRun) -> tuple[str | None, str | None]:
        # Everything read fresh from the API now, not the worker's cached pool snapshot.
        fresh = await self.client.read_flow_run(flow_run.id)
        pool = await self.client.read_work_pool(self.config.pool)
        deployment = flow_name = None
        if fresh.deployment_id is not None:
            deployment = await self.client.read_deployment(fresh.deployment_id)
            flow_name = (await self.client.read_flow(deployment.flow_id)).name
        reason = refusal_reason(fresh, deployment, flow_name, pool, self.config)
        if reason is None and deployment is not None and flow_name is not None:
            return None, deployment_key(flow_name, deployment.name)
        return reason, None

    async def _refuse(self, flow_run: FlowRun, refusal: PolicyRefusal) -> None:
        self.get_flow_run_logger(flow_run).error(refusal.message)
        app = flow_run.parameters.get("app")
        entry = AuditEntry(
            event="worker.refused", actor="portcullis", run_id=str(flow_run.id),
            app=app if isinstance(app, str) else None,
            details={"reason": refusal.message, "worker": self.name, "side": self.config.side,
                     "pool": self.config.pool, "flow_run": flow_run.name},
        )
        # The store this worker's flow runs append to (its file says which): one trail that
        # `python -m portcullis.audit verify` and the history read, shared by every host.
        failed = await anyio.to_thread.run_sync(record_refusal, worker_settings(self.config), entry)
        if failed is not None:
            self.get_flow_run_logger(flow_run).error("the refusal could not be recorded: %s", failed)
        try:
            await propose_state(self.client, Failed(message=refusal.message), flow_run_id=flow_run.id)
        except (Abort, ObjectNotFound, httpx.HTTPError):
            self.get_flow_run_logger(flow_run).exception("could not mark the refused run Failed")

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        """Start the flow process from this worker's configuration; ``configuration`` (built
        from the pool template and job variables) is ignored on purpose."""
        if task_status is None:
            task_status = anyio.TASK_STATUS_IGNORED
        checked = _CHECKED.get()
        if checked is None or checked[0] != flow_run.id:
            raise PolicyRefusal(f"flow run {flow_run.id} was not checked by this worker")
        key = checked[1]
        env = self._run_environment()
        argv = [sys.executable, "-m", "portcullis.engine", "--config", str(self.config_path),
                "--deployment", key]
        execution: FlowRunExecutionResult | None = None
        async with FlowRunExecutorContext() as ctx:
            starter = FlowProcessStarter(argv, env, self.config.checkout, ctx.control_channel,
                                         self.zygote, key)
            executor = ctx.create_executor(flow_run, starter, resolve_flow=self._resolve_flow,
                                           propose_submitting=False)

            async def execute(*, task_status: anyio.abc.TaskStatus[ProcessHandle]
                              = anyio.TASK_STATUS_IGNORED) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = cast(ProcessHandle, await group.start(execute))
                if handle.pid is None:
                    raise RuntimeError("the flow process has no pid")
                task_status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("the flow process did not start")
        return ProcessWorkerResult(status_code=execution.status_code,
                                   identifier=str(execution.handle.pid))

    async def _propose_crashed_state(
        self, flow_run: FlowRun, message: str, client: PrefectClient | None = None,
    ) -> None:
        # A run that suspended to wait for people holds no process by design: its process's
        # exit (normal, or killed while it tore down after suspending, e.g. the worker being
        # stopped) must not end the wait. Crashing it would lose every answer still to come.
        client = client or self.client
        try:
            current = await client.read_flow_run(flow_run.id)
        except (httpx.HTTPError, ObjectNotFound):
            current = None
        if current is not None and waits_without_process(current.state):
            self.get_flow_run_logger(flow_run).info(
                "flow run %s waits suspended (%s); its process's exit does not end it",
                flow_run.id, message)
            return
        await super()._propose_crashed_state(flow_run, message, client=client)

    async def _resolve_flow(self, flow_run: FlowRun) -> Flow[Any, Any]:
        # Only for Prefect's crash hooks, which the flow process runs (disabled here above).
        raise PolicyRefusal("the Portcullis worker loads no flow code")

    async def _submit_adhoc_run(self, *args: Any, **kwargs: Any) -> None:
        raise PolicyRefusal("the Portcullis worker runs only configured deployments")


def waits_without_process(state: State | None) -> bool:
    """Whether ``state`` is a wait that holds no process: the run starts again later.

    A suspension (``suspend_flow_run`` pauses with ``pause_reschedule``) or Scheduled (not yet
    started, or waiting for its wait timer). ``pause_flow_run`` pauses without
    ``pause_reschedule``: its process keeps polling, so losing that process does lose the wait.
    """
    if state is None:
        return False
    if state.type == StateType.SCHEDULED:
        return True
    return state.type == StateType.PAUSED and bool(state.state_details.pause_reschedule)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m portcullis.worker --side build|deploy --config PATH``."""
    parser = argparse.ArgumentParser(prog="python -m portcullis.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["build", "deploy"], required=True)
    parser.add_argument("--config", type=Path, required=True, help="the worker's TOML file")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    args = parser.parse_args(argv)
    side: Side = args.side
    path: Path = args.config.absolute()
    try:
        config = load_worker_config(path)
        if config.side != side:
            raise PolicyRefusal(f"{path} configures the {config.side} side, not {side}")
    except PortcullisError as exc:
        print(f"portcullis worker not started: {exc}", file=sys.stderr)
        return 2
    worker = PortcullisWorker(config, path, limit=args.limit)
    asyncio.run(worker.start())
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
