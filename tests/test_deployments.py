"""The deployments in ``deployments.yaml`` on the production-like stack, end to end.

Given PostgreSQL, a Prefect server on it and one process worker per pool (``infra.production``),
the test registry and engine, an approvers file, a loopback ServiceNow instance and a prod
freeze window that is active now, when ``prefect deploy --all`` registers the deployments and
runs are triggered through the API or by a schedule, then:

* promote-dev runs on the deploy pool, hands the build to build-release on the build pool,
  receives its evidence through the shared result store and deploys an app that answers;
* a schedule on the staging deployment creates a run that promotes the newest digest that
  passed dev, after one approval given through the API;
* staging refuses a digest that never passed dev;
* emergency-promote goes through the prod freeze with a valid P1 ticket and one on-call
  approval, records the bypass with the ticket and opens a post-incident review; a closed,
  P3, unknown or mismatched ticket is refused with the reason;
* a deployment moved to the other side's pool is refused by that pool's worker;
* two deploy workers standing for two hosts (separate state folders and homes, one server,
  one PostgreSQL, one registry) share one truth: dev promoted on host A is seen by staging on
  host B, promotions started on both serialise on the environment lock, a code used on A is
  refused on B, and a pin a rollback on A set holds for a scheduled run on B.

The stack and the deployments are the session's (``production_stack``,
tests/support/shared_production.py), shared with other modules: this one's records are told
apart by its app's name and its runs' ids. The dev promotion is shared by the module (one build).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import SCHEDULE_TYPES, IntervalSchedule

from infra.daemon import stop_daemon
from infra.production import POOLS, ProductionConfig, host_queue, state_urls, up
from portcullis.audit import AuditLog, AuditRecord, AuditTrail
from portcullis.sides import Side
from portcullis.state import State, open_state_url
from tasks.deploy import LABEL_APP
from tasks.gates import (
    PREFECT_MIN_LEASE_SECONDS,
    RunAudit,
    ensure_environment_lock,
    environment_lock,
    lock_name,
)
from tests.support.approval_driver import Resumer
from tests.support.codes import Codes
from tests.support.names import unique_app_name
from tests.support.production import FINAL, secrets_found, wait_final
from tests.support.promotion_setup import init_app_repo
from tests.support.servicenow import TableApi, incident_row
from tests.support.shared_production import HOST_B, SECRETS, SharedProduction

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow,
              pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[1]
TICKETS = {"open-p1": "INC0020001", "closed": "INC0020002", "p3": "INC0020003",
           "other-app": "INC0020004", "unknown": "INC0029999"}
# Tickets for the attacks on the emergency path (each valid when the run starts).
ATTACK_TICKETS = {"future": "INC0030001", "closes-mid-wait": "INC0030002", "alone": "INC0030003"}
# Who starts each emergency case: a code is burned once used, so each person starts one run.
REQUESTERS = {"open-p1": "trent", "closed": "erin", "p3": "frank", "other-app": "gina",
              "unknown": "hank"}
#: An unused code of a person's for each call (codes are burned once used).
code = Codes(SECRETS)


def form(name: str, digest: str) -> dict[str, Any]:
    """An approval as the run's form takes it, with an unused code of the approver's."""
    return {"approver": name, "code": code(name),
            "digest_prefix": digest[7:19], "decision": "approve", "comment": "looks good"}


@dataclass
class Stack:
    """The running production-like stack and what the tests share."""

    config: ProductionConfig
    home: Path
    app: str
    app_repo: Path
    incidents: TableApi
    auth: str
    #: Every secret the setup holds, by name: no log may carry one.
    secrets: dict[str, str]
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def state(self) -> State:
        """The state store the deploy worker uses (as its role)."""
        return open_state_url(state_urls(self.config)[0])

    @property
    def audit(self) -> AuditTrail:
        """The audit trail both workers append to."""
        return self.state.audit_log()

    def records(self, event: str, environment: str | None = None) -> list[AuditRecord]:
        """This app's audit records of one kind (in one environment)."""
        return [r for r in self.audit.records() if r.app == self.app and r.event == event
                and (environment is None or r.environment == environment)]

    def worker_log(self, host: str | None = None, side: Side = "deploy") -> str:
        """A worker's whole log (``host``: a further deploy host of the stack)."""
        path = self.config.host_dir(host) / f"worker-{side}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_logs(self) -> str:
        """The tail of every worker's log, for failure messages."""
        return "\n".join(
            [f"--- {side} worker ---\n" + self.worker_log(side=side)[-3000:] for side in POOLS]
            + [f"--- deploy worker on host {h} ---\n" + self.worker_log(h)[-3000:]
               for h in self.config.deploy_hosts])


