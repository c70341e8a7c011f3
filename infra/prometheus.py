"""A Prometheus server for canary analysis.

It scrapes two targets every second: HAProxy's built-in exporter (per-server response
counters) and the latency exporter (per-server response-time histograms). The canary
analysis asks it with PromQL (``portcullis.canary.metrics.PrometheusProvider``).

:func:`render_config` is pure; :func:`start_prometheus` runs Debian's ``prometheus`` 2.x as a
child process with its own state directory on a free loopback port and waits until it is
ready.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from portcullis.canary.metrics import HAPROXY_JOB, LATENCY_JOB
from portcullis.errors import ConfigurationError, TransientError


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def render_config(
    *, haproxy_target: str, latency_target: str, scrape_interval_seconds: float = 1.0
) -> str:
    """Render ``prometheus.yml``.

    Args:
        haproxy_target: ``host:port`` of HAProxy's stats frontend serving ``/metrics``.
        latency_target: ``host:port`` of the latency exporter.
        scrape_interval_seconds: how often both are scraped; short windows need 1s.

    Returns:
        The configuration text (JSON, which is valid YAML, so no YAML writer is needed).
    """
    interval = f"{max(1, round(scrape_interval_seconds * 1000))}ms"
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {
                "job_name": HAPROXY_JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [haproxy_target]}],
            },
            {
                "job_name": LATENCY_JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [latency_target]}],
            },
        ],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class PrometheusServer:
    """A running Prometheus child process."""

    process: subprocess.Popen[bytes]
    port: int
    state_dir: Path

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``/-/ready`` answers 200.

        Raises:
            TransientError: the process exited or did not get ready in time.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                response = httpx.get(f"{self.url}/-/ready", timeout=1.0)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.1)
        log = (self.state_dir / "prometheus.log").read_text(errors="replace")[-1500:]
        raise TransientError(
            f"Prometheus on port {self.port} did not get ready ({last}): {log}",
            hint=f"see {self.state_dir / 'prometheus.log'}",
        )

    def wait_for_scrapes(self, timeout: float = 20.0) -> None:
        """Wait until every configured target has been scraped successfully once.

        Raises:
            TransientError: some target was still not up when the time ran out.
        """
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                body = httpx.get(f"{self.url}/api/v1/targets", timeout=2.0).json()
                active = body["data"]["activeTargets"]
                states = {t["labels"]["job"]: t["health"] for t in active}
                if active and all(state == "up" for state in states.values()):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise TransientError(
            f"Prometheus targets are not all up after {timeout:.0f}s: {states}",
            hint="check that HAProxy's stats frontend and the latency exporter are listening",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate Prometheus and wait for it (killed if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_prometheus(
    state_dir: Path,
    *,
    haproxy_target: str,
    latency_target: str,
    port: int | None = None,
    scrape_interval_seconds: float = 1.0,
    retention: str = "2d",
    ready_timeout: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus with its own config and data directory and wait until it is ready.

    Args:
        state_dir: holds ``prometheus.yml``, ``data/`` and ``prometheus.log``.
        haproxy_target: ``host:port`` of HAProxy's ``/metrics``.
        latency_target: ``host:port`` of the latency exporter.
        port: listen port on 127.0.0.1; a free one when None.
        scrape_interval_seconds: scrape interval for both targets.
        retention: how long samples are kept (``--storage.tsdb.retention.time``).
        ready_timeout: seconds to wait for readiness.

    Returns:
        The running server.

    Raises:
        ConfigurationError: the ``prometheus`` binary is not installed.
        TransientError: it did not become ready.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise ConfigurationError(
            "the prometheus binary is not installed", hint="apt-get install -y prometheus"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / "prometheus.yml"
    config_path.write_text(
        render_config(
            haproxy_target=haproxy_target,
            latency_target=latency_target,
            scrape_interval_seconds=scrape_interval_seconds,
        )
    )
    chosen = port or free_tcp_port()
    with (state_dir / "prometheus.log").open("ab") as log:
        # A server runs until stopped, so it cannot go through run_tool (which waits for the
        # program to finish); same discipline otherwise: argv list, no shell, loopback only.
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={state_dir / 'data'}",
                f"--storage.tsdb.retention.time={retention}",
                f"--web.listen-address=127.0.0.1:{chosen}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=state_dir,
        )
    server = PrometheusServer(process=process, port=chosen, state_dir=state_dir)
    try:
        server.wait_ready(ready_timeout)
    except TransientError:
        server.stop()
        raise
    return server
