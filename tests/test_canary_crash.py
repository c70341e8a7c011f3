"""Traffic stays safe when the run holding a canary dies or fails, on the real stack.

Given a stable version behind the real HAProxy router, Prometheus scraping it, the canary
watcher running beside them, and the stack's users (infra/loadgen.py, in the background)
sending requests through the front door:
- when the promotion process is SIGKILLed at the 20% or the 50% step, then stable holds 100%
  within two windows, serves every request, and the canary container is gone;
- when the promotion process stalls past its lease and comes back, then it notices, stops, and
  never weights the canary again;
- when the analysis raises (a metrics provider with a bug), then the rollout rolls back before
  the exception propagates;
- when Prometheus cannot be reached, then the canary is rolled back, never promoted;
- when a Failed verdict is reached, stable has 100% within a second of it;
- when a run holding the environment's deploy lock is SIGKILLed, the next promotion gets the
  lock within two windows (real Prefect test server).

Figures are printed as FIGURE lines (run with -s).
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from blocks.credentials import BuildCredentials, DeployCredentials
from infra.daemon import running_pid
from infra.docker_engine import DockerEngine
from infra.loadgen import LoadGenerator
from infra.prometheus import free_tcp_port
from infra.traffic import Traffic, TrafficPorts, ensure_canary_watch, ensure_traffic, stop_traffic
from portcullis.audit import AuditLog
from portcullis.canary.analysis import (
    AnalysisLimits,
    CanaryPolicy,
    CanaryStep,
    Sample,
    Window,
)
from portcullis.canary.metrics import CanaryTarget, MetricsProvider, PrometheusProvider
from portcullis.lease import traffic_leases
from portcullis.models import BuildResult
from portcullis.router_haproxy import HaproxyRouter, backend_name
from tasks.canary import CanaryFailed, rollout
from tasks.deploy import LABEL_APP, LABEL_DIGEST
from tasks.gates import RunAudit, environment_lock
from tests.conftest import REPO_ROOT, AppRepo
from tests.support.users import one_run_after, users_at
from tests.test_canary_rollout import Events, _build, _front

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

WINDOW = 5.0
POLICY = CanaryPolicy(
    steps=(CanaryStep(weight=20, window_seconds=WINDOW), CanaryStep(weight=50, window_seconds=WINDOW)),
    limits=AnalysisLimits(min_requests=40, max_error_rate=0.01, max_latency_seconds=1.0,
                          max_latency_ratio=3.0, pass_confidence=0.5),
    consecutive_error_limit=1,
)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory, docker_engine: DockerEngine) -> Iterator[Traffic]:
    """HAProxy, the latency exporter, Prometheus and the canary watcher on free ports."""
    state = tmp_path_factory.mktemp("traffic")
    ports = TrafficPorts(free_tcp_port(), free_tcp_port(), free_tcp_port(), free_tcp_port())
    yield ensure_traffic(state, ports, docker_host=docker_engine.host)
    stop_traffic(state)


def _event(events: Events, name: str) -> dict[str, Any]:
    return next(d for e, d in events.items if e == name)


@pytest.fixture()
def users(stable: BuildResult, app_name: str, tmp_path: Path) -> Iterator[LoadGenerator]:
    """The stack's users on the stable version's front door, once their requests flow."""
    with users_at(_front(app_name), tmp_path / "users", rate_per_second=150) as generator:
        yield generator


def _wait(probe: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll an observable state (weights, files, containers) until true; returns when."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def _weights(router: HaproxyRouter, app: str) -> tuple[int, int]:
    backend = backend_name(app, "dev")
    return router.runtime.get_weight(backend, "stable"), router.runtime.get_weight(backend, "canary")


def _stable_failures(router: HaproxyRouter, app: str) -> int:
    """Failed responses and connection errors HAProxy counted on the stable server."""
    lines = router.runtime.command("show stat").splitlines()
    rows = csv.DictReader([lines[0].lstrip("# ")] + lines[1:])
    for row in rows:
        if row["pxname"] == backend_name(app, "dev") and row["svname"] == "stable":
            return sum(int(row[k] or 0) for k in ("hrsp_5xx", "eresp", "econ"))
    raise AssertionError("no stable server in HAProxy's stats")


def _listed(client: docker.DockerClient, **kwargs: Any) -> list[Any]:
    """``containers.list`` that tolerates a container removed between the listing and its
    inspection (the watcher removes canaries while the test looks)."""
    while True:
        try:
            return list(client.containers.list(**kwargs))
        except docker.errors.NotFound:
            continue


def _containers_of(client: docker.DockerClient, app: str, digest: str) -> list[Any]:
    return _listed(client, all=True, filters={
        "label": [f"{LABEL_APP}={app}", f"{LABEL_DIGEST}={digest}"]})


def _rollout(build: BuildResult, app: str, creds: DeployCredentials, traffic: Traffic,
             events: Events, *, provider: MetricsProvider | None = None) -> Any:
    prom = PrometheusProvider(traffic.prometheus_url)
    try:
        return rollout(build.image, app, "dev", build.source.commit, creds, policy=POLICY,
                       router=HaproxyRouter(traffic.router_dir), provider=provider or prom,
                       record=events, on_inconclusive=lambda _v: ("rollback", "test"))
    finally:
        prom.close()


@pytest.fixture()
def stable(app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
           deploy_creds: DeployCredentials, traffic: Traffic) -> BuildResult:
    """A first version deployed behind the router."""
    v1 = _build(app_repo, app_name, build_creds, "v1")
    _rollout(v1, app_name, deploy_creds, traffic, Events())
    return v1


def _spawn_rollout(build: BuildResult, app: str, creds: DeployCredentials, traffic: Traffic,
                   tmp_path: Path, *, in_flow: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    events = tmp_path / "child-events.jsonl"
    spec = tmp_path / "child-spec.json"
    spec.write_text(json.dumps({
        "image": str(build.image), "app": app, "environment": "dev",
        "commit": build.source.commit, "router_dir": str(traffic.router_dir),
        "prometheus_url": traffic.prometheus_url, "policy": POLICY.model_dump(mode="json"),
        "events": str(events), "in_flow": in_flow,
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **_prefect_env(),
           "PORTCULLIS_DEPLOY_REGISTRY": creds.registry,
           "PORTCULLIS_DEPLOY_REGISTRY_USERNAME": creds.registry_username,
           "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": creds.registry_password.get_secret_value(),
           "PORTCULLIS_DEPLOY_DOCKER_HOST": creds.docker_host or ""}
    child = subprocess.Popen([sys.executable, "-m", "tests.support.canary_child", str(spec)],
                             env=env, cwd=REPO_ROOT)
    return child, events


def _prefect_env() -> dict[str, str]:
    """The test server's address, for a child process (set only under prefect_harness)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": str(url)} if url else {}


