"""Canary rollout on a Docker host behind the HAProxy router.

The new version starts in the free slot and proves itself healthy; then it receives a growing
share of real traffic, step by step, while the analysis compares it with the stable version
over the same windows. Successful: all traffic moves to it and the old version is retired.
Failed or Error (or the canary container dies): traffic goes back to stable at once and the
canary is removed. Inconclusive: a person decides through ``on_inconclusive`` (the approval ledger's rules:
tasks/approval.py ``decide_inconclusive_canary``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import docker
from pydantic import Field

from blocks.credentials import DeployCredentials
from infra.haproxy import Router, ServerRole
from portcullis.canary.analysis import (
    AnalysisPhase,
    CanaryPolicy,
    Measurement,
    Verdict,
    Window,
    decide,
)
from portcullis.canary.loadgen import LoadResult, run_load
from portcullis.canary.metrics import CanaryTarget, MetricsProvider, measure
from portcullis.environments import port_plan
from portcullis.errors import PolicyRefusal, TransientError
from portcullis.models import Deployment, Frozen, ImageRef
from tasks.deploy import retire_others, start_in_free_slot

HEALTH_PATH = "/cgi-bin/healthz"
LOAD_PATH = "/cgi-bin/hello"
Record = Callable[..., None]


class CanaryFailed(PolicyRefusal):
    """The canary was rolled back; the stable version serves all traffic."""


class CanaryReport(Frozen):
    """What the canary analysis decided, step by step, and how fast it acted."""

    phase: AnalysisPhase
    reason: str
    steps: tuple[str, ...]
    decided_by: str = Field(default="analysis", description="'analysis' or a verified approver")
    seconds_to_stable: float | None = Field(
        default=None, description="from the start of the failing window to 100% on stable"
    )
    load: tuple[LoadResult, ...] = ()


class _Load:
    """Synthetic load through the front door for one window (demo and tests only)."""

    def __init__(self, url: str, seconds: float) -> None:
        self.result: LoadResult | None = None
        self._thread = threading.Thread(target=self._run, args=(url, seconds), daemon=True)
        self._thread.start()

    def _run(self, url: str, seconds: float) -> None:
        try:
            self.result = run_load(url, duration_seconds=seconds, connections=4)
        except Exception:  # noqa: BLE001 - load is best effort; the analysis judges the traffic
            self.result = None

    def wait(self) -> LoadResult | None:
        self._thread.join()
        return self.result


def _container_exit(client: docker.DockerClient, container_id: str) -> str | None:
    try:
        container = client.containers.get(container_id)
    except docker.errors.NotFound:
        return "the canary container disappeared"
    if container.status not in ("running", "created", "restarting"):
        return f"the canary container is {container.status} (exit code {container.attrs['State'].get('ExitCode')})"
    restarts = int(container.attrs.get("RestartCount", 0))
    if restarts > 0:
        return f"the canary container crashed and was restarted {restarts} time(s)"
    return None


def rollout(
    image: ImageRef, app: str, environment: str, commit: str, creds: DeployCredentials, *,
    policy: CanaryPolicy, router: Router, provider: MetricsProvider, record: Record,
    on_inconclusive: Callable[[Verdict], tuple[Literal["promote", "rollback"], str]],
    approved_by: str = "", synthetic_load: bool = False, health_timeout: float = 60.0,
) -> tuple[Deployment, CanaryReport | None]:
    """Deploy ``image`` behind the router, as a canary when a version already serves.

    Returns:
        The deployment (``url`` is the router's front door) and the canary report (None for a
        first deploy, which has nothing to compare with).

    Raises:
        CanaryFailed: the canary was rolled back; stable serves everything again.
    """
    plan = port_plan(app, environment)
    front = f"http://{creds.public_host}:{plan.front}/"
    client = creds.docker_client()
    try:
        live, candidate, port = start_in_free_slot(
            client, image, app, environment, commit, creds, approved_by, health_timeout)
        if live is None:
            router.ensure_route(app, environment, listen_port=plan.front, stable_port=port,
                                health_path=HEALTH_PATH)
            record("canary.skipped", reason="first deploy: no stable version to compare with")
            return _deployment(image, app, environment, candidate, front, None, commit), None
        router.ensure_route(app, environment, listen_port=plan.front,
                            stable_port=plan.slot_port(live.slot), health_path=HEALTH_PATH)
        router.point_server(app, environment, ServerRole.CANARY, port)
        report, verdict = _analyse(client, candidate.id, app, environment, policy, router,
                                   provider, record, front, synthetic_load)
        decided_by = "analysis"
        if report.phase is AnalysisPhase.INCONCLUSIVE:
            # Stable takes all traffic while a person decides.
            router.set_canary_weight(app, environment, 0)
            choice, decided_by = on_inconclusive(verdict)
            report = report.model_copy(update={"decided_by": decided_by,
                                               "phase": AnalysisPhase.SUCCESSFUL if choice == "promote"
                                               else AnalysisPhase.FAILED})
        if report.phase is AnalysisPhase.SUCCESSFUL:
            # Shift everything to the canary, then make it the stable server, then retire the
            # old version: at no moment does traffic go to a container that is stopping.
            router.set_canary_weight(app, environment, 100)
            router.point_server(app, environment, ServerRole.STABLE, port)
            router.disable_canary(app, environment)
            time.sleep(1.0)  # let requests in flight on the old version finish
            retire_others(client, app, environment, keep=str(candidate.id))
            record("canary.promoted", steps=list(report.steps), decided_by=decided_by)
            return _deployment(image, app, environment, candidate, front, live.digest, commit), report
        started = time.monotonic()
        router.disable_canary(app, environment)
        seconds = report.seconds_to_stable
        if seconds is not None:
            seconds += time.monotonic() - started
        candidate.remove(force=True)
        report = report.model_copy(update={"seconds_to_stable": seconds})
        record("canary.rolled-back", reason=report.reason, steps=list(report.steps),
               seconds_to_stable=seconds, decided_by=decided_by)
        raise CanaryFailed(
            f"canary of {app} {image.digest[:19]} in {environment} rolled back: {report.reason}",
            hint=f"{live.digest[:19]} keeps serving at {front}",
        )
    finally:
        client.close()


def _analyse(
    client: docker.DockerClient, container_id: str, app: str, environment: str,
    policy: CanaryPolicy, router: Router, provider: MetricsProvider, record: Record,
    front: str, synthetic_load: bool,
) -> tuple[CanaryReport, Verdict]:
    target = CanaryTarget(backend=f"{app}.{environment}")
    measurements: list[Measurement] = []
    loads: list[LoadResult] = []
    verdict = decide(policy, measurements)
    window_start = time.monotonic()
    while not verdict.phase.terminal:
        assert verdict.next_step is not None and verdict.next_weight is not None
        router.set_canary_weight(app, environment, verdict.next_weight)
        seconds = policy.steps[verdict.next_step].window_seconds
        # The window opens just after the weight change so it holds no request routed under
        # the previous weight.
        start = datetime.now(UTC) + timedelta(seconds=0.5)
        window_start = time.monotonic() + 0.5
        load = _Load(front.rstrip("/") + LOAD_PATH, seconds + 0.5) if synthetic_load else None
        crashed = None
        while datetime.now(UTC) < start + timedelta(seconds=seconds):
            crashed = _container_exit(client, container_id)
            if crashed:
                break
            time.sleep(0.25)
        if load is not None and (result := load.wait()) is not None:
            loads.append(result)
        if crashed:
            record("canary.crashed", reason=crashed)
            return CanaryReport(phase=AnalysisPhase.FAILED, reason=crashed,
                                steps=tuple(a.summary() for a in verdict.assessments),
                                seconds_to_stable=time.monotonic() - window_start,
                                load=tuple(loads)), verdict
        window = Window(start=start, end=start + timedelta(seconds=seconds))
        try:
            measurements.append(measure(provider, target, step=verdict.next_step,
                                        weight=verdict.next_weight, window=window))
        except TransientError as exc:
            measurements.append(Measurement(step=verdict.next_step, weight=verdict.next_weight,
                                            window=window, error=str(exc)))
        verdict = decide(policy, measurements)
        record("canary.step", weight=measurements[-1].weight, phase=verdict.phase.value,
               summary=verdict.assessments[-1].summary() if verdict.assessments else "")
    failing = verdict.phase in (AnalysisPhase.FAILED, AnalysisPhase.ERROR)
    return CanaryReport(
        phase=verdict.phase, reason=verdict.reason,
        steps=tuple(a.summary() for a in verdict.assessments),
        seconds_to_stable=(time.monotonic() - window_start) if failing else None,
        load=tuple(loads),
    ), verdict


def _deployment(image: ImageRef, app: str, environment: str, container: object, url: str,
                previous: str | None, commit: str) -> Deployment:
    return Deployment(
        app=app, environment=environment, image=image, container_id=str(container.id),  # type: ignore[attr-defined]
        container_name=str(container.name), url=url, previous_digest=previous,  # type: ignore[attr-defined]
        commit=commit, deployed_at=datetime.now(UTC),
    )


def switch_to(
    image: ImageRef, app: str, environment: str, commit: str, creds: DeployCredentials, *,
    router: Router | None, record: Record, approved_by: str = "", health_timeout: float = 60.0,
) -> Deployment:
    """Replace the serving version with ``image`` at once (no canary): the rollback path.

    The new container starts in the free slot and must be healthy before the router moves
    stable to it; the old container is retired after requests in flight on it have finished,
    so the switch itself fails no request.
    """
    plan = port_plan(app, environment)
    client = creds.docker_client()
    try:
        live, candidate, port = start_in_free_slot(
            client, image, app, environment, commit, creds, approved_by, health_timeout)
        if router is not None:
            router.ensure_route(app, environment, listen_port=plan.front,
                                stable_port=plan.slot_port(live.slot) if live else port,
                                health_path=HEALTH_PATH)
            router.disable_canary(app, environment)
            router.point_server(app, environment, ServerRole.STABLE, port)
            url = f"http://{creds.public_host}:{plan.front}/"
        else:
            url = f"http://{creds.public_host}:{port}/"
        time.sleep(1.0)  # let requests in flight on the old version finish
        retire_others(client, app, environment, keep=str(candidate.id))
        record("deploy.switched", to=image.digest, previous=live.digest if live else None)
        return _deployment(image, app, environment, candidate, url,
                           live.digest if live else None, commit)
    finally:
        client.close()
