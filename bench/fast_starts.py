"""Fast starts (issue 12): trigger -> first task, approval -> next stage, memory of waiting runs.

``python -m bench.fast_starts [--runs N] [--waiting W]`` brings up, in a temporary directory on
free ports: a Docker engine and a registry (as the tests do), a loopback ServiceNow with one
open P1 ticket per emergency run, and the production-like setup (PostgreSQL-backed Prefect
server, one Portcullis worker per side, worker poll 1 s, warm starts as configured by
default). It registers deployments.yaml, runs one promote-dev (one build), then for each of
staging, prod and emergency starts ``N`` promotions through the API (each with its own
requester identity and code) and answers their approval forms through the API:

* trigger -> first task: the run's creation to the first task run's start (server times);
* approval -> next stage: the last approval submitted to the first task run that starts
  afterwards and is not a cached replay (with durable approvals the run is rescheduled, the
  worker starts it again and it replays its earlier tasks from their records).

Then it starts ``W`` staging promotions (a few at a time) and, once all wait for approval,
prints the RSS of the deploy worker (with its warm parent and any flow process), the Prefect
server and PostgreSQL, against the same figures before; the waiting runs are cancelled.
Today's figures (stock process worker, 10 s poll, approvals waiting with ``pause_flow_run``)
are printed beside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import docker
import pyotp
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from infra.base_image import ensure_base_image
from infra.daemon import running_pid
from infra.demo_data import ensure_signing_keys, ensure_trivy_db
from infra.docker_engine import ensure_engine, stop_private_engine
from infra.production import ProductionConfig, down, state_urls, up
from infra.registry import free_port, start_registry, stop_registry
from portcullis.state import open_state_url
from tasks.deploy import LABEL_APP
from tests.support.production import deploy_all, pause_shipped_schedules, wait_final
from tests.support.promotion_setup import init_app_repo, stack_environment, write_policies
from tests.support.servicenow import TableApi, incident_row, serve

#: Today's figures (stock process worker, 10 s poll, pause_flow_run), from the issue.
TODAY = {"trigger -> first task": "18-21 s", "approval -> next stage": "8.4 s",
         "per waiting promotion": "141 MiB"}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class People:
    """Bench identities: one fresh person per requester and per approval (codes are single-use)."""

    groups: dict[str, str] = field(default_factory=dict)
    totp: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, group: str) -> str:
        self.groups[name], self.totp[name] = group, pyotp.random_base32()
        return name

    def code(self, name: str) -> str:
        return pyotp.TOTP(self.totp[name]).now()

    def write(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text("".join(
            f'[[approver]]\nname = "{n}"\ngroups = ["{g}"]\ntotp_secret = "{self.totp[n]}"\n\n'
            for n, g in self.groups.items()))
        path.chmod(0o600)


def _waiting_form(client: SyncPrefectClient, run_id: UUID, seen: set[UUID],
                  timeout: float = 600) -> FlowRun:
    """The run once it waits for approval with a new form whose schema the server holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        state = run.state
        if state is not None and state.type.value in FINAL:
            raise RuntimeError(f"run {run.name} ended {state.name}: {state.message}")
        if (state is not None and state.is_paused() and state.id not in seen
                and state.state_details.run_input_keyset):
            with contextlib.suppress(Exception):
                client.read_flow_run_input(run_id, state.state_details.run_input_keyset["schema"])
                seen.add(state.id)
                return run
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} did not wait for approval")


def _tasks(client: SyncPrefectClient, run_id: UUID) -> list[Any]:
    return [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=[run_id]))) if t.start_time is not None]


def _first_task_after(client: SyncPrefectClient, run_id: UUID, after: datetime,
                      timeout: float = 120) -> datetime:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [t.start_time for t in _tasks(client, run_id)
                 if t.start_time > after and t.state_name != "Cached"]
        if fresh:
            return min(fresh)
        time.sleep(0.2)
    raise TimeoutError(f"no task of {run_id} started after the approval")


