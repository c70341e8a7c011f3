"""End to end: a canary on real traffic through real HAProxy, Prometheus and the exporter.

Given two versions of an app (busybox httpd with a CGI script whose error fraction and delay
can be changed while it runs), HAProxy routing between them, the latency exporter receiving
HAProxy's request log, and Prometheus scraping both every second,
when the stack's users (infra/loadgen.py: wrk runs in a background process) send traffic
and the weights move,
then no request fails on the way, the metrics arrive in Prometheus, and the analysis calls a
healthy canary Successful and a canary answering 20% errors Failed.

Everything runs on 127.0.0.1 with ports the kernel picks; the fixtures stop every process
they started.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.haproxy import Router
from infra.latency_exporter import LatencyExporter, start_latency_exporter
from infra.loadgen import LoadGenerator, TargetCounts
from infra.prometheus import PrometheusServer, free_tcp_port, start_prometheus
from portcullis.canary.analysis import (
    AnalysisLimits,
    AnalysisPhase,
    CanaryPolicy,
    CanaryStep,
    CheckName,
    CheckOutcome,
    Measurement,
    Verdict,
    Window,
    decide,
)
from portcullis.canary.metrics import CanaryTarget, PrometheusProvider, measure
from portcullis.errors import ConfigurationError
from portcullis.router_haproxy import ServerRole
from tests.support.users import users_at

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("haproxy", "prometheus", "wrk", "busybox")),
        reason="needs haproxy, prometheus, wrk and busybox (apt-get install -y haproxy "
        "prometheus wrk busybox-static)",
    ),
]

APP, ENV = "web", "staging"

# The app: answers 500 for `error_permille` out of 1000 requests and sleeps `delay_ms` first.
# Both knobs are files read on every request, so a test can change them while traffic flows.
_CGI = """#!/bin/busybox ash
conf={conf}
read -r err < "$conf/error_permille"
read -r delay < "$conf/delay_ms"
[ "$delay" -gt 0 ] && usleep $((delay * 1000))
# busybox closes after every answer: it says so (Connection: close), or HAProxy would keep
# the connection for reuse and the next request on it would meet a closed socket.
# The Content-Length lets HAProxy keep the client's connection alive all the same.
if [ $((RANDOM % 1000)) -lt "$err" ]; then
  body="boom from {name}"
  printf 'Status: 500 Internal Server Error\\r\\n'
else
  body="hello from {name}"
fi
printf 'Connection: close\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n%s' "${{#body}}" "$body"
"""


@dataclass
class FakeApp:
    """One app version served by busybox httpd on its own port."""

    name: str
    port: int
    conf: Path
    process: subprocess.Popen[bytes]

    def behave(self, *, error_permille: int = 0, delay_ms: int = 0) -> None:
        """Change the answer mix for the following requests."""
        (self.conf / "error_permille").write_text(f"{error_permille}\n")
        (self.conf / "delay_ms").write_text(f"{delay_ms}\n")

    def stop(self) -> None:
        """Stop the httpd listener and reap it."""
        self.process.terminate()
        self.process.wait(5)


def _start_app(root: Path, name: str) -> FakeApp:
    docroot = root / name / "www"
    conf = root / name / "conf"
    (docroot / "cgi-bin").mkdir(parents=True)
    conf.mkdir()
    (docroot / "index.html").write_text(f"{name} is up\n")
    script = docroot / "cgi-bin" / "app"
    script.write_text(_CGI.format(conf=conf, name=name))
    script.chmod(0o755)
    port = free_tcp_port()
    process = subprocess.Popen(
        ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(docroot)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    app = FakeApp(name=name, port=port, conf=conf, process=process)
    app.behave()
    return app


@dataclass
class Stack:
    """Everything the canary needs, running."""

    router: Router
    exporter: LatencyExporter
    prometheus: PrometheusServer
    stable: FakeApp
    canary: FakeApp
    listen_port: int

    @property
    def url(self) -> str:
        """The app's URL through the router."""
        return f"http://127.0.0.1:{self.listen_port}/cgi-bin/app"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Apps, latency exporter, HAProxy and Prometheus; all stopped afterwards."""
    root = tmp_path_factory.mktemp("canary")
    started: list[Callable[[], None]] = []
    try:
        stable = _start_app(root, "stable")
        started.append(stable.stop)
        canary = _start_app(root, "canary")
        started.append(canary.stop)
        exporter = start_latency_exporter(root / "exporter")
        started.append(exporter.stop)
        router = Router(root / "router")
        router.start(syslog_port=exporter.udp_port)
        started.append(router.stop)
        listen_port = free_tcp_port()
        router.ensure_route(APP, ENV, listen_port=listen_port, stable_port=stable.port)
        prometheus = start_prometheus(
            root / "prometheus",
            haproxy_target=router.stats_target,
            latency_target=exporter.metrics_target,
        )
        started.append(prometheus.stop)
        prometheus.wait_for_scrapes()
        yield Stack(router, exporter, prometheus, stable, canary, listen_port)
    finally:
        for stop in reversed(started):
            stop()


def _now() -> datetime:
    return datetime.now(UTC)


def _ran_past(moment: datetime) -> Callable[[TargetCounts], bool]:
    """The users completed a run that ended after ``moment``."""
    return lambda counts: (counts.last_run_end or 0.0) >= moment.timestamp()


def _run_canary(stack: Stack, policy: CanaryPolicy, users: LoadGenerator) -> Verdict:
    """Drive the policy's steps the way the promote flow does: weight, window, measure; each
    window is measured once the users' requests went on past its end."""
    provider = PrometheusProvider(stack.prometheus.url, settle_seconds=2.0)
    target = CanaryTarget(backend=f"{APP}.{ENV}")
    measurements: list[Measurement] = []
    verdict = decide(policy, measurements)
    try:
        while not verdict.phase.terminal:
            assert verdict.next_step is not None and verdict.next_weight is not None
            stack.router.set_canary_weight(APP, ENV, verdict.next_weight)
            # The window opens a little after the weight change so that it holds no request
            # routed under the previous weight.
            start = _now() + timedelta(seconds=0.5)
            window = Window(
                start=start,
                end=start + timedelta(seconds=policy.steps[verdict.next_step].window_seconds),
            )
            users.wait_for(stack.url, _ran_past(window.end), what="requests past the window's end")
            measurements.append(
                measure(
                    provider,
                    target,
                    step=verdict.next_step,
                    weight=verdict.next_weight,
                    window=window,
                )
            )
            verdict = decide(policy, measurements)
    finally:
        provider.close()
        stack.router.set_canary_weight(APP, ENV, 0)
    return verdict


