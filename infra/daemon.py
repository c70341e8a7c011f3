"""Start and stop long-running helper processes (dockerd, Prefect server, ...) idempotently.

Each daemon lives in its own state directory with a pid file and a log file, so `up` twice
finds the running process instead of starting a second one, and `down` stops exactly what
`up` started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from portcullis.errors import PortcullisError
from portcullis.zygote import process_ended


def _pid_alive(pid: int) -> bool:
    return not process_ended(pid)


def running_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file`` if that process is still alive, else None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def wait_until(probe: Callable[[], bool], *, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``probe`` until it returns True or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return True
        except Exception:  # noqa: BLE001, S110 - a probe failing just means "not ready yet"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def start_daemon(
    name: str,
    argv: Sequence[str],
    *,
    state_dir: Path,
    ready: Callable[[], bool],
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    pid_file: Path | None = None,
) -> int:
    """Start ``argv`` in the background unless it already runs; wait until ``ready()``.

    Args:
        name: short name used for the log and pid files and in error messages.
        argv: the program and its arguments (no shell).
        state_dir: directory that holds ``<name>.pid`` and ``<name>.log``.
        ready: returns True once the daemon serves.
        timeout: seconds to wait for ``ready``.
        env: extra environment variables.
        pid_file: where the daemon writes its own pid, if it does (dockerd does).

    Returns:
        The daemon's pid.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    pid_path = pid_file or state_dir / f"{name}.pid"
    log_path = state_dir / f"{name}.log"
    pid = running_pid(pid_path)
    if pid is not None and wait_until(ready, timeout=timeout):
        return pid
    full_env = dict(os.environ)
    full_env.update(env or {})
    # Owner-only: a daemon's log can hold what its children print.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)
    with os.fdopen(log_fd, "ab") as log:
        # A new session so that stopping the caller's terminal does not take the daemon down,
        # and so that `down` can signal the whole process group.
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )
    if pid_file is None:
        pid_path.write_text(str(proc.pid))
        pid_path.chmod(0o600)
    if not wait_until(lambda: proc.poll() is None and ready(), timeout=timeout):
        code = proc.poll()
        tail = log_path.read_text(errors="replace")[-1500:]
        stop_daemon(name, state_dir=state_dir, pid_file=pid_path)
        state = f"exited with code {code}" if code is not None else f"not ready after {timeout:.0f}s"
        raise PortcullisError(f"{name} {state}; last log lines:\n{tail}", hint=f"see {log_path}")
    return proc.pid


def stop_daemon(
    name: str, *, state_dir: Path, pid_file: Path | None = None, timeout: float = 20.0
) -> bool:
    """Stop a daemon started by :func:`start_daemon`. Returns True if one was running."""
    pid_path = pid_file or state_dir / f"{name}.pid"
    pid = running_pid(pid_path)
    if pid is None:
        pid_path.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        # Some servers ignore the first SIGTERM while busy (Prefect workers do); escalate.
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
        if wait_until(lambda: not _pid_alive(pid), timeout=timeout / 2):
            break
    pid_path.unlink(missing_ok=True)
    return True