def _tree_memory(root: int | None) -> tuple[int, int]:
    """(RSS, PSS) in bytes of ``root`` and all its descendants. RSS counts pages a forked
    child shares with its warm parent once per process; PSS splits them among the sharers."""
    if root is None:
        return 0, 0
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    rss = pss = 0
    for pid in tree:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
    return rss, pss


@contextlib.contextmanager
def _stack(state: Path, people: People, tickets: list[str], app: str) -> Iterator[
        tuple[ProductionConfig, str]]:
    engine = ensure_engine(state / "docker")
    client = docker.DockerClient(base_url=engine.host, version="auto")
    ensure_base_image(client)
    registry = start_registry(state / "registry", users={
        "builder": secrets.token_urlsafe(12), "deployer": secrets.token_urlsafe(12),
        "promoter": secrets.token_urlsafe(12)})
    config = ProductionConfig(state_dir=state / "production", postgres_port=free_port(),
                              prefect_port=free_port(), worker_query_seconds=1)
    home, policies = state / "home", state / "policies"
    approvers = state / "deploy" / "approvers.toml"
    write_policies(policies, prod_frozen=False, timeout="PT2H")
    people.write(approvers)
    init_app_repo(state / "app")
    private_pem, password, public_pem = ensure_signing_keys(home)
    ensure_trivy_db(home / "trivy")
    now = datetime.now(UTC)
    incidents = TableApi(rows=[incident_row(t, state="2", priority="1", ci=app, opened=now)
                               for t in tickets])
    saved = dict(os.environ)
    try:
        with serve(incidents) as incidents_url:
            os.environ.update(stack_environment(
                home=home, policies=policies, approvers=approvers, registry=registry,
                docker_host=engine.host, signing=(private_pem, password, public_pem),
                incidents_url=incidents_url))
            # The production-like setup starts runs warm unless told otherwise
            # (PORTCULLIS_PRODUCTION_WORKER_START=cold measures the cold start).
            try:
                up(config)
                auth = json.loads((config.state_dir / "secrets.json").read_text())["api_auth_string"]
                with temporary_settings({PREFECT_API_URL: config.api_url,
                                         PREFECT_API_AUTH_STRING: auth}):
                    deploy_all(config, auth)
                    pause_shipped_schedules()
                    yield config, auth
            finally:
                down(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for container in client.containers.list(all=True, filters={"label": f"{LABEL_APP}={app}"}):
            container.remove(force=True)
        client.close()
        stop_registry(state / "registry")
        if engine.private:
            stop_private_engine(state / "docker")


def _form(people: People, name: str, digest: str) -> dict[str, Any]:
    return {"approver": name, "code": people.code(name), "digest_prefix": digest[7:19],
            "decision": "approve", "comment": "bench"}


def _promotion(client: SyncPrefectClient, people: People, kind: str, i: int, app: str,
               image: str, digest: str, ticket: str | None) -> tuple[float, float]:
    """One promotion through its approvals: (trigger -> first task, approval -> next stage)."""
    requester = f"req-{kind}-{i}"
    deployment, approvals = {
        "staging": ("promote-staging/staging", [f"plat-{kind}-{i}"]),
        "prod": ("promote-prod/prod", [f"sec-{kind}-{i}", f"plat-{kind}-{i}"]),
        "emergency": ("emergency-promote/emergency", [f"oc-{kind}-{i}"]),
    }[kind]
    parameters: dict[str, Any] = {"app": app, "image": image, "requested_by": requester,
                                  "requester_code": people.code(requester)}
    if kind == "emergency":
        parameters.update(incident_ticket=ticket, justification="bench")
    found = client.read_deployment_by_name(deployment)
    run = client.create_flow_run_from_deployment(found.id, parameters=parameters,
                                                 name=f"{app}-{kind}-{i}")
    seen: set[UUID] = set()
    submitted = datetime.now(UTC)
    try:
        for approver in approvals:
            _waiting_form(client, run.id, seen)
            submitted = datetime.now(UTC)
            result = client.resume_flow_run(run.id, run_input=_form(people, approver, digest))
            if result.status.value != "ACCEPT":
                raise RuntimeError(f"approval refused: {result.details}")
        next_stage = _first_task_after(client, run.id, submitted)
        done = wait_final(client, run.id, timeout=600)
        if done.state_name != "Completed":
            raise RuntimeError(f"ended {done.state_name}")
    except (RuntimeError, TimeoutError) as exc:
        now = client.read_flow_run(run.id)
        raise RuntimeError(f"{run.name} {exc}; now {now.state_name}: "
                           f"{now.state.message if now.state else ''}") from exc
    first = min(t.start_time for t in _tasks(client, run.id))
    return (first - run.created).total_seconds(), (next_stage - submitted).total_seconds()


def _row(label: str, values: list[float], goal: str, today: str) -> str:
    return (f"| {label:<34} | {len(values):>3} | {statistics.median(values):>6.2f} s "
            f"| {max(values):>6.2f} s | {goal:>7} | {today:>8} |")


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.fast_starts")
    parser.add_argument("--runs", type=int, default=10, help="promotions per kind")
    parser.add_argument("--waiting", type=int, default=100, help="staging runs left waiting")
    parser.add_argument("--batch", type=int, default=6, help="most waiting runs starting at once")
    args = parser.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="portcullis-fast-"))
    state.chmod(0o711)
    app = f"b-{secrets.token_hex(3)}"
    people = People()
    tickets = [f"INC00{40000 + i}" for i in range(args.runs)]
    # Everyone must be in the approvers file before the workers start: add them all now.
    for kind in ("staging", "prod", "emergency"):
        for i in range(args.runs):
            people.add(f"req-{kind}-{i}", "developers")
            people.add(f"plat-{kind}-{i}", "platform")
            people.add(f"sec-{kind}-{i}", "security")
            people.add(f"oc-{kind}-{i}", "on-call")
    for i in range(args.waiting):
        people.add(f"req-wait-{i}", "developers")
    people.add("req-dev", "developers")
    started = time.monotonic()
    figures: dict[str, tuple[list[float], list[float]]] = {}
    memory: list[str] = []
    failures: list[str] = []
    try:
        with _stack(state, people, tickets, app) as (config, _auth), \
                get_client(sync_client=True) as client:
            print(f"setup: {time.monotonic() - started:.0f}s", flush=True)
            dev_deployment = client.read_deployment_by_name("promote-dev/dev")
            dev = wait_final(client, client.create_flow_run_from_deployment(
                dev_deployment.id, name=f"{app}-dev", parameters={
                    "app": app, "source_repo": str(state / "app"), "commit": "HEAD",
                    "ref": "main", "context_path": ".", "requested_by": "req-dev",
                    "requester_code": people.code("req-dev")}).id, timeout=900)
            if dev.state_name != "Completed":
                raise RuntimeError(f"promote-dev ended {dev.state_name}: {dev.state.message if dev.state else ''}")
            trail = open_state_url(state_urls(config)[0]).audit_log()
            (completed,) = [r for r in trail.records()
                            if r.event == "promotion.completed" and r.run_id == str(dev.id)]
            image, digest = str(completed.details["image"]), str(completed.digest)
            print(f"promote-dev done: {image}", flush=True)
            for kind in ("staging", "prod", "emergency"):
                firsts, nexts = [], []
                for i in range(args.runs):
                    try:
                        first, nxt = _promotion(client, people, kind, i, app, image, digest,
                                                tickets[i] if kind == "emergency" else None)
                    except RuntimeError as exc:  # reported and counted, the bench goes on
                        failures.append(str(exc))
                        print(f"{kind:9} {i:2}: FAILED {exc}", flush=True)
                        continue
                    firsts.append(first)
                    nexts.append(nxt)
                    print(f"{kind:9} {i:2}: trigger -> first task {first:5.2f}s, "
                          f"approval -> next stage {nxt:5.2f}s", flush=True)
                figures[kind] = (firsts, nexts)
            memory = _waiting_memory(client, config, people, app, image, args.waiting, args.batch)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    print(f"\nPortcullis worker, warm starts, worker poll 1 s, PostgreSQL-backed server "
          f"({args.runs} runs each; durable approvals where the branch is merged)")
    print("| measure                            |   n | median   | worst    |    goal |    today |")
    print("|------------------------------------|-----|----------|----------|---------|----------|")
    for kind, (firsts, nexts) in figures.items():
        print(_row(f"{kind}: trigger -> first task", firsts, "<= 3 s", TODAY["trigger -> first task"]))
        print(_row(f"{kind}: approval -> next stage", nexts, "<= 2 s", TODAY["approval -> next stage"]))
    print("\n".join(memory))
    print(f"\n{len(failures)} promotion(s) failed" + "".join(f"\n  {f}" for f in failures))