# Windows of a few seconds hold a few hundred requests: enough for the error checks and the
# latency distributions. On a shared 2-core machine single requests stall for tens of
# milliseconds, so the latency comparison tolerates twice the baseline here, and the absolute
# limit is on the p95 (a few hundred timed requests cannot show a p99 with one stall in them).
_TEST_LIMITS = AnalysisLimits(
    min_requests=60,
    latency_quantile=0.95,
    max_error_rate=0.02,
    max_latency_seconds=0.5,
    max_latency_ratio=2.0,
)


def test_weights_move_live_without_failed_requests(stack: Stack, tmp_path: Path) -> None:
    """Weights and addresses change under load, even across a reload, and nothing fails."""
    stack.stable.behave()
    stack.canary.behave()
    stack.router.point_canary(APP, ENV, stack.canary.port)
    started = _now()
    with users_at(stack.url, tmp_path / "users", rate_per_second=250, connections=8) as users:
        # After each change the users complete a run of requests before the next one.
        for percent in (20, 50, 80):
            stack.router.set_canary_weight(APP, ENV, percent)
            assert stack.router.runtime.get_weight(f"{APP}.{ENV}", "canary") == percent
            assert stack.router.runtime.get_weight(f"{APP}.{ENV}", "stable") == 100 - percent
            users.next_runs(stack.url, 1)
        # A new route means a new config: HAProxy reloads (-x, -sf) while wrk keeps going.
        stack.router.ensure_route(
            "other", ENV, listen_port=free_tcp_port(), stable_port=stack.stable.port
        )
        users.next_runs(stack.url, 1)
        stack.router.set_canary_weight(APP, ENV, 0)
        result = users.next_runs(stack.url, 1)

    assert result.requests > 500, result
    assert result.http_errors == 0, result
    assert result.socket_errors == 0, result
    # The reload kept the runtime weight: it was rendered from router.json.
    assert stack.router.server_state(APP, ENV, ServerRole.CANARY).weight == 0
    assert stack.router.server_state(APP, ENV, ServerRole.STABLE).weight == 100

    # Prometheus saw both servers answer, and the exporter's histograms for both: waited for
    # until its scrapes have counted them.
    provider = PrometheusProvider(stack.prometheus.url, settle_seconds=0)
    deadline = time.monotonic() + 30
    try:
        while True:
            sample = provider.sample(CanaryTarget(backend=f"{APP}.{ENV}"),
                                     Window(start=started, end=_now()))
            sides = (sample.canary, sample.baseline)
            if all(s.requests > 50 and s.latency_samples > 50 for s in sides):
                break
            assert time.monotonic() < deadline, f"Prometheus never counted both servers: {sample}"
            time.sleep(0.2)
    finally:
        provider.close()
    assert sample.canary.requests > 50 and sample.baseline.requests > 50, sample
    assert sample.canary.errors == 0 and sample.baseline.errors == 0, sample
    assert sample.canary.latency_samples > 50 and sample.baseline.latency_samples > 50, sample
    assert sample.canary.p99_seconds is not None and sample.baseline.p99_seconds is not None
    assert sample.canary.latency is not None and sample.canary.latency.bounds[-1] == float("inf")


