"""The canary's parts one at a time: router config, runtime API errors, the latency exporter,
the Prometheus config, the load generator's bounds and the measurement wrapper."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from infra.latency_exporter import BUCKETS, LatencyRecorder, start_latency_exporter
from infra.loadgen import LoadGenerator, TargetCounts, run_load
from infra.prometheus import free_tcp_port
from infra.prometheus import render_config as render_prometheus_config
from portcullis.canary.analysis import LatencyHistogram, Sample, ServerWindow, Window
from portcullis.canary.metrics import (
    HAPROXY_JOB,
    LATENCY_BUCKETS,
    LATENCY_JOB,
    RESPONSE_SECONDS_METRIC,
    CanaryTarget,
    MetricsProvider,
    MetricsUnavailable,
    PrometheusProvider,
    measure,
)
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.router_haproxy import LOG_FORMAT, Route, RouterSettings, RuntimeApi, render_config
from portcullis.toolrun import run_tool

WINDOW = Window(start=datetime(2030, 1, 1, tzinfo=UTC), end=datetime(2030, 1, 1, 0, 1, tzinfo=UTC))


def _settings(*routes: Route) -> RouterSettings:
    return RouterSettings(stats_port=18404, syslog_port=15514, routes=routes)


ROUTE = Route(app="web", environment="prod", listen_port=18080, stable_port=18081)


# --- HAProxy configuration ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (apt-get install)")
def test_rendered_config_is_accepted_by_haproxy(tmp_path: Path) -> None:
    with_canary = ROUTE.model_copy(
        update={
            "environment": "staging",
            "listen_port": 18090,
            "canary_port": 18092,
            "canary_weight": 20,
            "health_path": "/healthz",
        }
    )
    text = render_config(_settings(ROUTE, with_canary), tmp_path / "admin.sock")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    result = run_tool(["haproxy", "-c", "-f", str(cfg)], timeout=15)
    assert "Warnings" not in result.stderr, result.stderr
    assert "server canary 127.0.0.1:18092 weight 20 check\n" in text
    assert "server stable 127.0.0.1:18081 weight 100 check\n" in text
    # No canary yet: the server exists (so weights can move later) but is in maintenance.
    assert "server canary 127.0.0.1:18081 weight 0 check disabled\n" in text
    assert f'log-format "{LOG_FORMAT}"' in text
    assert "level admin" in text and "prometheus-exporter" in text


def test_two_frontends_on_one_port_are_refused(tmp_path: Path) -> None:
    clash = ROUTE.model_copy(update={"environment": "staging"})
    with pytest.raises(ConfigurationError, match="same port"):
        render_config(_settings(ROUTE, clash), tmp_path / "admin.sock")


@pytest.mark.parametrize(
    ("field", "value"),
    [("app", "web app"), ("environment", "prod\nfrontend evil"), ("health_path", "/ x")],
)
def test_names_that_could_inject_config_are_refused(field: str, value: str) -> None:
    data = ROUTE.model_dump() | {field: value}
    with pytest.raises(ValueError):
        Route.model_validate(data)


def test_runtime_api_without_haproxy_is_transient(tmp_path: Path) -> None:
    api = RuntimeApi(tmp_path / "absent.sock", timeout=1)
    with pytest.raises(TransientError, match="did not answer"):
        api.get_weight("web.prod", "canary")
    with pytest.raises(ValueError):
        api.command("show info; shutdown frontend x")


def test_prometheus_config_scrapes_both_jobs_every_second() -> None:
    config = json.loads(
        render_prometheus_config(haproxy_target="127.0.0.1:1", latency_target="127.0.0.1:2")
    )
    assert config["global"]["scrape_interval"] == "1000ms"
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert jobs == {HAPROXY_JOB: ["127.0.0.1:1"], LATENCY_JOB: ["127.0.0.1:2"]}


# --- latency exporter -----------------------------------------------------------------------


def _line(server: str, status: int, tr: int, tt: int) -> str:
    return (
        "<134>Jan  1 00:00:00 haproxy[42]: "
        f"portcullis-v1 proxy=web.prod server={server} status={status} tr={tr} tt={tt}\n"
    )


def test_recorder_builds_per_server_histograms() -> None:
    recorder = LatencyRecorder()
    for tr in (3, 4, 250):
        assert recorder.record(_line("canary", 200, tr, tr + 1))
    assert recorder.record(_line("stable", 500, 7, 8))
    assert not recorder.record(_line("<NOSRV>", 503, -1, 0))
    assert not recorder.record(_line("canary", -1, -1, 2000))
    assert not recorder.record("<133>Jan  1 00:00:00 haproxy[42]: Proxy web.prod started.")

    def value(name: str, **labels: str) -> float | None:
        return recorder.registry.get_sample_value(name, labels)

    canary = {"proxy": "web.prod", "server": "canary"}
    assert value(f"{RESPONSE_SECONDS_METRIC}_count", **canary) == 3
    # Buckets are log-spaced, each at most 10% wider than the one below.
    assert all(b / a <= 1.1 for a, b in itertools.pairwise(BUCKETS)), BUCKETS
    assert BUCKETS[0] <= 0.001 and BUCKETS[-1] >= 30

    def le(seconds: float) -> str:  # the smallest bucket bound at or above ``seconds``
        return str(next(b for b in BUCKETS if b >= seconds))

    assert value(f"{RESPONSE_SECONDS_METRIC}_bucket", le=le(0.004), **canary) == 2
    assert value(f"{RESPONSE_SECONDS_METRIC}_bucket", le="0.003", **canary) is None  # no such bound
    below_250 = max(b for b in BUCKETS if b < 0.25)
    assert value(f"{RESPONSE_SECONDS_METRIC}_bucket", le=str(below_250), **canary) == 2
    assert value(f"{RESPONSE_SECONDS_METRIC}_bucket", le=le(0.25), **canary) == 3
    assert value(f"{RESPONSE_SECONDS_METRIC}_count", proxy="web.prod", server="stable") == 1
    assert value("portcullis_latency_exporter_lines_total", result="no_response") == 2
    assert value("portcullis_latency_exporter_lines_total", result="unparsed") == 1


def test_exporter_process_turns_udp_lines_into_metrics(tmp_path: Path) -> None:
    exporter = start_latency_exporter(tmp_path)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(_line("canary", 200, 12, 13).encode(), ("127.0.0.1", exporter.udp_port))
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"http://{exporter.metrics_target}/metrics").text
            if f'{RESPONSE_SECONDS_METRIC}_count{{proxy="web.prod",server="canary"}} 1.0' in text:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the exporter never counted the line:\n{text[-1000:]}")
    finally:
        exporter.stop()
    assert exporter.process.returncode == 0, "SIGTERM ends the exporter cleanly"


# --- load generator bounds ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/", "http://example.com/", "ftp://127.0.0.1/", "http://127.0.0.1.evil/"]
)
def test_load_only_goes_to_loopback(url: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyRefusal, match="loopback"):
        run_load(url, duration_seconds=1)
    users = LoadGenerator(tmp_path / "users")
    with pytest.raises(PolicyRefusal, match="loopback"):
        users.start(["http://127.0.0.1:1/", url])
    assert users.running() is None and not (tmp_path / "users" / "config.json").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration_seconds": 0},
        {"duration_seconds": 301},
        {"duration_seconds": 1, "connections": 0},
        {"duration_seconds": 1, "rate_per_second": 0},
    ],
)
def test_load_is_bounded(kwargs: dict[str, float]) -> None:
    with pytest.raises(PolicyRefusal):
        run_load("http://127.0.0.1:1/", **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not all(shutil.which(b) for b in ("wrk", "busybox")), reason="needs wrk and busybox")
def test_the_generator_counts_what_it_sends_and_leaves_closed_doors_alone(tmp_path: Path) -> None:
    """Given one URL that answers and one whose port is closed, the background generator sends
    steady requests to the first (counted, none failed), only probes the second, takes new
    targets while it runs, and ends by itself when its config disappears."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    port = free_tcp_port()
    httpd = subprocess.Popen(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(www)])
    users = LoadGenerator(tmp_path / "users")
    served, closed = f"http://127.0.0.1:{port}/index.html", f"http://127.0.0.1:{free_tcp_port()}/"
    try:
        pid = users.start([closed], rate_per_second=50, connections=2)
        users.wait_for(closed, lambda c: c.last_run_end is None and not c.open, timeout=30,
                       what="the closed door seen closed")
        assert users.start([closed, served], rate_per_second=50, connections=2) == pid
        first = users.next_runs(served, 1, timeout=30)
        two = users.next_runs(served, 2, timeout=30).since(first)
        assert two.runs == 2 and two.requests >= 50 and two.failed == 0, two
        assert users.counts(closed) == TargetCounts(url=closed, open=False)
        (tmp_path / "users" / "config.json").unlink()
        deadline = time.monotonic() + 30
        while users.running() is not None:
            assert time.monotonic() < deadline, "the generator outlived its config"
            time.sleep(0.05)
    finally:
        users.stop()
        httpd.terminate()
        httpd.wait(5)