def _waiting_memory(client: SyncPrefectClient, config: ProductionConfig, people: People,
                    app: str, image: str, count: int, batch: int) -> list[str]:
    """Start ``count`` staging promotions, wait until all wait for approval, measure RSS."""
    pids = {"deploy worker (+ warm parent, flow processes)":
            running_pid(config.state_dir / "worker-deploy.pid"),
            "Prefect server": running_pid(config.state_dir / "prefect-server.pid"),
            "PostgreSQL": running_pid(config.state_dir / "postgres.pid")}
    before = {name: _tree_memory(pid) for name, pid in pids.items()}
    found = client.read_deployment_by_name("promote-staging/staging")
    runs: list[UUID] = []
    waiting: set[UUID] = set()
    started = time.monotonic()
    while len(waiting) < count:
        for run_id in runs:
            if run_id not in waiting:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.type.value in FINAL:
                    raise RuntimeError(f"{run.name} ended {run.state_name}: {run.state.message}")
                if run.state is not None and run.state.is_paused():
                    waiting.add(run_id)
        while len(runs) < count and len(runs) - len(waiting) < batch:
            requester = f"req-wait-{len(runs)}"
            runs.append(client.create_flow_run_from_deployment(
                found.id, name=f"{app}-wait-{len(runs)}", parameters={
                    "app": app, "image": image, "requested_by": requester,
                    "requester_code": people.code(requester)}).id)
        time.sleep(0.5)
    setup = time.monotonic() - started
    time.sleep(3)  # let the last flow processes exit before reading RSS
    after = {name: _tree_memory(pid) for name, pid in pids.items()}
    mib = 1024 * 1024
    lines = [f"\n{count} staging promotions waiting for approval (set up in {setup:.0f}s):",
             ("| process tree                                   | RSS before | RSS waiting "
             "| PSS before | PSS waiting |"),
             ("|------------------------------------------------|------------|-------------"
             "|------------|-------------|")]
    rows = [*pids, "total"]
    before["total"] = (sum(v[0] for v in before.values()), sum(v[1] for v in before.values()))
    after["total"] = (sum(v[0] for v in after.values()), sum(v[1] for v in after.values()))
    lines += [f"| {name:<46} | {before[name][0] / mib:>6.0f} MiB | {after[name][0] / mib:>7.0f} MiB "
              f"| {before[name][1] / mib:>6.0f} MiB | {after[name][1] / mib:>7.0f} MiB |" for name in rows]
    for index, kind in ((0, "RSS"), (1, "PSS")):
        held = after["total"][index] - before["total"][index]
        lines.append(
            f"{kind}: per waiting promotion {held / count / mib:.2f} MiB (today "
            f"{TODAY['per waiting promotion']}); 500 waiting, extrapolated: "
            f"{(after['total'][index] + held / count * (500 - count)) / mib:.0f} MiB in total "
            "(goal < 1024 MiB)")
    for run_id in runs:
        with contextlib.suppress(Exception):
            client.set_flow_run_state(run_id, Cancelling(), force=True)
    return lines


if __name__ == "__main__":
    main()