def test_retired_canary_gets_no_traffic_and_cannot_be_weighted(stack: Stack) -> None:
    """After disable_canary the server is in maintenance and weights cannot move to it."""
    stack.router.point_canary(APP, ENV, stack.canary.port)
    stack.router.set_canary_weight(APP, ENV, 50)
    route = stack.router.disable_canary(APP, ENV)
    assert route.canary_port is None and route.canary_weight == 0
    state = stack.router.server_state(APP, ENV, ServerRole.CANARY)
    assert state.in_maintenance and state.weight == 0 and not state.up
    with pytest.raises(ConfigurationError, match="no canary server is set"):
        stack.router.set_canary_weight(APP, ENV, 20)
    # Pointing it at a port again brings it back (health checks decide when it is up).
    stack.router.point_canary(APP, ENV, stack.canary.port)
    deadline = time.monotonic() + 5
    while not stack.router.server_state(APP, ENV, ServerRole.CANARY).up:
        assert time.monotonic() < deadline, "the canary never came back up"
        time.sleep(0.1)


def test_malformed_promql_is_a_configuration_error(stack: Stack) -> None:
    """A query Prometheus cannot parse is a bug, not a transient failure to retry."""
    provider = PrometheusProvider(stack.prometheus.url)
    try:
        with pytest.raises(ConfigurationError, match="rejected query"):
            provider.query("sum(", time.time())
    finally:
        provider.close()


def test_healthy_canary_is_successful(stack: Stack, tmp_path: Path) -> None:
    """Given a canary as good as stable, every step passes and the verdict is Successful."""
    stack.stable.behave(error_permille=0)
    stack.canary.behave(error_permille=0)
    stack.router.point_canary(APP, ENV, stack.canary.port)
    policy = CanaryPolicy(
        steps=(CanaryStep(weight=30, window_seconds=3), CanaryStep(weight=50, window_seconds=3)),
        limits=_TEST_LIMITS,
    )
    with users_at(stack.url, tmp_path / "users", rate_per_second=250, connections=8) as users:
        before = users.counts(stack.url)
        verdict = _run_canary(stack, policy, users)
        result = users.next_runs(stack.url, 1).since(before)

    assert verdict.phase is AnalysisPhase.SUCCESSFUL, verdict.reason
    assert [a.measurement.weight for a in verdict.assessments] == [30, 50]
    assert result.http_errors == 0 and result.socket_errors == 0


def test_canary_with_20_percent_errors_fails(stack: Stack, tmp_path: Path) -> None:
    """Given a canary that answers 20% errors, the first step fails the analysis."""
    stack.stable.behave(error_permille=0)
    stack.canary.behave(error_permille=200)
    stack.router.point_canary(APP, ENV, stack.canary.port)
    policy = CanaryPolicy(
        steps=(CanaryStep(weight=30, window_seconds=3), CanaryStep(weight=50, window_seconds=3)),
        limits=_TEST_LIMITS,
    )
    try:
        with users_at(stack.url, tmp_path / "users", rate_per_second=250, connections=8) as users:
            before = users.counts(stack.url)
            verdict = _run_canary(stack, policy, users)
            result = users.next_runs(stack.url, 1).since(before)
    finally:
        stack.canary.behave()

    assert verdict.phase is AnalysisPhase.FAILED, verdict.reason
    (assessment,) = verdict.assessments
    failed = {c.name for c in assessment.checks if c.outcome is CheckOutcome.FAIL}
    assert CheckName.ERROR_RATE in failed and CheckName.ERROR_RATE_VS_BASELINE in failed
    sample = assessment.measurement.sample
    assert sample is not None
    assert sample.baseline.errors == 0, "the stable side served no error"
    assert 0.1 < sample.canary.errors / sample.canary.requests < 0.3, sample
    # Every error the clients saw came from the canary.
    assert result.http_errors > 0


def test_slow_canary_fails_on_latency(stack: Stack, tmp_path: Path) -> None:
    """Given a canary 300 ms slower than stable, both latency checks fail it."""
    stack.stable.behave(delay_ms=0)
    stack.canary.behave(delay_ms=300)
    stack.router.point_canary(APP, ENV, stack.canary.port)
    policy = CanaryPolicy(
        steps=(CanaryStep(weight=50, window_seconds=6),),
        limits=_TEST_LIMITS.model_copy(
            update={"max_latency_seconds": 0.2, "max_latency_ratio": 1.5}
        ),
    )
    # Slow answers hold connections, so the load runs uncapped. It stays at 8 connections:
    # busybox httpd listens with a backlog of 9, and a fuller accept queue can drop handshakes
    # whose retransmissions would show up as 200-1000 ms stalls of the stable server.
    try:
        with users_at(stack.url, tmp_path / "users", rate_per_second=None, connections=8) as users:
            verdict = _run_canary(stack, policy, users)
    finally:
        stack.canary.behave()

    assert verdict.phase is AnalysisPhase.FAILED, verdict.reason
    (assessment,) = verdict.assessments
    failed = {c.name for c in assessment.checks if c.outcome is CheckOutcome.FAIL}
    details = "; ".join(c.detail for c in assessment.checks)
    assert failed == {CheckName.LATENCY, CheckName.LATENCY_VS_BASELINE}, details