@pytest.fixture(scope="module")
def stack(production_stack: SharedProduction, docker_client: Any) -> Iterator[Stack]:
    """The session's production-like stack, with this module's app, repository and incidents."""
    shared = production_stack
    # mkdtemp under /tmp: the workers read the app repository.
    scratch = Path(tempfile.mkdtemp(prefix="portcullis-deployments-"))
    app, app_repo = unique_app_name(), scratch / "app"
    init_app_repo(app_repo)
    now = datetime.now(UTC)
    rows = [
        incident_row(TICKETS["open-p1"], state="2", priority="1", ci=app, opened=now),
        incident_row(TICKETS["closed"], state="7", priority="1", ci=app, opened=now),
        incident_row(TICKETS["p3"], state="1", priority="3", ci=app, opened=now),
        incident_row(TICKETS["other-app"], state="2", priority="1", ci="billing",
                     service="Billing", opened=now),
        incident_row(ATTACK_TICKETS["future"], state="2", priority="1", ci=app,
                     opened=now + timedelta(days=1)),
        incident_row(ATTACK_TICKETS["closes-mid-wait"], state="2", priority="1", ci=app, opened=now),
        incident_row(ATTACK_TICKETS["alone"], state="2", priority="1", ci=app, opened=now),
    ]
    shared.incidents.rows.extend(rows)
    try:
        # The tests bring stopped daemons back with `up`, which rewrites a restarted worker's
        # file from this environment; the Resumer's thread reads the process-wide settings.
        with shared.stack_environment(), shared.client_settings():
            _check_shipped_schedules()
            yield Stack(shared.config, shared.home, app, app_repo, shared.incidents, shared.auth,
                        shared.secrets)
    finally:
        for row in rows:
            shared.incidents.rows.remove(row)
        for container in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_APP}={app}"}):
            container.remove(force=True)
        shutil.rmtree(scratch, ignore_errors=True)
        shared.restore()


def _check_shipped_schedules() -> None:
    """What deployments.yaml says arrived on the server."""
    with get_client(sync_client=True) as client:
        staging = client.read_deployment_by_name("promote-staging/staging")
        assert [s.schedule.model_dump().get("cron") for s in staging.schedules] == ["0 22 * * 1-5"]


def _trigger(client: SyncPrefectClient, deployment: str, name: str, *, host: str | None = None,
             **parameters: Any) -> FlowRun:
    """A run of ``deployment``; on deploy host ``host`` (None: the default queue, host A)."""
    found = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(
        found.id, parameters=parameters, name=name,
        work_queue_name=host_queue(host) if host is not None else None)


def _runs_of(client: SyncPrefectClient, deployment_id: UUID, app: str) -> list[FlowRun]:
    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
        id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters.get("app") == app]


def _seconds(later: datetime | None, earlier: datetime | None) -> float:
    assert later is not None and earlier is not None
    return (later - earlier).total_seconds()


def _poll(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)
    return found


@dataclass(frozen=True)
class DevPromotion:
    """The module's one dev promotion, as the API and the audit log recorded it."""

    run: FlowRun
    build: FlowRun
    image: str
    digest: str
    url: str


@pytest.fixture(scope="module")
def dev(stack: Stack) -> DevPromotion:
    """promote-dev triggered through the API, waited for, measured."""
    with get_client(sync_client=True) as client:
        created = _trigger(client, "promote-dev/dev", f"{stack.app}-dev", app=stack.app,
                           source_repo=str(stack.app_repo), commit="HEAD", ref="main",
                           context_path=".", requested_by="trent")
        run = wait_final(client, created.id)
        assert run.state_name == "Completed", f"{run.state.message if run.state else ''}\n{stack.worker_logs()}"
        (build,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
        runs = [run.id, build.id]

        def started_tasks() -> list[Any]:
            # Task runs are recorded from events, a moment after they happen. The task run
            # that only tracks the build subflow for the parent is not work on a worker.
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs)))
            return [t for t in tasks if t.start_time is not None and t.id != build.parent_task_run_id]

        tasks = _poll(started_tasks, 30, "no task run of the dev promotion was recorded")
    first = min(tasks, key=lambda t: t.start_time)
    stack.figures.update({
        "trigger_to_flow_running": _seconds(run.start_time, run.created),
        "trigger_to_first_task": _seconds(first.start_time, run.created),
        "build_run_created_to_running": _seconds(build.start_time, build.created),
        "dev_total": _seconds(run.end_time, run.created),
    })
    print(f"\npromote-dev: trigger -> running on the deploy worker "
          f"{stack.figures['trigger_to_flow_running']:.1f}s; build-release created at "
          f"{_seconds(build.created, run.created):.1f}s, running on the build worker "
          f"{stack.figures['build_run_created_to_running']:.1f}s later; trigger -> first task "
          f"({first.name}) {stack.figures['trigger_to_first_task']:.1f}s; promotion done "
          f"{stack.figures['dev_total']:.1f}s")
    (completed,) = stack.records("promotion.completed", "dev")
    return DevPromotion(run=run, build=build, image=str(completed.details["image"]),
                        digest=str(completed.digest), url=str(completed.details["url"]))


