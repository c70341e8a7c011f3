"""Warm starts: a pre-imported parent ("zygote") that forks one flow process per run.

A fresh ``python -m portcullis.engine`` spends seconds importing Prefect and the flow modules
on every run. The Portcullis worker instead starts one long-lived parent,
``python -m portcullis.zygote --config FILE --fd N``, with exactly the environment and working
directory a flow process gets (:func:`portcullis.worker.run_environment`, the checkout). The
parent imports Prefect's engine and every entrypoint of the worker file, then waits on the
socket ``N`` the worker holds the other end of. For each request (a flow run id and a
configured ``flow/deployment``; the worker has already checked the run) it forks a child that
runs :func:`portcullis.engine.run_configured` with the flow object already imported, reports
the child's pid and, when it ends, its exit status (as ``subprocess`` returncodes: negative
for a signal). The parent stays single-threaded (no Prefect log handler fired, no API client,
no event loop) so that fork is safe; it refuses to serve when it finds another thread.

Children die with the parent (``PR_SET_PDEATHSIG``): a killed zygote takes its runs with it,
and the worker reports them as killed so they end Crashed. The parent exits when the worker
closes the socket. Settings read while importing are fixed when the parent starts: restart
the worker after changing dependencies or the checkout.

:class:`Zygote` is the worker's side: it starts the parent, restarts it when it died, and
hands out :class:`WarmChild` objects that Prefect's ``ProcessHandle`` can track.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from prefect.flows import Flow

    from portcullis.sides import WorkerConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the zygote) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _child(config: WorkerConfig, deployment: str, flow_run_id: UUID,
           control: list[str] | None, flow: Flow[..., Any] | None, parent: int) -> int:
    """The forked flow process: run the flow run, return the exit code."""
    from portcullis.engine import run_configured

    _die_with_parent()
    if os.getppid() != parent:  # the zygote died between fork and prctl
        return 1
    os.environ["PREFECT__FLOW_RUN_ID"] = str(flow_run_id)
    if control is not None:
        os.environ["PREFECT__CONTROL_PORT"], os.environ["PREFECT__CONTROL_TOKEN"] = control
    try:
        run_configured(config, deployment, flow_run_id, flow)
    except SystemExit as exc:  # handle_engine_signals exits this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (the process ends here: report, exit 1)
        traceback.print_exc()
        return 1
    return 0


def serve(config_path: Path, channel: socket.socket) -> int:
    """The zygote's main loop (see the module docstring); returns when the worker hangs up."""
    from prefect.engine import handle_engine_signals  # noqa: F401  (warm the engine)
    from prefect.flow_engine import load_flow_run, run_flow  # noqa: F401

    from portcullis.engine import load_configured_flow
    from portcullis.sides import load_worker_config

    config = load_worker_config(config_path)
    flows: dict[str, Flow[..., Any] | None] = {}
    loaded: dict[str, Flow[..., Any] | None] = {}
    for deployment, entrypoint in config.deployments.items():
        if entrypoint not in loaded:
            try:
                loaded[entrypoint] = load_configured_flow(config, deployment)
            except Exception:  # noqa: BLE001  (the child loads it again, logs why to the run)
                traceback.print_exc()
                loaded[entrypoint] = None
        flows[deployment] = loaded[entrypoint]
    if threading.active_count() != 1:
        _send(channel, {"op": "refused",
                        "error": f"{threading.active_count()} threads after import; fork unsafe"})
        return 1

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    me = os.getpid()
    _send(channel, {"op": "ready", "pid": me})
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.fileobj is channel:
                data = channel.recv(65536)
                if not data:
                    return 0
                pending += data
            else:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            run_id, deployment = str(request["id"]), str(request["deployment"])
            if deployment not in config.deployments:
                _send(channel, {"op": "failed", "id": run_id,
                                "error": f"{deployment} is not configured"})
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    selector.close()
                    channel.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    code = _child(config, deployment, UUID(run_id), request.get("control"),
                                  flows[deployment], me)
                finally:
                    with contextlib.suppress(BaseException):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            _send(channel, {"op": "started", "id": run_id, "pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send(channel, {"op": "exited", "pid": pid,
                            "code": os.waitstatus_to_exitcode(status)})