# --- measurement wrapper --------------------------------------------------------------------


class FixedProvider(MetricsProvider):
    """Returns one sample, or raises the given error."""

    def __init__(self, sample: Sample | None = None, error: Exception | None = None) -> None:
        self._sample = sample
        self._error = error

    def sample(self, target: CanaryTarget, window: Window) -> Sample:
        if self._error is not None:
            raise self._error
        assert self._sample is not None
        return self._sample


def test_measure_wraps_a_sample() -> None:
    sample = Sample(
        canary=ServerWindow(requests=10, errors=1,
                            latency=LatencyHistogram.of([0.01] * 9, LATENCY_BUCKETS)),
        baseline=ServerWindow(requests=90, errors=0,
                              latency=LatencyHistogram.of([0.01] * 90, LATENCY_BUCKETS)),
    )
    m = measure(
        FixedProvider(sample), CanaryTarget(backend="web.prod"), step=1, weight=20, window=WINDOW
    )
    assert (m.step, m.weight, m.sample, m.error) == (1, 20, sample, None)


def test_measure_records_a_transient_failure_as_an_error() -> None:
    provider = FixedProvider(error=MetricsUnavailable("Prometheus is restarting"))
    m = measure(provider, CanaryTarget(backend="web.prod"), step=0, weight=5, window=WINDOW)
    assert m.sample is None and m.error == "Prometheus is restarting"


def test_measure_lets_configuration_errors_through() -> None:
    provider = FixedProvider(error=ConfigurationError("bad query"))
    with pytest.raises(ConfigurationError):
        measure(provider, CanaryTarget(backend="web.prod"), step=0, weight=5, window=WINDOW)


def test_unreachable_prometheus_gives_an_error_measurement() -> None:
    port = free_tcp_port()  # nothing listens there
    provider = PrometheusProvider(f"http://127.0.0.1:{port}", settle_seconds=0, timeout=1)
    now = datetime.now(UTC)
    window = Window(start=now - timedelta(seconds=5), end=now)
    try:
        m = measure(provider, CanaryTarget(backend="web.prod"), step=0, weight=5, window=window)
    finally:
        provider.close()
    assert m.error is not None and "did not answer" in m.error


def test_target_names_cannot_escape_promql() -> None:
    with pytest.raises(ValueError):
        CanaryTarget(backend='web"} or vector(1) or {x="')