def test_promote_dev_builds_on_the_build_pool_and_deploys_on_the_deploy_pool(
    stack: Stack, dev: DevPromotion,
) -> None:
    assert dev.run.work_pool_name == POOLS["deploy"]
    assert dev.build.work_pool_name == POOLS["build"]
    assert dev.build.state_name == "Completed"
    # The build side wrote the build; the deploy side received it through the result store.
    (built,) = stack.records("build.completed")
    assert built.run_id == str(dev.build.id) and built.digest == dev.digest
    (received,) = stack.records("build.received")
    assert received.run_id == str(dev.run.id) and dev.digest in str(received.details["image"])
    assert httpx.get(dev.url, timeout=5).status_code == 200
    # A sanity bound, loose for a loaded 2-core machine: two worker pick-ups and two Python
    # process starts normally take 15-25 s; a minute means a pick-up went wrong.
    assert stack.figures["trigger_to_first_task"] < 60


def test_a_schedule_promotes_the_newest_digest_that_passed_dev(
    stack: Stack, dev: DevPromotion,
) -> None:
    with get_client(sync_client=True) as client:
        staging = client.read_deployment_by_name("promote-staging/staging")
        fire_at = datetime.now(UTC) + timedelta(seconds=6)
        # Hourly from a few seconds ahead: exactly one run falls into the test.
        hourly: list[tuple[SCHEDULE_TYPES, bool]] = [
            (IntervalSchedule(interval=timedelta(hours=1), anchor_date=fire_at), True)]
        (schedule,) = client.create_deployment_schedules(staging.id, hourly,
                                                         parameters={"app": stack.app})
        created_at = datetime.now(UTC)
        try:
            def fired() -> list[FlowRun]:
                return [r for r in _runs_of(client, staging.id, stack.app)
                        if r.state_name not in ("Scheduled", None)]

            (run,) = _poll(fired, 60, "the schedule did not start a staging run")
        finally:
            client.delete_deployment_schedule(staging.id, schedule.id)
        resumer = Resumer(run.name)
        thread = resumer.play([lambda: form("carol", dev.digest)])
        run = wait_final(client, run.id)
        thread.join(30)
        assert resumer.error is None, resumer.error
        assert run.state_name == "Completed", f"{run.state.message if run.state else ''}\n{stack.worker_logs()}"
        assert run.auto_scheduled and run.work_pool_name == POOLS["deploy"]
        left = [r for r in _runs_of(client, staging.id, stack.app) if r.state_name == "Scheduled"]
        assert left == []  # removing the schedule removed its future runs
    assert _seconds(run.expected_start_time, fire_at) == pytest.approx(0, abs=0.01)
    stack.figures["schedule_created_to_run"] = _seconds(run.created, created_at)
    stack.figures["scheduled_time_to_running"] = _seconds(run.start_time, fire_at)
    print(f"\nschedule: the scheduler created the run {stack.figures['schedule_created_to_run']:.1f}s "
          f"after the schedule was added; running on the deploy worker "
          f"{stack.figures['scheduled_time_to_running']:.1f}s after its scheduled time")
    (completed,) = stack.records("promotion.completed", "staging")
    assert completed.digest == dev.digest and completed.run_id == str(run.id)
    assert [r.actor for r in stack.records("approval.accepted", "staging")] == ["carol"]
    assert httpx.get(str(completed.details["url"]), timeout=5).status_code == 200


def test_staging_refuses_a_digest_that_never_passed_dev(stack: Stack) -> None:
    ghost = "127.0.0.1:1/portcullis/ghost@sha256:" + "ab" * 32
    with get_client(sync_client=True) as client:
        created = _trigger(client, "promote-staging/staging", f"{stack.app}-ghost",
                           app="ghost", image=ghost, requested_by="alice",
                           requester_code=code("alice"))
        run = wait_final(client, created.id)
    assert run.state_name == "Failed"
    assert run.state is not None and "never passed dev" in str(run.state.message)


