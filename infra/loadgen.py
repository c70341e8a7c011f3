"""The local stack's users: steady HTTP traffic through each front door, from Debian's ``wrk``.

A real environment has real users; the local stack and the tests have none, and a canary
analysis with no traffic can only be Inconclusive. So the stack plays its users: a background
process (:class:`LoadGenerator`, ``python -m infra.loadgen --state-dir DIR``) sends GET requests
at a steady rate to every target URL named in ``DIR/config.json``, in back-to-back bounded
``wrk`` runs (:func:`run_load`), and adds each run's totals to ``DIR/status.json``. Nothing in
the product knows it exists: the canary judges what Prometheus saw of this traffic, exactly as
it would judge real users. Tests read the generator's own counts (:meth:`LoadGenerator.counts`)
to show that no request failed, and wait on them (a run completed after some event) instead of
sleeping.

A front door that refuses connections (no route yet, or nothing deployed there) is probed once
a second and gets no requests; a run ends every :data:`RUN_SECONDS`, so the counts move that
often. Targets are on loopback only. ``infra/stack.py`` starts it with the catalog's apps
(:func:`stack_targets`) and stops it on ``down``; the process also ends by itself when its
``config.json`` disappears (a test's temporary directory removed).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationError

from infra.daemon import running_pid, start_daemon, stop_daemon
from portcullis.audit import write_atomic
from portcullis.catalog import Catalog
from portcullis.environments import port_plan
from portcullis.errors import PolicyRefusal, PortcullisError, ToolError
from portcullis.models import Frozen
from portcullis.toolrun import run_tool

MAX_DURATION_SECONDS = 300.0
"""Upper bound on one run: a load generator must never be left running by mistake."""

_RESULT_MARK = "PORTCULLIS-WRK-RESULT "

# wrk runs one Lua state per thread plus one for done(); delay() spaces the requests of each
# connection so that all connections together stay near the requested rate.
_SCRIPT = """
local delay_ms = 0
function init(args)
  delay_ms = tonumber(args[1]) or 0
end
function delay()
  return delay_ms
end
function done(summary, latency, requests)
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%f}\\n',
    "__MARK__", summary.requests, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class LoadResult(Frozen):
    """What one wrk run measured from the client side."""

    requests: int = Field(ge=0, description="completed requests")
    duration_seconds: float = Field(ge=0)
    http_errors: int = Field(ge=0, description="responses with status >= 400")
    socket_errors: int = Field(ge=0, description="connect, read, write errors and timeouts")
    latency_p50_seconds: float = Field(ge=0)
    latency_p90_seconds: float = Field(ge=0)
    latency_p99_seconds: float = Field(ge=0)
    latency_max_seconds: float = Field(ge=0)
    latency_mean_seconds: float = Field(ge=0)

    @property
    def requests_per_second(self) -> float:
        """Achieved request rate."""
        return self.requests / self.duration_seconds if self.duration_seconds else 0.0


