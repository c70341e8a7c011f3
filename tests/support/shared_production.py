"""One production-like stack for every test module that needs one (a session fixture).

PostgreSQL, a Prefect server on it, one Portcullis worker per pool and a second deploy host
(``infra.production``), the shipped deployments (``prefect deploy --all``, their schedules
paused), the test engine and registry, a prod policy frozen now, an approvers file and a
loopback ServiceNow instance. Bringing it up takes 40-55 s on a 2-core machine; each module
that used to start its own now shares this one (tests/conftest.py, ``production_stack``).

What a module changes on it, it puts back (a patched deployment, a pool template, a policy
file, incident rows); :meth:`SharedProduction.restore` checks the pools and brings stopped
daemons back when a module ends. Records in the shared state store are told apart by app
name, run id or :meth:`SharedProduction.audit_mark` (where a module's records begin).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from prefect.context import _temporary_global_settings_context, get_settings_context
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from infra.demo_data import ensure_signing_keys, ensure_trivy_db
from infra.docker_engine import DockerEngine
from infra.production import ProductionConfig, down, state_urls, up
from infra.registry import RunningRegistry, free_port
from portcullis.state import StoreAuditLog, open_state_url
from tests.support.production import deploy_all, pause_shipped_schedules
from tests.support.promotion_setup import stack_environment, write_policies
from tests.support.servicenow import PASSWORD, TableApi, serve

#: The approvers file's people: their TOTP secrets and groups.
SECRETS = {name: pyotp.random_base32() for name in
           ("alice", "bob", "carol", "dave", "olga", "oscar", "trent", "erin", "frank", "gina",
            "hank")}
GROUPS = {"alice": "security", "bob": "platform", "carol": "platform", "dave": "on-call",
          "olga": "on-call", "oscar": "on-call", "trent": "developers", "erin": "developers",
          "frank": "developers", "gina": "developers", "hank": "developers"}
#: The second deploy host of the stack (the first is the stack's own deploy worker).
HOST_B = "b"
#: What :meth:`SharedProduction.restore` compares on each deployment (and puts back).
DEPLOYMENT_FIELDS = ("work_pool_name", "work_queue_name", "entrypoint", "path", "pull_steps",
                     "job_variables", "enforce_parameter_schema", "parameter_openapi_schema",
                     "parameters", "paused")


def _approvers(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_text("".join(
        f'[[approver]]\nname = "{n}"\ngroups = ["{GROUPS[n]}"]\naliases = ["{n}@example.com"]\n'
        f'totp_secret = "{s}"\n\n' for n, s in SECRETS.items()))
    path.chmod(0o600)


@dataclass
class SharedProduction:
    """The running stack and what its users need to drive it."""

    config: ProductionConfig
    home: Path
    policies: Path
    approvers: Path
    #: The loopback ServiceNow instance's incidents: a module adds its rows, removes them after.
    incidents: TableApi
    #: The PORTCULLIS_* settings `up` ran with (each worker's file was written from them).
    environment: dict[str, str]
    auth: str
    #: Every secret the setup holds, by name: no log may carry one.
    secrets: dict[str, str]
    deploy_seconds: float
    #: The deployments as `prefect deploy --all` left them (schedules paused), by id.
    shipped: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def audit(self) -> StoreAuditLog:
        """The state store's trail (as the deploy flows' role)."""
        return open_state_url(state_urls(self.config)[0]).audit_log()

    def audit_mark(self) -> int:
        """The sequence number of the last record now (-1: none); later records are newer."""
        records = self.audit.records()
        return records[-1].seq if records else -1

    @contextmanager
    def client_settings(self) -> Iterator[None]:
        """Point Prefect clients (also those of other threads) at this stack's API."""
        with temporary_settings({PREFECT_API_URL: self.config.api_url,
                                 PREFECT_API_AUTH_STRING: self.auth}), \
                _temporary_global_settings_context(get_settings_context()):
            yield

    @contextmanager
    def stack_environment(self) -> Iterator[None]:
        """The PORTCULLIS_* settings `up` ran with, in this process (for `up` again: a worker
        it restarts gets its file rewritten from them)."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in self.environment.items():
                mp.setenv(key, value)
            yield

    def api(self) -> httpx.Client:
        """A REST client of the stack's API."""
        return httpx.Client(base_url=self.config.api_url, timeout=10,
                            auth=tuple(self.auth.split(":", 1)))  # type: ignore[arg-type]

    def deployments(self) -> dict[str, dict[str, Any]]:
        """Every deployment's :data:`DEPLOYMENT_FIELDS` and schedules (id, active), by id."""
        with self.api() as api:
            found = api.post("/deployments/filter", json={})
        found.raise_for_status()
        return {d["id"]: {**{name: d.get(name) for name in DEPLOYMENT_FIELDS},
                          "schedules": sorted((s["id"], s["active"]) for s in d["schedules"])}
                for d in found.json()}

    def restore(self) -> None:
        """Bring stopped daemons back, and put back what a module left changed: a pool's
        template, a shipped deployment, a deployment of its own. Then fail, naming it: a test
        that changes the shared stack must put it back itself."""
        with self.stack_environment():
            left = list(up(self.config, reset_pools=True).notes)
        now = self.deployments()
        with self.api() as api:
            for key, fields in now.items():
                if key not in self.shipped:
                    api.delete(f"/deployments/{key}").raise_for_status()
                    left.append(f"deployment {key} was left behind (deleted)")
                elif fields != self.shipped[key]:
                    changed = sorted(n for n in fields if fields[n] != self.shipped[key][n])
                    # The pool and queue go together: a queue name alone may match another
                    # pool's queue of that name.
                    back = {n: self.shipped[key][n] for n in changed if n != "schedules"}
                    if {"work_pool_name", "work_queue_name"} & set(back):
                        back |= {n: self.shipped[key][n]
                                 for n in ("work_pool_name", "work_queue_name")}
                    api.patch(f"/deployments/{key}", json=back).raise_for_status()
                    left.append(f"deployment {key} was changed: {changed} (put back but schedules)")
        left += [f"deployment {key} was deleted" for key in self.shipped if key not in now]
        assert not left, f"a test module left the shared stack changed: {left}"