def _child_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("weight", [20, 50])
def test_a_killed_promotion_gives_the_traffic_back_to_stable(
    weight: int, stable: BuildResult, users: LoadGenerator, app_repo: AppRepo, app_name: str,
    build_creds: BuildCredentials, deploy_creds: DeployCredentials, traffic: Traffic,
    docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    router = HaproxyRouter(traffic.router_dir)
    failures_before = _stable_failures(router, app_name)
    before = users.counts(_front(app_name))
    child, _ = _spawn_rollout(v2, app_name, deploy_creds, traffic, tmp_path)
    try:
        _wait(lambda: _weights(router, app_name)[1] == weight, 180, f"the canary at {weight}%")
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        on_stable = _wait(lambda: _weights(router, app_name) == (100, 0), 4 * WINDOW,
                          "100% on stable")
        gone = _wait(lambda: not _containers_of(docker_client, app_name, v2.image.digest),
                     4 * WINDOW, "the canary container removed")
        # Count past the removal: the run in progress, then one entirely after it.
        after = one_run_after(users, _front(app_name))
    finally:
        if child.poll() is None:
            child.kill()
    seen = users.counts(_front(app_name)).since(before)
    requests, failed = seen.requests, seen.failed
    stable_failed = _stable_failures(router, app_name) - failures_before
    print(f"\nFIGURE SIGKILL at {weight}%: 100% on stable {on_stable - killed:.2f}s after the kill, "
          f"canary container gone after {gone - killed:.2f}s (window {WINDOW:.0f}s); "
          f"{requests} requests through the front door, {failed} failed, "
          f"{stable_failed} failed on stable")
    assert on_stable - killed < 2 * WINDOW
    assert failed == 0 and stable_failed == 0 and requests > 0
    assert traffic_leases(traffic.router_dir).read(backend_name(app_name, "dev")) is None
    journal = (traffic.router_dir / "leases" / "reclaimed.jsonl").read_text()
    assert app_name in journal
    assert after.requests > 0 and after.failed == 0, after


def test_a_stalled_promotion_that_comes_back_stops_without_touching_the_weights(
    stable: BuildResult, users: LoadGenerator, app_repo: AppRepo, app_name: str,
    build_creds: BuildCredentials, deploy_creds: DeployCredentials, traffic: Traffic,
    docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    router = HaproxyRouter(traffic.router_dir)
    before = users.counts(_front(app_name))
    child, events = _spawn_rollout(v2, app_name, deploy_creds, traffic, tmp_path)
    try:
        _wait(lambda: _weights(router, app_name)[1] == 20, 180, "the canary at 20%")
        os.kill(child.pid, signal.SIGSTOP)
        _wait(lambda: _weights(router, app_name) == (100, 0), 4 * WINDOW, "100% on stable")
        _wait(lambda: not _containers_of(docker_client, app_name, v2.image.digest), 4 * WINDOW,
              "the canary container removed")
        os.kill(child.pid, signal.SIGCONT)
        seen = set()
        while child.poll() is None:
            seen.add(_weights(router, app_name))
            time.sleep(0.02)
        # Every request sent while it stalled and came back, up to a run that ended after.
        failed = users.next_runs(_front(app_name), 1).since(before).failed
    finally:
        if child.poll() is None:
            child.kill()
    recorded = _child_events(events)
    raised = next(e for e in recorded if e["event"] == "child.raised")
    rolled = next(e for e in recorded if e["event"] == "canary.rolled-back")
    print(f"\nFIGURE stalled run came back: {raised['kind']}: {raised['message'][:120]}; "
          f"weights seen after it resumed {sorted(seen)}; {failed} failed requests")
    assert child.returncode == 1 and raised["kind"] == "LeaseLost"
    assert "lease lost" in " ".join(rolled["problems"])
    assert seen == {(100, 0)}
    assert failed == 0


def test_a_cancelled_promotion_rolls_back_before_it_ends(
    prefect_harness: None, stable: BuildResult, users: LoadGenerator, app_repo: AppRepo,
    app_name: str, build_creds: BuildCredentials, deploy_creds: DeployCredentials,
    traffic: Traffic, docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    # A process worker cancels a run with SIGTERM; the flow engine raises TerminationSignal.
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    router = HaproxyRouter(traffic.router_dir)
    before = users.counts(_front(app_name))
    child, events = _spawn_rollout(v2, app_name, deploy_creds, traffic, tmp_path, in_flow=True)
    try:
        _wait(lambda: _weights(router, app_name)[1] == 20, 180, "the canary at 20%")
        terminated = time.monotonic()
        os.kill(child.pid, signal.SIGTERM)
        on_stable = _wait(lambda: _weights(router, app_name) == (100, 0), 4 * WINDOW,
                          "100% on stable")
        child.wait(60)
        failed = users.next_runs(_front(app_name), 1).since(before).failed
    finally:
        if child.poll() is None:
            child.kill()
    rolled = next(e for e in _child_events(events) if e["event"] == "canary.rolled-back")
    print(f"\nFIGURE SIGTERM (cancellation) at 20%: 100% on stable {on_stable - terminated:.2f}s "
          f"after the signal; {failed} failed requests; reason: {rolled['reason'][:80]}")
    assert rolled["reason"].startswith("TerminationSignal") and rolled["problems"] == []
    assert not _containers_of(docker_client, app_name, v2.image.digest)
    assert failed == 0


def test_a_watcher_killed_with_the_run_finishes_the_job_when_restarted(
    stable: BuildResult, app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, traffic: Traffic, docker_client: docker.DockerClient,
    docker_engine: DockerEngine, tmp_path: Path,
) -> None:
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    router = HaproxyRouter(traffic.router_dir)
    state = traffic.router_dir.parent
    child, _ = _spawn_rollout(v2, app_name, deploy_creds, traffic, tmp_path)
    try:
        _wait(lambda: _weights(router, app_name)[1] == 20, 180, "the canary at 20%")
        watcher_pid = running_pid(state / "canary-watch" / "canary-watch.pid")
        assert watcher_pid is not None
        os.kill(watcher_pid, signal.SIGKILL)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    lease = traffic_leases(traffic.router_dir).read(backend_name(app_name, "dev"))
    assert lease is not None  # nobody acted: the state is still on disk
    _wait(lambda: running_pid(state / "canary-watch" / "canary-watch.pid") is None, 10,
          "the watcher gone")
    ensure_canary_watch(state, docker_engine.host)
    _wait(lambda: _weights(router, app_name) == (100, 0), 4 * WINDOW, "100% on stable")
    _wait(lambda: not _containers_of(docker_client, app_name, v2.image.digest), 4 * WINDOW,
          "the canary container removed")
    live = _listed(docker_client, filters={"label": f"{LABEL_APP}={app_name}"})
    assert [c.labels[LABEL_DIGEST] for c in live] == [stable.image.digest]


class BrokenProvider(MetricsProvider):
    """A metrics provider with a bug: it raises something that is not a TransientError."""

    def sample(self, target: CanaryTarget, window: Window) -> Sample:
        raise ValueError(f"unexpected label set for {target.backend}")


def test_an_exception_in_the_analysis_rolls_back_before_it_propagates(
    stable: BuildResult, users: LoadGenerator, app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, traffic: Traffic, docker_client: docker.DockerClient,
) -> None:
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    events = Events()
    router = HaproxyRouter(traffic.router_dir)
    with pytest.raises(ValueError, match="unexpected label set"):
        _rollout(v2, app_name, deploy_creds, traffic, events, provider=BrokenProvider())
    # By the time the exception arrived here, all of this was already true.
    assert _weights(router, app_name) == (100, 0)
    assert not _containers_of(docker_client, app_name, v2.image.digest)
    rolled = _event(events, "canary.rolled-back")
    assert rolled["reason"].startswith("ValueError") and rolled["problems"] == []
    assert traffic_leases(traffic.router_dir).read(backend_name(app_name, "dev")) is None


def test_prometheus_unreachable_never_promotes(
    stable: BuildResult, users: LoadGenerator, app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, traffic: Traffic, docker_client: docker.DockerClient,
) -> None:
    v2 = _build(app_repo, app_name, build_creds, "v2", MESSAGE='"hello v2"')
    events = Events()
    unreachable = PrometheusProvider(f"http://127.0.0.1:{free_tcp_port()}")
    try:
        with pytest.raises(CanaryFailed):
            _rollout(v2, app_name, deploy_creds, traffic, events, provider=unreachable)
    finally:
        unreachable.close()
    assert "canary.promoted" not in events.names()
    assert _weights(HaproxyRouter(traffic.router_dir), app_name) == (100, 0)
    assert not _containers_of(docker_client, app_name, v2.image.digest)
    live = _listed(docker_client, filters={"label": f"{LABEL_APP}={app_name}"})
    assert [c.labels[LABEL_DIGEST] for c in live] == [stable.image.digest]


def test_a_failed_verdict_puts_stable_back_within_a_second(
    stable: BuildResult, users: LoadGenerator, app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, traffic: Traffic,
) -> None:
    bad = _build(app_repo, app_name, build_creds, "bad", FAIL_PERMILLE="200")
    router = HaproxyRouter(traffic.router_dir)
    failures_before = _stable_failures(router, app_name)
    events = Events()
    with pytest.raises(CanaryFailed):
        _rollout(bad, app_name, deploy_creds, traffic, events)
    rolled = _event(events, "canary.rolled-back")
    stable_failed = _stable_failures(router, app_name) - failures_before
    print(f"\nFIGURE Failed verdict -> canary weight 0 read back from HAProxy: "
          f"{rolled['verdict_to_stable_seconds'] * 1000:.0f} ms; {stable_failed} failed on stable")
    assert rolled["verdict_to_stable_seconds"] < 1.0
    assert stable_failed == 0


_LOCK_CHILD = """
import sys, time
from pathlib import Path
from portcullis.audit import AuditLog
from tasks.gates import RunAudit, environment_lock
env, audit_path, state, window = sys.argv[1:5]
audit = RunAudit(AuditLog(Path(audit_path)), "killed-run", "lockapp", env)
with environment_lock(env, audit, window_seconds=float(window), state_dir=Path(state)):
    time.sleep(3600)
"""


def test_a_lock_held_by_a_killed_run_is_free_within_two_windows(
    prefect_harness: None, tmp_path: Path,
) -> None:
    from prefect.settings import PREFECT_API_URL

    environment = f"crash-{secrets.token_hex(3)}"
    window = 4.0
    state = tmp_path / "locks"
    child_audit = tmp_path / "child-audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen(
        [sys.executable, "-c", _LOCK_CHILD, environment, str(child_audit), str(state), str(window)],
        env=env, cwd=REPO_ROOT)
    try:
        _wait(lambda: child_audit.exists() and "lock.acquired" in child_audit.read_text(), 120,
              "the first run to hold the lock")
        killed = time.monotonic()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    audit = RunAudit(AuditLog(tmp_path / "audit.jsonl"), "next-run", "lockapp", environment)
    with environment_lock(environment, audit, window_seconds=window, state_dir=state):
        acquired = time.monotonic()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    print(f"\nFIGURE deploy lock of a SIGKILLed run taken by the next promotion "
          f"{acquired - killed:.2f}s after the kill (window {window:.0f}s)")
    assert events[:3] == ["lock.reclaimed", "lock.acquired", "lock.released"]
    assert acquired - killed < 2 * window
