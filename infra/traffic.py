"""The traffic side of the stack: the HAProxy router, the latency exporter and Prometheus.

Started as daemons (pid files, idempotent) so the local stack keeps them between commands.
HAProxy fronts every app/environment; Prometheus scrapes HAProxy's exporter and the latency
exporter (per-request timings from HAProxy's log, for p99), and the canary analysis asks it.
The canary watcher (infra/canary_watch.py) returns a canary's traffic to stable when the run
holding it stops renewing its lease.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from infra.daemon import running_pid, start_daemon, stop_daemon
from infra.haproxy import Router
from infra.prometheus import render_config
from portcullis.errors import ConfigurationError


@dataclass(frozen=True)
class TrafficPorts:
    """Loopback ports of the traffic side."""

    syslog: int
    exporter_http: int
    haproxy_stats: int
    prometheus: int


@dataclass(frozen=True)
class Traffic:
    """Where the traffic side runs."""

    router_dir: Path
    prometheus_url: str


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_traffic(state_dir: Path, ports: TrafficPorts, docker_host: str | None = None) -> Traffic:
    """Start (or find running) the exporter, HAProxy, Prometheus and the canary watcher.

    Args:
        state_dir: where their state lives.
        ports: their loopback ports.
        docker_host: the engine the canaries run on, for the watcher (None: DOCKER_HOST).
    """
    for binary in ("haproxy", "prometheus"):
        if shutil.which(binary) is None:
            raise ConfigurationError(f"{binary} is not installed", hint="run infra/bootstrap.sh")
    exporter_dir = state_dir / "latency-exporter"
    repo = Path(__file__).resolve().parents[1]
    start_daemon(
        "latency-exporter",
        [sys.executable, "-m", "infra.latency_exporter", "--udp-port", str(ports.syslog),
         "--http-port", str(ports.exporter_http), "--ready-file", str(exporter_dir / "ready.json")],
        state_dir=exporter_dir, env={"PYTHONPATH": str(repo)},
        ready=lambda: _answers(f"http://127.0.0.1:{ports.exporter_http}/metrics"), timeout=30,
    )
    router = Router(state_dir / "router")
    router.start(syslog_port=ports.syslog, stats_port=ports.haproxy_stats)
    prom_dir = state_dir / "prometheus"
    prom_dir.mkdir(parents=True, exist_ok=True)
    (prom_dir / "prometheus.yml").write_text(render_config(
        haproxy_target=router.stats_target,
        latency_target=f"127.0.0.1:{ports.exporter_http}", scrape_interval_seconds=1.0,
    ))
    start_daemon(
        "prometheus",
        [shutil.which("prometheus") or "prometheus", f"--config.file={prom_dir / 'prometheus.yml'}",
         f"--storage.tsdb.path={prom_dir / 'data'}", "--storage.tsdb.retention.time=2d",
         f"--web.listen-address=127.0.0.1:{ports.prometheus}"],
        state_dir=prom_dir,
        ready=lambda: _answers(f"http://127.0.0.1:{ports.prometheus}/-/ready"), timeout=60,
    )
    ensure_canary_watch(state_dir, docker_host)
    return Traffic(router_dir=state_dir / "router", prometheus_url=f"http://127.0.0.1:{ports.prometheus}")


def ensure_canary_watch(state_dir: Path, docker_host: str | None = None) -> int:
    """Start (or find running) the canary watcher of the router under ``state_dir``."""
    watch_dir = state_dir / "canary-watch"
    ready = watch_dir / "ready.json"
    if running_pid(watch_dir / "canary-watch.pid") is None:
        ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "infra.canary_watch", "--router-dir", str(state_dir / "router"),
            "--ready-file", str(ready)]
    if docker_host:
        argv += ["--docker-host", docker_host]
    repo = Path(__file__).resolve().parents[1]
    return start_daemon("canary-watch", argv, state_dir=watch_dir, env={"PYTHONPATH": str(repo)},
                        ready=ready.exists, timeout=30)


def stop_traffic(state_dir: Path) -> list[str]:
    """Stop what :func:`ensure_traffic` started; returns the names of what was running."""
    stopped = []
    if stop_daemon("canary-watch", state_dir=state_dir / "canary-watch"):
        stopped.append("canary-watch")
    if stop_daemon("prometheus", state_dir=state_dir / "prometheus"):
        stopped.append("prometheus")
    router = Router(state_dir / "router")
    if router.running():
        router.stop()
        stopped.append("haproxy")
    if stop_daemon("latency-exporter", state_dir=state_dir / "latency-exporter"):
        stopped.append("latency-exporter")
    return stopped


def traffic_running(state_dir: Path) -> bool:
    """True when Prometheus and HAProxy of this state directory run."""
    return running_pid(state_dir / "prometheus" / "prometheus.pid") is not None and Router(
        state_dir / "router").running()