@contextmanager
def shared_production(engine: DockerEngine, registry: RunningRegistry) -> Iterator[SharedProduction]:
    """Bring the stack up with the test engine and registry; take it down afterwards."""
    # mkdtemp under /tmp, not pytest's 0700 temp root: the postgres account must reach it.
    state = Path(tempfile.mkdtemp(prefix="portcullis-production-"))
    config = ProductionConfig(state_dir=state, postgres_port=free_port(),
                              prefect_port=free_port(), worker_query_seconds=1,
                              scheduler_loop_seconds=2, repossessor_loop_seconds=2,
                              deploy_hosts=(HOST_B,))
    home, policies, approvers = state / "home", state / "policies", state / "deploy" / "approvers.toml"
    # dev: no approval; staging: one approval; prod: frozen now, with an on-call emergency
    # rule. No canary: the router and its analysis are tested in test_canary_rollout.
    write_policies(policies, prod_frozen=True)
    _approvers(approvers)
    signing = ensure_signing_keys(home)
    ensure_trivy_db(home / "trivy")
    incidents = TableApi(rows=[])
    builder, deployer = registry.account("builder"), registry.account("deployer")
    try:
        with serve(incidents) as incidents_url:
            # `up` hands each worker its side's variables and the shared ones from this
            # environment; nothing else named PORTCULLIS_* reaches a worker.
            environment = stack_environment(
                home=home, policies=policies, approvers=approvers, registry=registry,
                docker_host=engine.host, signing=signing, incidents_url=incidents_url)
            shared = SharedProduction(config, home, policies, approvers, incidents, environment,
                                      auth="", secrets={}, deploy_seconds=0.0)
            with shared.stack_environment():
                started = time.monotonic()
                up(config)
                print(f"\nproduction stack up: {time.monotonic() - started:.1f}s")
            shared.auth = json.loads((state / "secrets.json").read_text())["api_auth_string"]
            shared.secrets = {"build registry password": builder.password,
                              "deploy registry password": deployer.password,
                              "cosign key password": signing[1], "API auth string": shared.auth,
                              "incidents password": PASSWORD,
                              **{f"TOTP secret of {n}": v for n, v in SECRETS.items()}}
            with shared.client_settings():
                shared.deploy_seconds = deploy_all(config, shared.auth)
                print(f"prefect deploy --all: {shared.deploy_seconds:.1f}s")
                pause_shipped_schedules()
            shared.shipped = shared.deployments()
            yield shared
    finally:
        down(config)
        shutil.rmtree(state, ignore_errors=True)
