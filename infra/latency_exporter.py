"""Per-server response-time histograms from HAProxy's request log.

HAProxy's Prometheus exporter has averages and maxima of response times but no histogram, so
no p99 can be computed from it. HAProxy can, however, send one syslog line per request over
UDP. This exporter listens for those lines on loopback, parses the fields written by
:data:`portcullis.router_haproxy.LOG_FORMAT` (backend, server, status, Tr and Tt timers) and
exposes Prometheus histograms per backend and server with log-spaced buckets at most 10% wide
(:data:`portcullis.canary.metrics.LATENCY_BUCKETS`, 1 ms to 30 s), so the canary judge gets
each server's whole response-time distribution over a window from ``increase()`` of the
buckets, not one interpolated quantile.

Run it as a process: ``python -m infra.latency_exporter --udp-port 0 --http-port 0
--ready-file PATH``; with port 0 it picks free ports and writes them to the ready file.
:func:`start_latency_exporter` does exactly that and waits for it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from portcullis.canary.metrics import LATENCY_BUCKETS, RESPONSE_SECONDS_METRIC
from portcullis.errors import TransientError
from portcullis.router_haproxy import LOG_TAG

_LINE_RE = re.compile(
    rf"{re.escape(LOG_TAG)} proxy=(?P<proxy>\S+) server=(?P<server>\S+) "
    r"status=(?P<status>-?\d+) tr=(?P<tr>-?\d+) tt=(?P<tt>-?\d+)"
)

BUCKETS = LATENCY_BUCKETS


class LatencyRecorder:
    """Parses log lines and records them into its own Prometheus registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.response_seconds = Histogram(
            RESPONSE_SECONDS_METRIC,
            "Server response time (HAProxy Tr: request sent to response headers received)",
            ["proxy", "server"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.total_seconds = Histogram(
            "portcullis_haproxy_server_total_seconds",
            "Whole request time seen by HAProxy (Tt: accept to last byte sent)",
            ["proxy", "server"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.lines = Counter(
            "portcullis_latency_exporter_lines",
            "Syslog lines received, by what became of them",
            ["result"],
            registry=self.registry,
        )

    def record(self, line: str) -> bool:
        """Record one syslog line; return whether it was one of ours with a server answer."""
        match = _LINE_RE.search(line)
        if match is None:
            self.lines.labels(result="unparsed").inc()
            return False
        proxy, server = match["proxy"], match["server"]
        tr, tt = int(match["tr"]), int(match["tt"])
        if server.startswith("<") or tr < 0:
            # <NOSRV> (no server picked) or -1 (no response, e.g. connection failed): not a
            # response time. HAProxy's own counters account for those as errors.
            self.lines.labels(result="no_response").inc()
            return False
        self.response_seconds.labels(proxy=proxy, server=server).observe(tr / 1000.0)
        if tt >= 0:
            self.total_seconds.labels(proxy=proxy, server=server).observe(tt / 1000.0)
        self.lines.labels(result="recorded").inc()
        return True


def serve(
    udp_port: int,
    http_port: int,
    *,
    ready_file: Path | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Receive syslog datagrams and serve ``/metrics`` until ``stop`` is set (or SIGTERM).

    Args:
        udp_port: UDP port on 127.0.0.1 for HAProxy's log lines; 0 picks a free one.
        http_port: TCP port on 127.0.0.1 for Prometheus; 0 picks a free one.
        ready_file: written with ``{"udp_port": .., "http_port": ..}`` once both listen.
        stop: event that ends the loop; a SIGTERM handler sets it when none is given.
    """
    recorder = LatencyRecorder()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Bursts of thousands of lines per second must not overflow the default buffer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", udp_port))
    sock.settimeout(0.2)
    httpd, _thread = start_http_server(http_port, addr="127.0.0.1", registry=recorder.registry)
    try:
        if ready_file is not None:
            ports = {"udp_port": sock.getsockname()[1], "http_port": httpd.server_address[1]}
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ports))
            tmp.replace(ready_file)  # atomic: the parent never reads half a file
        while not stop.is_set():
            try:
                datagram = sock.recv(65535)
            except TimeoutError:
                continue
            recorder.record(datagram.decode("utf-8", errors="replace"))
    finally:
        httpd.shutdown()
        httpd.server_close()
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m infra.latency_exporter``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--udp-port", type=int, default=0, help="syslog port on 127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0, help="/metrics port on 127.0.0.1")
    parser.add_argument("--ready-file", type=Path, help="where to write the chosen ports")
    args = parser.parse_args(argv)
    serve(args.udp_port, args.http_port, ready_file=args.ready_file)
    return 0


# --- the parent's side -------------------------------------------------------------------------


@dataclass
class LatencyExporter:
    """A running latency exporter process."""

    process: subprocess.Popen[bytes]
    udp_port: int
    http_port: int
    log_path: Path

    @property
    def metrics_target(self) -> str:
        """``host:port`` for Prometheus to scrape (path ``/metrics``)."""
        return f"127.0.0.1:{self.http_port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the process and wait for it (killed if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_latency_exporter(
    state_dir: Path, *, udp_port: int = 0, http_port: int = 0, timeout: float = 15.0
) -> LatencyExporter:
    """Start the exporter as a child process and wait until it listens.

    Args:
        state_dir: directory for its ready file and log.
        udp_port: fixed syslog port, or 0 for a free one.
        http_port: fixed metrics port, or 0 for a free one.
        timeout: seconds to wait for it to listen.

    Returns:
        The running exporter with the ports it bound.

    Raises:
        TransientError: it exited or did not get ready in time (its log is in ``state_dir``).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    ready_file = state_dir / "latency-exporter.ready.json"
    ready_file.unlink(missing_ok=True)
    log_path = state_dir / "latency-exporter.log"
    project_root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_root), env.get("PYTHONPATH")]))
    log: IO[bytes]
    with log_path.open("ab") as log:
        # A long-running server cannot go through run_tool (which waits for the program to
        # finish); it is started here with the same discipline: an argv list, no shell.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infra.latency_exporter",
                "--udp-port",
                str(udp_port),
                "--http-port",
                str(http_port),
                "--ready-file",
                str(ready_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            ports = json.loads(ready_file.read_text())
            return LatencyExporter(process, ports["udp_port"], ports["http_port"], log_path)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    exporter = LatencyExporter(process, udp_port, http_port, log_path)
    exporter.stop()
    tail = log_path.read_text(errors="replace")[-1500:]
    raise TransientError(
        f"the latency exporter did not start within {timeout:.0f}s: {tail}",
        hint=f"see {log_path}",
    )


if __name__ == "__main__":
    sys.exit(main())