def test_emergency_goes_through_the_freeze_with_a_valid_ticket_only(
    stack: Stack, dev: DevPromotion,
) -> None:
    with get_client(sync_client=True) as client:
        runs = {
            case: _trigger(client, "emergency-promote/emergency", f"{stack.app}-em-{case}",
                           app=stack.app, image=dev.image, incident_ticket=ticket,
                           justification="checkout returns 502", requested_by=REQUESTERS[case],
                           requester_code=code(REQUESTERS[case]))
            for case, ticket in TICKETS.items()
        }
        resumer = Resumer(f"{stack.app}-em-open-p1")
        thread = resumer.play([lambda: form("dave", dev.digest)])
        done = {case: wait_final(client, run.id) for case, run in runs.items()}
        thread.join(30)
    good = done.pop("open-p1")
    assert good.state_name == "Completed", f"{good.state.message if good.state else ''}\n{stack.worker_logs()}"
    assert resumer.error is None, resumer.error
    reasons = {
        "closed": "it is Closed (closed)",
        "p3": "it is P3 (3 - Moderate); the emergency path is for P1 and P2",
        "other-app": f"it names 'billing', 'Billing', not '{stack.app}'",
        "unknown": f"ticket {TICKETS['unknown']} does not exist",
    }
    for case, run in done.items():
        assert run.state_name == "Failed", case
        assert run.state is not None and reasons[case] in str(run.state.message), (case, run.state)

    ticket = TICKETS["open-p1"]
    bypassed = [r for r in stack.records("freeze.bypassed", "prod") if r.run_id == str(good.id)]
    assert bypassed and all(r.details["ticket"] == ticket and r.details["frozen"] for r in bypassed)
    assert "launch-week" in str(bypassed[0].details["summary"])
    (completed,) = stack.records("promotion.completed", "prod")
    assert completed.details["ticket"] == ticket and completed.details["approved_by"] == ["dave"]
    (review,) = stack.state.reviews.for_ticket(ticket)
    assert review.app == stack.app and review.digest == dev.digest
    assert review.flow_run_id == str(good.id)
    assert review.skipped_environments == ("staging",)
    # A refused ticket opens no review and deploys nothing.
    assert [r.ticket for r in stack.state.reviews.reviews()] == [ticket]

    # The same ticket a second time: one ticket opens one emergency promotion.
    with get_client(sync_client=True) as client:
        again = wait_final(client, _trigger(
            client, "emergency-promote/emergency", f"{stack.app}-em-again", app=stack.app,
            image=dev.image, incident_ticket=ticket, justification="once more",
            requested_by="erin", requester_code=code("erin")).id)
    assert again.state_name == "Failed"
    assert "already served emergency promotion" in str(again.state.message if again.state else "")


def _emergency(client: SyncPrefectClient, stack: Stack, dev: DevPromotion, case: str,
               requester: str) -> FlowRun:
    return _trigger(client, "emergency-promote/emergency", f"{stack.app}-em-{case}", app=stack.app,
                    image=dev.image, incident_ticket=ATTACK_TICKETS[case],
                    justification="attack", requested_by=requester, requester_code=code(requester))


def _deployed_by(stack: Stack, run: FlowRun) -> list[AuditRecord]:
    return [r for r in stack.records("promotion.completed", "prod") if r.run_id == str(run.id)]


def test_emergency_attacks_are_refused_and_recorded(stack: Stack, dev: DevPromotion) -> None:
    with get_client(sync_client=True) as client:
        # A ticket that claims to open tomorrow.
        future = wait_final(client, _emergency(client, stack, dev, "future", "frank").id)
        # One on-call person alone: oscar asks, and oscar's own approval is refused; olga, a
        # second person, is needed. (A code is burned once used: each person acts once here.)
        alone = _emergency(client, stack, dev, "alone", "oscar")
        resumer = Resumer(alone.name)
        thread = resumer.play([lambda: form("oscar", dev.digest), lambda: form("olga", dev.digest)])
        alone = wait_final(client, alone.id)
        thread.join(30)
        assert resumer.error is None, resumer.error
        # The ticket is closed while the approval waits: checked again before traffic moves.
        mid = _emergency(client, stack, dev, "closes-mid-wait", "gina")

        def close_then_approve() -> dict[str, Any]:
            row = next(r for r in stack.incidents.rows
                       if r["number"][0] == ATTACK_TICKETS["closes-mid-wait"])
            row["state"] = ("7", "Closed", None)
            return form("olga", dev.digest)

        resumer_mid = Resumer(mid.name)
        thread = resumer_mid.play([close_then_approve])
        mid = wait_final(client, mid.id)
        thread.join(30)
        assert resumer_mid.error is None, resumer_mid.error

    assert future.state_name == "Failed"
    assert "in the future" in str(future.state.message if future.state else "")
    assert not _deployed_by(stack, future)

    assert alone.state_name == "Completed", f"{alone.state.message if alone.state else ''}\n{stack.worker_logs()}"
    assert "triggered this promotion and cannot approve it" in resumer.descriptions[1]
    (done,) = _deployed_by(stack, alone)
    assert done.details["approved_by"] == ["olga"]

    assert mid.state_name == "Failed"
    assert "Closed" in str(mid.state.message if mid.state else "")
    assert not _deployed_by(stack, mid)
    # Read again after the wait: the resumed run re-checks its ticket first thing (and again
    # right before traffic), so the closed ticket stops it before the answer is even counted.
    events = [r.event for r in stack.audit.records() if r.run_id == str(mid.id)]
    assert events.index("emergency.ticket-refused") > events.index("promotion.resumed"), events
    assert "approval.accepted" not in events and "promotion.completed" not in events


