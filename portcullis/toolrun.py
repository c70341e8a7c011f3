"""The one wrapper through which every external tool runs.

Rules it enforces, so that no caller has to remember them:
* argv is a list and never goes through a shell;
* every run has a timeout;
* secrets travel in the environment or on stdin, never in argv, and any secret value that
  shows up in captured output is redacted before it reaches an error or a log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from portcullis.errors import ToolError

log = logging.getLogger(__name__)

REDACTED = "***"


@dataclass(frozen=True)
class ToolResult:
    """What a finished tool run produced."""

    argv0: str
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def run_tool(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    secret_env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    cwd: str | None = None,
    check: bool = True,
    ok_codes: Sequence[int] = (0,),
) -> ToolResult:
    """Run an external program and capture its output.

    Args:
        argv: program and arguments; never interpreted by a shell. Must not contain secrets.
        timeout: seconds before the program is killed and :class:`ToolError` is raised.
        env: extra environment variables (added to the current environment).
        secret_env: environment variables whose values are secrets: passed to the program,
            and redacted from anything this wrapper logs or raises.
        stdin: bytes to feed on standard input (the other safe channel for secrets).
        cwd: working directory.
        check: raise :class:`ToolError` when the exit code is not in ``ok_codes``.
        ok_codes: exit codes that count as success.

    Returns:
        A :class:`ToolResult` with stdout as bytes and stderr as redacted text.
    """
    if isinstance(argv, str):  # a str is a Sequence too; refuse it so no shell string sneaks in
        raise TypeError("run_tool takes an argv list, not a string")
    argv = [str(a) for a in argv]
    secrets = list((secret_env or {}).values())
    for arg in argv:
        if any(s and s in arg for s in secrets):
            raise ValueError(f"refusing to run {argv[0]}: a secret value appears in argv")
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.update(secret_env or {})
    argv0 = os.path.basename(argv[0])
    log.debug("running %s (%d args, timeout %ss)", argv0, len(argv) - 1, timeout)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise ToolError(argv0, None, _redact(stderr, secrets)) from None
    except FileNotFoundError:
        raise ToolError(argv0, 127, f"{argv[0]} is not installed or not on PATH") from None
    seconds = time.monotonic() - started
    stderr = _redact(proc.stderr.decode(errors="replace"), secrets)
    if check and proc.returncode not in ok_codes:
        raise ToolError(argv0, proc.returncode, stderr)
    return ToolResult(argv0, proc.returncode, proc.stdout, stderr, seconds)