class WarmChild:
    """A flow process forked by the zygote, shaped like a subprocess for ``ProcessHandle``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    def ended(self, code: int) -> None:
        """Record the exit status the zygote reported (or the worker inferred)."""
        if self.returncode is None:
            self.returncode = code
        self._ended.set()

    async def wait(self) -> int:
        """Wait until the process ended; its returncode."""
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode


class ZygoteUnavailable(RuntimeError):
    """The zygote could not be started or could not fork: the worker starts a cold process."""


def process_ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (not this process's child to reap: an orphan)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Zygote:
    """The worker's handle on its warm parent: starts it, forks through it, restarts it.

    Args:
        config_path: the worker file (the zygote reads it with the same checks).
        env: exactly the environment of a flow process (:func:`portcullis.worker.run_environment`).
        cwd: the checkout.
        start_timeout: seconds the parent may take to import everything.
    """

    def __init__(self, config_path: Path, env: Mapping[str, str], cwd: Path,
                 start_timeout: float = 180) -> None:
        self.config_path = config_path
        self.env = dict(env)
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._forks: dict[str, asyncio.Future[WarmChild]] = {}
        self._children: dict[int, WarmChild] = {}

    @property
    def alive(self) -> bool:
        """Whether the parent runs and answers."""
        return self._process is not None and self._process.returncode is None \
            and self._reader_task is not None and not self._reader_task.done()

    async def start(self) -> None:
        """Start the parent (if it is not running) and wait until it has imported everything."""
        async with self._lock:
            if self.alive:
                return
            await self._start()

    async def _start(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "portcullis.zygote", "--config", str(self.config_path),
                "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),), env=self.env,
                cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=mine)
        try:
            line = await asyncio.wait_for(reader.readline(), self.start_timeout)
        except TimeoutError:
            line = b""
        hello = json.loads(line) if line else {"op": "died"}
        if hello.get("op") != "ready":
            await self._reap_parent()
            raise ZygoteUnavailable(f"the warm parent did not start: {hello}")
        self.pid = int(hello["pid"])
        self._reader_task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                op = message.get("op")
                if op == "started":
                    child = WarmChild(int(message["pid"]))
                    self._children[child.pid] = child
                    future = self._forks.pop(str(message["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(child)
                elif op == "failed":
                    future = self._forks.pop(str(message["id"]), None)
                    if future is not None and not future.done():
                        future.set_exception(ZygoteUnavailable(str(message.get("error"))))
                elif op == "exited":
                    ended = self._children.pop(int(message["pid"]), None)
                    if ended is not None:
                        ended.ended(int(message["code"]))
        finally:
            await self._parent_lost()

    async def _parent_lost(self) -> None:
        """The parent died (or was stopped): its children die with it; report them killed."""
        for future in self._forks.values():
            if not future.done():
                future.set_exception(ZygoteUnavailable("the warm parent died"))
        self._forks.clear()
        orphans, self._children = list(self._children.values()), {}
        deadline = time.monotonic() + 10
        for child in orphans:
            # PR_SET_PDEATHSIG kills them; wait until each is gone so the run's state is final.
            while not process_ended(child.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not process_ended(child.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
            child.ended(-signal.SIGKILL)
        await self._reap_parent()

    async def _reap_parent(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()

    async def fork(self, flow_run_id: UUID, deployment: str,
                   control: tuple[int, str] | None = None) -> WarmChild:
        """Start ``flow_run_id`` as a child of the parent (starting the parent if needed).

        Raises:
            ZygoteUnavailable: the parent could not be started or did not fork.
        """
        async with self._lock:
            if not self.alive:
                if self._reader_task is not None:
                    await asyncio.gather(self._reader_task, return_exceptions=True)
                await self._start()
            assert self._writer is not None
            key = str(flow_run_id)
            future: asyncio.Future[WarmChild] = asyncio.get_running_loop().create_future()
            self._forks[key] = future
            request = {"id": key, "deployment": deployment,
                       "control": [str(control[0]), control[1]] if control else None}
            try:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                self._forks.pop(key, None)
                raise ZygoteUnavailable(f"the warm parent did not take the request: {exc}") from exc
        return await future

    async def stop(self) -> None:
        """Hang up: the parent exits (running children end with it)."""
        async with self._lock:
            if self._writer is not None:
                self._writer.close()
            if self._reader_task is not None:
                await asyncio.gather(self._reader_task, return_exceptions=True)
            await self._reap_parent()


def main(argv: list[str] | None = None) -> int:
    """CLI (started by the worker only): ``python -m portcullis.zygote --config F --fd N``."""
    parser = argparse.ArgumentParser(prog="python -m portcullis.zygote")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.fd)
    # A worker interrupted from its terminal stops its own way; the parent follows by EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return serve(args.config, channel)


if __name__ == "__main__":
    raise SystemExit(main())