def require_loopback(url: str) -> None:
    """Refuse any target that is not an http(s) URL on loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise PolicyRefusal(
            f"refusing to generate load against {url!r}: only http(s) URLs on loopback "
            "(127.0.0.1, ::1, localhost) are allowed",
            hint="point the load generator at the router's frontend on 127.0.0.1",
        )


def run_load(
    url: str,
    *,
    duration_seconds: float,
    connections: int = 4,
    threads: int = 1,
    rate_per_second: float | None = None,
    request_timeout_seconds: float = 2.0,
) -> LoadResult:
    """Send HTTP GET requests to ``url`` for a bounded time.

    Args:
        url: target on loopback.
        duration_seconds: how long to run (at most :data:`MAX_DURATION_SECONDS`).
        connections: concurrent keep-alive connections (at least ``threads``).
        threads: wrk threads.
        rate_per_second: approximate cap on the total request rate; None runs flat out.
            wrk has no rate control of its own; each connection pauses ``connections / rate``
            seconds between requests, so the achieved rate is at most this and lower when
            responses are slow.
        request_timeout_seconds: a request slower than this counts as a timeout error.

    Returns:
        Totals and client-side latency percentiles.

    Raises:
        PolicyRefusal: the URL is not on loopback, or the run would exceed the bounds.
        ToolError: wrk failed or printed no result.
    """
    require_loopback(url)
    if not 0 < duration_seconds <= MAX_DURATION_SECONDS:
        raise PolicyRefusal(
            f"load duration {duration_seconds}s is outside (0, {MAX_DURATION_SECONDS:g}]s"
        )
    if threads < 1 or connections < threads:
        raise PolicyRefusal(
            f"wrk needs at least one thread and one connection per thread "
            f"(threads={threads}, connections={connections})"
        )
    if rate_per_second is not None and rate_per_second <= 0:
        raise PolicyRefusal(f"request rate must be positive, got {rate_per_second}")
    delay_ms = 0 if rate_per_second is None else max(0, round(connections * 1000 / rate_per_second))
    with tempfile.TemporaryDirectory(prefix="portcullis-wrk-") as tmp:
        script = Path(tmp) / "report.lua"
        script.write_text(_SCRIPT.replace("__MARK__", _RESULT_MARK))
        argv = [
            "wrk",
            f"--threads={threads}",
            f"--connections={connections}",
            f"--duration={max(1, round(duration_seconds))}s",
            f"--timeout={request_timeout_seconds:g}s",
            f"--script={script}",
            url,
            "--",
            str(delay_ms),
        ]
        result = run_tool(argv, timeout=duration_seconds + request_timeout_seconds + 15)
    stdout = result.stdout.decode(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_RESULT_MARK)), None)
    if line is None:
        raise ToolError("wrk", result.returncode, f"no result line in wrk output: {stdout[-500:]}")
    raw = json.loads(line[len(_RESULT_MARK) :])
    return LoadResult(
        requests=raw["requests"],
        duration_seconds=raw["duration_us"] / 1e6,
        http_errors=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        latency_p50_seconds=raw["p50_us"] / 1e6,
        latency_p90_seconds=raw["p90_us"] / 1e6,
        latency_p99_seconds=raw["p99_us"] / 1e6,
        latency_max_seconds=raw["max_us"] / 1e6,
        latency_mean_seconds=raw["mean_us"] / 1e6,
    )


# --- the stack's users: a background process of back-to-back runs --------------------------

RUN_SECONDS = 2.0
"""Length of one wrk run: the counts in ``status.json`` move this often."""

DEFAULT_RATE = 300.0
"""Requests per second per front door: a dev canary window (6 s at 20%) then holds about 360
canary requests, over the dev policy's 200, while the stack stays light on a 2-core machine."""

_CLOSED_PROBE_SECONDS = 1.0
_log = logging.getLogger("infra.loadgen")


class LoadConfig(Frozen):
    """What the generator sends (``config.json``; the running process rereads it)."""

    targets: tuple[str, ...] = Field(description="URLs on loopback, each gets its own stream")
    rate_per_second: float | None = Field(
        default=DEFAULT_RATE, gt=0,
        description="per target, held run after run against slow answers; None: as fast as answered")
    connections: int = Field(default=4, ge=1, description="keep-alive connections per target")


class TargetCounts(Frozen):
    """What the generator's completed runs against one URL measured (client side)."""

    url: str
    runs: int = Field(default=0, ge=0, description="completed wrk runs")
    requests: int = Field(default=0, ge=0)
    http_errors: int = Field(default=0, ge=0, description="responses with status >= 400")
    socket_errors: int = Field(default=0, ge=0, description="connect, read, write errors, timeouts")
    last_run_end: float | None = Field(default=None, description="time.time() the last run ended")
    open: bool = Field(default=False, description="the front door accepted a connection at the last look")

    @property
    def failed(self) -> int:
        """Requests that got no good answer."""
        return self.http_errors + self.socket_errors

    def since(self, earlier: TargetCounts) -> TargetCounts:
        """What was counted after ``earlier`` (a snapshot of the same URL) was taken."""
        return self.model_copy(update={
            "runs": self.runs - earlier.runs, "requests": self.requests - earlier.requests,
            "http_errors": self.http_errors - earlier.http_errors,
            "socket_errors": self.socket_errors - earlier.socket_errors})

    def plus(self, run: LoadResult, ended: float) -> TargetCounts:
        """These counts with one more completed run."""
        return self.model_copy(update={
            "runs": self.runs + 1, "requests": self.requests + run.requests,
            "http_errors": self.http_errors + run.http_errors,
            "socket_errors": self.socket_errors + run.socket_errors,
            "last_run_end": ended, "open": True})