# --- waiting for people holds no process ------------------------------------------------------


def _suspended(client: SyncPrefectClient, run_id: UUID, timeout: float = 120) -> FlowRun:
    """The run once it waits for input with no process (Suspended, input schema saved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        state = run.state
        if state is not None and state.name == "Suspended" and state.state_details.run_input_keyset:
            try:
                client.read_flow_run_input(run.id, state.state_details.run_input_keyset["schema"])
                return run
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
        if run.state_type is not None and run.state_type.value in FINAL:
            raise AssertionError(f"{run.name} ended {run.state_name}: {state.message if state else ''}")
        time.sleep(0.3)
    raise TimeoutError(f"flow run {run_id} never suspended")


def _no_process(pid: str | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(int(pid.rsplit(":", 1)[-1]), 0)
    except (ProcessLookupError, ValueError):
        return True
    return False


def _answer(client: SyncPrefectClient, run: FlowRun, answer: dict[str, Any]) -> None:
    result = client.resume_flow_run(run.id, run_input=answer)
    assert result.status.value == "ACCEPT", result.details


def _once_per_run(stack: Stack, run: FlowRun) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in stack.audit.records():
        if record.run_id == str(run.id):
            key = record.event + (f":{record.details['stage']}" if "stage" in record.details else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_waiting_promotion_survives_worker_and_server_restarts(
    stack: Stack, dev: DevPromotion,
) -> None:
    with get_client(sync_client=True) as client:
        created = _trigger(client, "promote-staging/staging", f"{stack.app}-durable",
                           app=stack.app, image=dev.image, requested_by="bob",
                           requester_code=code("bob"))
        waiting = _suspended(client, created.id)
        # Nothing runs for it while it waits: its process exits once it has suspended.
        deadline = time.monotonic() + 60
        while not _no_process(waiting.infrastructure_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _no_process(waiting.infrastructure_pid), waiting.infrastructure_pid
        stop_daemon("worker-deploy", state_dir=stack.config.state_dir)
        stop_daemon("prefect-server", state_dir=stack.config.state_dir)
        up(stack.config)  # the operator brings both back
        assert client.read_flow_run(created.id).state_name == "Suspended"
        _answer(client, waiting, form("carol", dev.digest))
        done = wait_final(client, created.id)
    assert done.state_name == "Completed", f"{done.state.message if done.state else ''}\n{stack.worker_logs()}"
    counts = _once_per_run(stack, done)
    # Everything before the wait happened exactly once; the run came back once.
    for event in ("promotion.started", "requester.established", "change.listed",
                  "approval.requested", "verification.passed:before-approval",
                  "approval.accepted", "promotion.completed"):
        assert counts.get(event) == 1, (event, counts)
    assert counts.get("promotion.resumed") == 1, counts


def test_an_approval_given_while_the_worker_is_down_is_honoured(
    stack: Stack, dev: DevPromotion,
) -> None:
    with get_client(sync_client=True) as client:
        created = _trigger(client, "promote-staging/staging", f"{stack.app}-worker-down",
                           app=stack.app, image=dev.image, requested_by="dave",
                           requester_code=code("dave"))
        waiting = _suspended(client, created.id)
        stop_daemon("worker-deploy", state_dir=stack.config.state_dir)
        try:
            _answer(client, waiting, form("carol", dev.digest))
            # The answer is kept by the server; the run waits for a worker to come back.
            assert client.read_flow_run(created.id).state_type.value == "SCHEDULED"  # type: ignore[union-attr]
        finally:
            up(stack.config)
        done = wait_final(client, created.id)
    assert done.state_name == "Completed", f"{done.state.message if done.state else ''}\n{stack.worker_logs()}"
    assert [r.actor for r in stack.records("approval.accepted", "staging")
            if r.run_id == str(done.id)] == ["carol"]


def test_a_wait_that_times_out_while_nothing_runs_deploys_nothing(
    stack: Stack, dev: DevPromotion,
) -> None:
    policy = stack.config.state_dir / "policies" / "staging.toml"
    shipped = policy.read_text()
    policy.write_text(shipped.replace('timeout = "PT5M"', 'timeout = "PT15S"'))
    try:
        with get_client(sync_client=True) as client:
            created = _trigger(client, "promote-staging/staging", f"{stack.app}-timeout",
                               app=stack.app, image=dev.image, requested_by="erin",
                               requester_code=code("erin"))
            _suspended(client, created.id)
            stop_daemon("worker-deploy", state_dir=stack.config.state_dir)
            try:
                done = wait_final(client, created.id, timeout=120)  # the server expires the wait
            finally:
                up(stack.config)
    finally:
        policy.write_text(shipped)
    assert done.state_name == "Failed"
    assert not [r for r in stack.records("promotion.completed", "staging") if r.run_id == str(done.id)]


def test_each_flow_refuses_to_run_on_the_other_sides_pool(stack: Stack) -> None:
    with get_client(sync_client=True) as client:
        wrong = {}
        for deployment, pool, parameters in (
            ("build-release/build", POOLS["deploy"],
             {"app": stack.app, "source_repo": str(stack.app_repo), "context_path": "."}),
            ("promote-staging/staging", POOLS["build"], {"app": stack.app}),
        ):
            shipped = client.read_deployment_by_name(deployment)
            moved = client.create_deployment(
                flow_id=shipped.flow_id, name=f"{shipped.name}-on-{pool}", work_pool_name=pool,
                entrypoint=shipped.entrypoint, path=shipped.path, pull_steps=shipped.pull_steps,
                parameter_openapi_schema=shipped.parameter_openapi_schema,
                enforce_parameter_schema=True)
            wrong[deployment] = client.create_flow_run_from_deployment(
                moved, parameters=parameters, name=f"{stack.app}-wrong-side")
        done = {d: wait_final(client, r.id) for d, r in wrong.items()}
        for run in wrong.values():  # the stack is shared: leave only the shipped deployments
            assert run.deployment_id is not None
            client.delete_deployment(run.deployment_id)
    # Each pool's worker runs only the deployments its host configured for it.
    sides: tuple[tuple[str, Side], ...] = (("build-release/build", "deploy"),
                                           ("promote-staging/staging", "build"))
    for deployment, side in sides:
        run = done[deployment]
        assert run.state_name == "Failed", deployment
        message = str(run.state.message if run.state else "")
        moved_key = f"{deployment.split('/')[0]}/{deployment.split('/')[1]}-on-{POOLS[side]}"
        assert f"deployment {moved_key} is not configured on the {side} worker" in message, message
        # The worker records its refusal in the state store its side's flows append to.
        refused = [r for r in stack.audit.records()
                   if r.event == "worker.refused" and r.run_id == str(run.id)]
        assert len(refused) == 1 and refused[0].details["side"] == side


# --- two deploy hosts, one truth -------------------------------------------------------------


def _ran_on(stack: Stack, run: FlowRun) -> list[str]:
    """Which deploy hosts' workers took ``run`` ("a": the stack's own), from their logs."""
    line = f"submitting flow run '{run.id}'"
    return [name for name, host in (("a", None), *((h, h) for h in stack.config.deploy_hosts))
            if line in stack.worker_log(host)]


def _lock_spans(stack: Stack, runs: list[FlowRun]) -> list[tuple[str, int, int]]:
    """(run, seq of lock.acquired, seq of lock.released) of each run, by acquisition."""
    spans = []
    for run in runs:
        events = {r.event: r.seq for r in stack.audit.run_records(str(run.id))}
        spans.append((str(run.id), events["lock.acquired"], events["lock.released"]))
    return sorted(spans, key=lambda span: span[1])


def _poll_events(client: SyncPrefectClient, stack: Stack, run: FlowRun, event: str,
                 timeout: float = 120) -> None:
    def seen() -> bool:
        return event in {r.event for r in stack.audit.run_records(str(run.id))}
    try:
        _poll(seen, timeout, f"{run.name} recorded no {event}")
    except TimeoutError as exc:
        now = client.read_flow_run(run.id)
        raise AssertionError(f"{exc}: it is {now.state!r} in queue {now.work_queue_name}; "
                             f"events {[r.event for r in stack.audit.run_records(str(run.id))]}"
                             f"\n{stack.worker_logs()}") from None


def test_two_deploy_hosts_share_one_truth(stack: Stack, dev: DevPromotion) -> None:
    # Given: dev was promoted through host A (the default queue, which only A polls).
    assert dev.run.work_queue_name == "default" and _ran_on(stack, dev.run) == ["a"]
    b_home = stack.config.host_dir(HOST_B) / "home"
    assert b_home != stack.home
    with get_client(sync_client=True) as client:
        # When: staging promotions of the same app start on both hosts, and the environment's
        # lock is held (here by the test) while both are approved.
        requester_a = code("gina")
        on_a = _trigger(client, "promote-staging/staging", f"{stack.app}-host-a", app=stack.app,
                        image=dev.image, requested_by="gina", requester_code=requester_a)
        on_b = _trigger(client, "promote-staging/staging", f"{stack.app}-host-b", host=HOST_B,
                        app=stack.app, image=dev.image, requested_by="hank",
                        requester_code=code("hank"))
        waiting = [_suspended(client, on_a.id), _suspended(client, on_b.id)]

        # A code used on A (gina's, which started the run on A) is refused on B. Checked while
        # the code is still current, so "used" is the only reason left to refuse it.
        replayed = wait_final(client, _trigger(
            client, "promote-staging/staging", f"{stack.app}-replay-b", host=HOST_B,
            app=stack.app, image=dev.image, requested_by="gina", requester_code=requester_a).id)
        assert _ran_on(stack, replayed) == [HOST_B]
        assert replayed.state_name == "Failed"
        assert "the requester code for gina was already used" in str(
            replayed.state.message if replayed.state else "")

        ensure_environment_lock("staging")
        held = client.increment_concurrency_slots_with_lease(
            names=[lock_name("staging")], slots=1, mode="concurrency", lease_duration=120)
        lease = UUID(held.json()["lease_id"])
        try:
            # Two approvers: codes are burned in one store for both hosts, and a person's
            # later code used first makes their earlier one useless.
            for run, approver in zip(waiting, ("carol", "bob"), strict=True):
                _answer(client, run, form(approver, dev.digest))
            for run in waiting:
                _poll_events(client, stack, run, "approval.accepted")
            # Both approved, neither deploys while the slot is taken (by another "host").
            assert all("lock.acquired" not in {r.event for r in stack.audit.run_records(str(r.id))}
                       for r in waiting)
        finally:
            client.release_concurrency_slots_with_lease(lease)
        done = [wait_final(client, run.id) for run in waiting]
        for run in done:
            assert run.state_name == "Completed", (
                f"{run.name}: {run.state.message if run.state else ''}\n{stack.worker_logs()}")
        # Then: B's staging saw A's dev record (the chain check passed on B), each host took
        # its own run, and the two deploys never overlapped.
        assert _ran_on(stack, done[0]) == ["a"] and _ran_on(stack, done[1]) == [HOST_B]
        chain = [r for r in stack.audit.run_records(str(on_b.id)) if r.event == "chain.checked"]
        assert chain and all(r.details["passed_in"] == "dev" for r in chain)
        (_first, got_first, freed), (_second, got_second, _) = _lock_spans(stack, done)
        assert got_first < freed < got_second, _lock_spans(stack, done)
        # B's lock heartbeat is in B's own folder; the slot itself is the server's.
        assert (b_home / "locks").is_dir()

        # A pin set on A (a rollback there) holds for a scheduled run on B.
        rolled = wait_final(client, _trigger(
            client, "rollback/rollback", f"{stack.app}-rollback-a", app=stack.app,
            environment="staging", reason="two-host check", requested_by="gina",
            requester_code=code("gina")).id)
        assert rolled.state_name == "Completed", (
            f"{rolled.state.message if rolled.state else ''}\n{stack.worker_logs()}")
        assert _ran_on(stack, rolled) == ["a"]
        staging = client.read_deployment_by_name("promote-staging/staging")
        with httpx.Client(base_url=stack.config.api_url, auth=tuple(stack.auth.split(":", 1)),  # type: ignore[arg-type]
                          timeout=10) as api:
            # The operator routes staging's schedule to host B for a while.
            # With the pool named: a queue name alone is looked up among every pool's queues
            # (the server has a "default" queue in each), and may land in another pool.
            moved = api.patch(f"/deployments/{staging.id}", json={
                "work_pool_name": POOLS["deploy"], "work_queue_name": host_queue(HOST_B)})
            assert moved.status_code == 204, moved.text
            try:
                earlier = {r.id for r in _runs_of(client, staging.id, stack.app)}
                fire_at = datetime.now(UTC) + timedelta(seconds=4)
                hourly: list[tuple[SCHEDULE_TYPES, bool]] = [
                    (IntervalSchedule(interval=timedelta(hours=1), anchor_date=fire_at), True)]
                (schedule,) = client.create_deployment_schedules(
                    staging.id, hourly, parameters={"app": stack.app})
                try:
                    (fired,) = _poll(lambda: [r for r in _runs_of(client, staging.id, stack.app)
                                              if r.id not in earlier and r.state_name != "Scheduled"],
                                     60, "the schedule did not start a staging run")
                finally:
                    client.delete_deployment_schedule(staging.id, schedule.id)
            finally:
                assert api.patch(f"/deployments/{staging.id}", json={
                    "work_pool_name": POOLS["deploy"], "work_queue_name": "default"}
                                 ).status_code == 204
        fired = wait_final(client, fired.id)
    assert fired.state_name == "Completed" and _ran_on(stack, fired) == [HOST_B]
    (skipped,) = [r for r in stack.audit.run_records(str(fired.id)) if r.event == "promotion.skipped"]
    assert str(skipped.details["reason"]).startswith(f"pinned at {dev.digest} by gina")
    stack.state.pins.clear(stack.app, "staging")  # later staging runs start unpinned


def test_a_long_held_lock_is_renewed_past_prefects_lease(stack: Stack, tmp_path: Path) -> None:
    """Prefect's lease on the slot (60 s, the server's minimum) and the heartbeat are renewed:
    a second promotion waits for the whole hold. This server runs Prefect's repossessor (every
    2 s here), and a control lease taken just after the lock, never renewed, is repossessed
    during the hold: the lock's own would have been too, had it not been renewed."""
    environment = f"long-{secrets.token_hex(3)}"
    control = f"control-{environment}"
    log = AuditLog(tmp_path / "audit.jsonl")
    first = RunAudit(log, "first-run", "lockapp", environment)
    second = RunAudit(log, "second-run", "lockapp", environment)
    held = threading.Event()
    times: dict[str, float] = {}

    def waiter() -> None:
        held.wait()
        with environment_lock(environment, second, window_seconds=2.0, state_dir=tmp_path):
            times["second"] = time.monotonic()

    thread = threading.Thread(target=waiter)
    thread.start()
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=control, limit=1))
        try:
            with environment_lock(environment, first, window_seconds=2.0, state_dir=tmp_path):
                started = time.monotonic()
                client.increment_concurrency_slots_with_lease(
                    names=[control], slots=1, mode="concurrency",
                    lease_duration=PREFECT_MIN_LEASE_SECONDS)
                held.set()
                # Held until the server has taken back the unrenewed control lease.
                _poll(lambda: "second" in times
                      or client.read_global_concurrency_limit_by_name(control).active_slots == 0,
                      PREFECT_MIN_LEASE_SECONDS + 30, "the control lease was never repossessed")
                assert "second" not in times, "the second run got the lock while it was held"
                # Still this run's slot: had it been repossessed, it would be free (or briefly
                # the second run's, which then refuses it: the first's heartbeat is live).
                assert client.read_global_concurrency_limit_by_name(
                    lock_name(environment)).active_slots == 1
                times["released"] = time.monotonic()
        finally:
            client.delete_global_concurrency_limit_by_name(control)
    thread.join(60)
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(lock_name(environment))
    records = [r.event for r in log.records()]
    print(f"\nFIGURE lock held {times['released'] - started:.0f}s (Prefect lease "
          f"{PREFECT_MIN_LEASE_SECONDS:.0f}s, an unrenewed one repossessed by then): the second "
          f"promotion got it {times['second'] - times['released']:.2f}s after the release")
    assert times["released"] - started >= PREFECT_MIN_LEASE_SECONDS
    assert times["second"] >= times["released"]
    assert "lock.reclaimed" not in records and "lock.refused" not in records


def test_no_log_carries_a_secret(stack: Stack, dev: DevPromotion) -> None:
    # After a build, a deploy, an approval and the emergency path (tests above, same module):
    # the workers' logs, the server's log and every log line the API holds carry no secret.
    configured = "".join(path.read_text() for path in stack.config.state_dir.glob("worker-*.toml"))
    for name in ("build registry password", "deploy registry password", "cosign key password"):
        assert stack.secrets[name] in configured, name  # the scan looks for values really used
    assert secrets_found(stack.secrets, stack.config, stack.auth) == {}
