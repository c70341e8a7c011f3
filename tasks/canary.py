"""Canary rollout on a Docker host behind its traffic router (:class:`~portcullis.targets.TrafficRouter`).

The new version starts in the free slot and proves itself healthy; then it receives a growing
share of real traffic, step by step, while the analysis compares it with the stable version
over the same windows. Successful: all traffic moves to it and the old version is retired.
Failed or Error (or the canary container dies): traffic goes back to stable at once and the
canary is removed. Inconclusive: a person decides through ``on_inconclusive`` (the approval ledger's rules:
tasks/approval.py ``decide_inconclusive_canary``). A run that waits without a process
(:func:`rollout_with_person`) removes the canary first and, if the person promotes, switches to
the new version when it resumes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal, cast

import docker
import docker.errors
from docker.models.containers import Container
from prefect.runtime import flow_run
from pydantic import JsonValue

from blocks.credentials import DeployCredentials
from portcullis.canary.analysis import (
    AnalysisPhase,
    CanaryPolicy,
    Measurement,
    Verdict,
    Window,
    decide,
)
from portcullis.canary.metrics import CanaryTarget, MetricsProvider, measure
from portcullis.catalog import probe_paths
from portcullis.environments import port_plan
from portcullis.errors import PolicyRefusal, TransientError
from portcullis.lease import (
    LeaseKeeper,
    TrafficLease,
    holder_identity,
    lease_expiry,
    traffic_leases,
    traffic_subject,
)
from portcullis.models import Deployment, ImageRef
from portcullis.results import CanaryReport
from portcullis.targets import TrafficRouter
from tasks.deploy import find_live, retire_others, start_in_free_slot
from tasks.gates import RunAudit

Record = Callable[..., None]


class CanaryFailed(PolicyRefusal):
    """The canary was rolled back; the stable version serves all traffic."""


class CanaryAwaitsDecision(Exception):
    """Raised by an ``on_inconclusive`` that asks its person without holding the process.

    :func:`rollout` then returns all traffic to stable, removes the canary and re-raises it
    with its report and the digest that stayed stable, for the run to record before it waits.
    """

    def __init__(self, analysis: str, report: CanaryReport | None = None,
                 stable_digest: str | None = None) -> None:
        super().__init__(analysis)
        self.analysis = analysis
        self.report = report
        self.stable_digest = stable_digest


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


def traffic_lease_seconds(policy: CanaryPolicy) -> float:
    """How long a canary keeps its traffic without a renewal: one (the longest) window.

    A run that dies is noticed one lease later, so stable has everything back within two
    windows (lease + the watcher's sweep), and no step ever changes weights on a lease the
    watcher could already have acted on.
    """
    return max(step.window_seconds for step in policy.steps)


def rollout(
    image: ImageRef, app: str, environment: str, commit: str, creds: DeployCredentials, *,
    policy: CanaryPolicy, router: TrafficRouter, provider: MetricsProvider, record: Record,
    on_inconclusive: Callable[[Verdict], tuple[Literal["promote", "rollback"], str]],
    approved_by: tuple[str, ...] = (), health_timeout: float = 60.0,
) -> tuple[Deployment, CanaryReport | None]:
    """Deploy ``image`` behind the router, as a canary when a version already serves.

    While the canary holds traffic this run holds a lease on it (renewed from a thread); if the
    run dies, the canary watcher returns the traffic to stable when the lease expires. Any
    exception in here (``KeyboardInterrupt``, ``SystemExit`` and Prefect's cancellation
    included) first returns the traffic to stable and removes the canary, then propagates.

    Returns:
        The deployment (``url`` is the router's front door) and the canary report (None for a
        first deploy, which has nothing to compare with).

    Raises:
        CanaryFailed: the canary was rolled back; stable serves everything again.
        LeaseLost: this run stalled past its lease and the watcher took the canary back.
    """
    plan = port_plan(app, environment)
    front = f"http://{creds.public_host}:{plan.front}/"
    health_path = probe_paths(app).health
    client = creds.docker_client()
    try:
        live, candidate, port = start_in_free_slot(
            client, image, app, environment, commit, creds, approved_by, health_timeout)
        if live is None:
            router.ensure_route(app, environment, listen_port=plan.front, stable_port=port,
                                health_path=health_path)
            record("canary.skipped", reason="first deploy: no stable version to compare with")
            return _deployment(image, app, environment, candidate, front, None, commit), None
        keeper = _hold_traffic(router, app, environment, str(candidate.id), port, policy)
        try:
            router.ensure_route(app, environment, listen_port=plan.front,
                                stable_port=plan.slot_port(live.slot), health_path=health_path)
            with keeper.acting():
                router.point_canary(app, environment, port)
            report, verdict = _analyse(client, candidate.id, app, environment, policy, router,
                                       provider, record, keeper)
            decided_by = "analysis"
            if report.phase is AnalysisPhase.INCONCLUSIVE:
                # Stable takes all traffic while a person decides.
                with keeper.acting():
                    router.set_canary_weight(app, environment, 0)
                choice, decided_by = on_inconclusive(verdict)
                report = report.model_copy(update={
                    "decided_by": decided_by,
                    "phase": AnalysisPhase.SUCCESSFUL if choice == "promote" else AnalysisPhase.FAILED})
            if report.phase is AnalysisPhase.SUCCESSFUL:
                # Shift everything to the canary, then make it the stable server, then retire
                # the old version: at no moment does traffic go to a container that is stopping.
                with keeper.acting():
                    router.set_canary_weight(app, environment, 100)
                    router.point_stable(app, environment, port)
                    router.disable_canary(app, environment)
        except CanaryAwaitsDecision as waiting:
            # Nobody watches a canary while its run waits without a process: stable serves
            # everything and the canary goes; a "promote" switches to the new version later.
            _roll_back(router, candidate, keeper, record, app, environment,
                       "Inconclusive: stable serves all traffic while a person decides", report,
                       decided_by="pending")
            raise CanaryAwaitsDecision(waiting.analysis, report, live.digest) from None
        except BaseException as exc:
            # Whatever stopped the analysis, the canary must not keep its traffic.
            reason = f"{type(exc).__name__} during the canary: {exc}"
            _roll_back(router, candidate, keeper, record, app, environment, reason, None,
                       decided_by="error")
            raise
        if report.phase is AnalysisPhase.SUCCESSFUL:
            # From here the new version is stable: nothing below may roll it back.
            keeper.stop()
            time.sleep(1.0)  # let requests in flight on the old version finish
            retire_others(client, app, environment, keep=str(candidate.id))
            record("canary.promoted", steps=list(report.steps), decided_by=decided_by)
            return _deployment(image, app, environment, candidate, front, live.digest, commit), report
        seconds = _roll_back(router, candidate, keeper, record, app, environment, report.reason,
                             report, decided_by=decided_by)
        raise CanaryFailed(
            f"canary of {app} {image.digest[:19]} in {environment} rolled back: {report.reason}",
            hint=f"{live.digest[:19]} keeps serving at {front}"
            + (f" (stable again {seconds:.2f}s after the verdict)" if seconds is not None else ""),
        )
    finally:
        client.close()


Decide = Callable[[str], tuple[Literal["promote", "rollback"], str]]


def rollout_with_person(
    image: ImageRef, app: str, environment: str, commit: str, creds: DeployCredentials, *,
    policy: CanaryPolicy, router: TrafficRouter, provider: MetricsProvider, audit: RunAudit,
    record: Record, ask: Decide, durable: bool, approved_by: tuple[str, ...] = (),
) -> tuple[Deployment, CanaryReport | None]:
    """:func:`rollout`, with a person deciding an Inconclusive canary through ``ask``.

    ``durable`` (the run waits for people without a process; see tasks/approval.py): the
    canary is removed before the person is asked, and ``canary.inconclusive`` carries the
    analysis across the wait. The resumed run analyses nothing again: it asks (the answer is
    usually there already) and on "promote" switches to the new version at once, provided
    what serves is still the version the canary was compared with. Not ``durable``: the
    person is asked while the canary is held at no traffic, as :func:`rollout` does.

    Raises:
        CanaryFailed: the canary failed, or the person (or nobody, in time) rolled it back.
        PolicyRefusal: what serves changed while the person decided.
    """
    earlier = audit.earlier("canary.inconclusive")
    if earlier is None:
        def person(verdict: Verdict) -> tuple[Literal["promote", "rollback"], str]:
            analysis = "\n".join([verdict.reason, *(a.summary() for a in verdict.assessments)])
            if durable:
                raise CanaryAwaitsDecision(analysis)
            return ask(analysis)

        try:
            return rollout(image, app, environment, commit, creds, policy=policy, router=router,
                           provider=provider, record=record, on_inconclusive=person,
                           approved_by=approved_by)
        except CanaryAwaitsDecision as waiting:
            assert waiting.report is not None
            report, analysis, stable = waiting.report, waiting.analysis, waiting.stable_digest
            audit.record("canary.inconclusive", report=cast(JsonValue, report.model_dump(mode="json")),
                         analysis=analysis, stable_digest=stable)
    else:
        report = CanaryReport.model_validate(earlier.details["report"])
        analysis = str(earlier.details.get("analysis", ""))
        stable = cast(str | None, earlier.details.get("stable_digest"))
    choice, who = ask(analysis)
    if choice == "rollback":
        raise CanaryFailed(
            f"canary of {app} {image.digest[:19]} in {environment} was Inconclusive and "
            + ("nobody decided in time" if who == "timeout" else f"{who} rolled it back"),
            hint=f"{(stable or '?')[:19]} keeps serving")
    client = creds.docker_client()
    try:
        live = find_live(client, app, environment)
    finally:
        client.close()
    if (live.digest if live else None) != stable:
        raise PolicyRefusal(
            f"{app} in {environment} changed while {who} decided on the Inconclusive canary of "
            f"{image.digest[:19]}: {live.digest[:19] if live else 'nothing'} serves, the canary "
            f"was compared with {(stable or 'nothing')[:19]}",
            hint="start a new promotion: its canary compares with what serves now")
    deployment = switch_to(image, app, environment, commit, creds, router=router, record=record,
                           approved_by=approved_by)
    record("canary.promoted", steps=list(report.steps), decided_by=who)
    return deployment, report.model_copy(update={"phase": AnalysisPhase.SUCCESSFUL,
                                                 "decided_by": who})


def _hold_traffic(router: TrafficRouter, app: str, environment: str, container_id: str, port: int,
                  policy: CanaryPolicy) -> LeaseKeeper[TrafficLease]:
    ttl = traffic_lease_seconds(policy)
    lease = TrafficLease(
        subject=traffic_subject(app, environment), holder=holder_identity(_run_id()),
        pid=os.getpid(), host=socket.gethostname(), ttl_seconds=ttl,
        expires_at=lease_expiry(ttl), app=app, environment=environment,
        canary_container=container_id, canary_port=port)
    return LeaseKeeper(traffic_leases(router.state_dir), lease).start()


def _run_id() -> str | None:
    run = flow_run.get_id()
    return str(run) if run else None


def _stable_again(router: TrafficRouter, app: str, environment: str) -> None:
    """All traffic to stable, read back from HAProxy: the canary's weight is 0."""
    router.disable_canary(app, environment)
    for _ in range(10):
        if router.canary_weight(app, environment) == 0:
            return
        router.disable_canary(app, environment)
    raise TransientError(f"the router keeps a non-zero weight on the canary of {app} in {environment}",
                         hint="the canary watcher returns it to stable when the lease expires")


def _roll_back(
    router: TrafficRouter, candidate: Container, keeper: LeaseKeeper[TrafficLease], record: Record,
    app: str, environment: str, reason: str, report: CanaryReport | None, *, decided_by: str,
) -> float | None:
    """Stable gets everything back, the canary goes, the reason is recorded; each step is tried
    even if an earlier one failed, and the lease is released last."""
    started = time.monotonic()
    problems: list[str] = []
    if keeper.lost.is_set():
        # The watcher took the canary back already, and the route may hold a newer run's
        # canary by now: a run that lost its lease never touches the router again.
        problems.append("lease lost: the canary watcher returned the traffic to stable")
    else:
        try:
            _stable_again(router, app, environment)
        except Exception as exc:  # noqa: BLE001 - the watcher finishes it when the lease expires
            problems.append(f"router: {exc}")
    back = time.monotonic()
    try:
        time.sleep(0.5)  # requests in flight on the canary finish before it stops
        candidate.remove(force=True)
    except docker.errors.NotFound:
        pass
    except Exception as exc:  # noqa: BLE001 - recorded; the watcher removes it on lease expiry
        problems.append(f"container: {exc}")
    # On a problem the lease is left to expire, so that the watcher completes the rollback.
    keeper.stop(release=not problems)
    verdict_to_stable = None
    if report is not None and report.verdict_at is not None:
        verdict_to_stable = back - report.verdict_at
    record("canary.rolled-back", reason=reason, decided_by=decided_by,
           steps=list(report.steps) if report else [],
           seconds_to_stable=(report.seconds_to_stable + back - started)
           if report and report.seconds_to_stable is not None else None,
           verdict_to_stable_seconds=verdict_to_stable, problems=problems)
    return verdict_to_stable


def _analyse(
    client: docker.DockerClient, container_id: str, app: str, environment: str,
    policy: CanaryPolicy, router: TrafficRouter, provider: MetricsProvider, record: Record,
    keeper: LeaseKeeper[TrafficLease],
) -> tuple[CanaryReport, Verdict]:
    target = CanaryTarget(backend=f"{app}.{environment}")
    measurements: list[Measurement] = []
    verdict = decide(policy, measurements)
    window_start = time.monotonic()
    verdict_at: float | None = None
    while not verdict.phase.terminal:
        assert verdict.next_step is not None and verdict.next_weight is not None
        with keeper.acting():
            router.set_canary_weight(app, environment, verdict.next_weight)
        seconds = policy.steps[verdict.next_step].window_seconds
        # The window opens just after the weight change so it holds no request routed under
        # the previous weight.
        start = datetime.now(UTC) + timedelta(seconds=0.5)
        window_start = time.monotonic() + 0.5
        crashed = None
        while datetime.now(UTC) < start + timedelta(seconds=seconds):
            crashed = _container_exit(client, container_id)
            if crashed or keeper.lost.is_set():
                break
            time.sleep(0.25)
        keeper.ensure_held()
        if crashed:
            # Stable first, then the paperwork: every moment counts for the users.
            verdict_at = time.monotonic()
            _stable_again(router, app, environment)
            record("canary.crashed", reason=crashed)
            return CanaryReport(phase=AnalysisPhase.FAILED, reason=crashed,
                                steps=tuple(a.summary() for a in verdict.assessments),
                                seconds_to_stable=time.monotonic() - window_start,
                                verdict_at=verdict_at), verdict
        window = Window(start=start, end=start + timedelta(seconds=seconds))
        try:
            measurements.append(measure(provider, target, step=verdict.next_step,
                                        weight=verdict.next_weight, window=window))
        except TransientError as exc:
            measurements.append(Measurement(step=verdict.next_step, weight=verdict.next_weight,
                                            window=window, error=str(exc)))
        verdict = decide(policy, measurements)
        verdict_at = time.monotonic()
        if verdict.phase in (AnalysisPhase.FAILED, AnalysisPhase.ERROR):
            _stable_again(router, app, environment)
        record("canary.step", weight=measurements[-1].weight, phase=verdict.phase.value,
               summary=verdict.assessments[-1].summary() if verdict.assessments else "")
    failing = verdict.phase in (AnalysisPhase.FAILED, AnalysisPhase.ERROR)
    return CanaryReport(
        phase=verdict.phase, reason=verdict.reason,
        steps=tuple(a.summary() for a in verdict.assessments),
        seconds_to_stable=(time.monotonic() - window_start) if failing else None,
        verdict_at=verdict_at if failing else None,
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
    router: TrafficRouter | None, record: Record, approved_by: tuple[str, ...] = (),
    health_timeout: float = 60.0,
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
                                health_path=probe_paths(app).health)
            router.disable_canary(app, environment)
            router.point_stable(app, environment, port)
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