def _accepts(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class _Generator:
    """The running process: one thread per target, each running wrk back to back."""

    def __init__(self, state_dir: Path) -> None:
        self.config_path = state_dir / "config.json"
        self.status_path = state_dir / "status.json"
        self._lock = threading.Lock()
        self._counts: dict[str, TargetCounts] = {}
        self._streams: dict[tuple[str, float | None, int], threading.Event] = {}

    def _publish(self, url: str, run: LoadResult | None) -> None:
        """Add a completed ``run`` (None: the door is closed) to the counts of ``url`` and
        publish them all (a stream replaced by a new rate may still finish a run: both count
        into the same totals)."""
        with self._lock:
            counts = self._counts.get(url) or TargetCounts(url=url)
            self._counts[url] = (counts.model_copy(update={"open": False}) if run is None
                                 else counts.plus(run, time.time()))
            write_atomic(self.status_path, json.dumps(
                {"pid": os.getpid(), "targets": {u: c.model_dump() for u, c in self._counts.items()}}).encode())

    def _stream(self, url: str, rate: float | None, connections: int, stop: threading.Event) -> None:
        was_open: bool | None = None
        ask = rate
        while not stop.is_set():
            if not _accepts(url):
                if was_open is not False:
                    _log.info("%s refuses connections: waiting for its front door", url)
                    self._publish(url, None)
                was_open = False
                stop.wait(_CLOSED_PROBE_SECONDS)
                continue
            if was_open is not True:
                _log.info("%s answers: sending %s requests/s", url, rate or "as many")
            was_open = True
            try:
                run = run_load(url, duration_seconds=RUN_SECONDS, connections=connections,
                               rate_per_second=ask)
            except ToolError as exc:
                # Killed with the process group on stop, or wrk failed: no counts from it.
                _log.error("wrk against %s: %s", url, exc)
                stop.wait(_CLOSED_PROBE_SECONDS)
                continue
            if run.http_errors or run.socket_errors:
                _log.warning("%s: %d of %d requests failed (%d HTTP, %d socket errors)", url,
                             run.http_errors + run.socket_errors, run.requests, run.http_errors,
                             run.socket_errors)
            self._publish(url, run)
            if rate is not None and ask is not None and run.requests_per_second > 0:
                # wrk pauses a fixed time between a connection's requests, so slow answers
                # lower the rate: the next run asks for more by what this one fell short.
                ask = min(4 * rate, max(rate, ask * rate / run.requests_per_second))

    def _reconcile(self, config: LoadConfig) -> None:
        wanted = {(url, config.rate_per_second, config.connections) for url in config.targets}
        for key in set(self._streams) - wanted:
            self._streams.pop(key).set()
        for key in wanted - set(self._streams):
            stop = self._streams[key] = threading.Event()
            threading.Thread(target=self._stream, args=(*key, stop), daemon=True,
                             name=f"load {key[0]}").start()

    def serve(self, stop: threading.Event) -> None:
        """Follow ``config.json`` until it disappears or ``stop`` is set."""
        self._publish_empty()
        config: LoadConfig | None = None
        while not stop.is_set() and self.config_path.exists():
            try:
                config = LoadConfig.model_validate_json(self.config_path.read_text())
                for url in config.targets:
                    require_loopback(url)
            except (OSError, ValidationError, PolicyRefusal) as exc:
                if config is None:
                    raise
                _log.error("keeping the previous targets: %s", exc)
            else:
                self._reconcile(config)
            stop.wait(1.0)
        for event in self._streams.values():
            event.set()

    def _publish_empty(self) -> None:
        with self._lock:
            write_atomic(self.status_path, json.dumps({"pid": os.getpid(), "targets": {}}).encode())


class LoadGenerator:
    """The background generator whose state (pid, log, config, counts) lives in ``state_dir``."""

    NAME = "loadgen"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @property
    def status_path(self) -> Path:
        """Where the running process publishes its counts."""
        return self.state_dir / "status.json"

    def running(self) -> int | None:
        """The process's pid, or None."""
        return running_pid(self.state_dir / f"{self.NAME}.pid")

    def start(self, targets: Sequence[str], *, rate_per_second: float | None = DEFAULT_RATE,
              connections: int = 4) -> int:
        """Send traffic to ``targets`` from now on (starting the process unless it runs).

        A running generator takes the new targets within a second; targets it already serves
        keep their counts.

        Raises:
            PolicyRefusal: a target is not on loopback, or the rate or connections are invalid.
        """
        for url in targets:
            require_loopback(url)
        try:
            config = LoadConfig(targets=tuple(targets), rate_per_second=rate_per_second,
                                connections=connections)
        except ValidationError as exc:
            raise PolicyRefusal(f"invalid load generator settings: {exc.errors()[0]['msg']}") from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_dir / "config.json", config.model_dump_json().encode())
        if self.running() is None:
            self.status_path.unlink(missing_ok=True)
        repo = Path(__file__).resolve().parents[1]
        return start_daemon(
            self.NAME, [sys.executable, "-m", "infra.loadgen", "--state-dir", str(self.state_dir)],
            state_dir=self.state_dir, env={"PYTHONPATH": str(repo)},
            ready=self.status_path.exists, timeout=30)

    def stop(self) -> bool:
        """Stop the process (a run in progress is not counted); True if it was running."""
        return stop_daemon(self.NAME, state_dir=self.state_dir)

    def counts(self, url: str) -> TargetCounts:
        """The counts of ``url`` so far (all zero before its first completed run)."""
        try:
            raw = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return TargetCounts(url=url)
        found = raw.get("targets", {}).get(url)
        return TargetCounts.model_validate(found) if found else TargetCounts(url=url)

    def wait_for(self, url: str, probe: Callable[[TargetCounts], bool], *, timeout: float = 60.0,
                 what: str = "the load generator") -> TargetCounts:
        """Poll the published counts of ``url`` until ``probe`` holds; returns them.

        Raises:
            PortcullisError: not within ``timeout`` seconds, or the process ended.
        """
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts(url)
            if probe(counts):
                return counts
            if self.running() is None:
                raise PortcullisError(f"the load generator in {self.state_dir} is not running "
                                      f"while waiting for {what}", hint=f"see its log in {self.state_dir}")
            if time.monotonic() > deadline:
                raise PortcullisError(f"timed out after {timeout:.0f}s waiting for {what}: {counts}")
            time.sleep(0.05)

    def next_runs(self, url: str, runs: int = 1, *, timeout: float = 60.0) -> TargetCounts:
        """Wait until ``runs`` more runs against ``url`` have completed than had at the call;
        returns the counts then. The last of them ran (at least partly) after the call."""
        before = self.counts(url).runs
        return self.wait_for(url, lambda c: c.runs >= before + runs, timeout=timeout,
                             what=f"{runs} more completed run(s) against {url}")


def front_door(catalog: Catalog, app: str, environment: str, host: str = "127.0.0.1") -> str:
    """The URL the stack's users ask for ``app`` in ``environment``: its front door, load path."""
    return f"http://{host}:{port_plan(app, environment).front}{catalog.probe_paths(app).load}"


def stack_targets(catalog: Catalog, host: str = "127.0.0.1") -> tuple[str, ...]:
    """Every catalog app's front door in each of its environments, at its load path."""
    return tuple(front_door(catalog, app.name, environment, host)
                 for app in catalog.apps for environment in app.environments)


def main(argv: list[str] | None = None) -> int:
    """Run the generator until SIGTERM, or until its ``config.json`` disappears."""
    parser = argparse.ArgumentParser(prog="python -m infra.loadgen", description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM (``stop``) keeps Python's default: the process and its wrk runs end at once.
    _Generator(args.state_dir).serve(threading.Event())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
