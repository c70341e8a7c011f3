"""Helpers for tests that drive deployments on the production-like setup (infra.production)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun

from infra.production import POOLS, ProductionConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def deploy_all(config: ProductionConfig, auth: str) -> float:
    """``prefect deploy --all`` as an operator runs it, against this setup; returns seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=config.api_url, PREFECT_API_AUTH_STRING=auth,
               PREFECT_HOME=str(config.state_dir / "operator"), PORTCULLIS_REPO_DIR=str(REPO_ROOT))
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all",
         "--prefect-file", "deployments.yaml"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return time.monotonic() - started


def pause_shipped_schedules() -> None:
    """Turn off every schedule deployments.yaml ships, so none fires during a test."""
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        assert {d.work_pool_name for d in deployments} == set(POOLS.values())
        assert all(d.enforce_parameter_schema for d in deployments)
        for deployment in deployments:
            for schedule in deployment.schedules:
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def wait_final(client: SyncPrefectClient, run_id: UUID, timeout: float = 240) -> FlowRun:
    """The run once it reached a final state (polling the API)."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state_type is not None and run.state_type.value in FINAL:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run.name} still {run.state_name} after {timeout:.0f}s")
        time.sleep(0.5)


def api_logs(config: ProductionConfig, auth: str) -> str:
    """Every log line the Prefect API holds (``POST /api/logs/filter``, paged)."""
    messages: list[str] = []
    with httpx.Client(base_url=config.api_url, auth=tuple(auth.split(":", 1)),  # type: ignore[arg-type]
                      timeout=30) as api:
        offset = 0
        while True:
            page = api.post("/logs/filter", json={"offset": offset, "limit": 200})
            page.raise_for_status()
            batch = page.json()
            messages += [str(entry.get("message", "")) for entry in batch]
            if len(batch) < 200:
                return "\n".join(messages)
            offset += len(batch)


def secrets_found(secrets: dict[str, str], config: ProductionConfig, auth: str,
                  extra_files: Iterable[Path] = ()) -> dict[str, list[str]]:
    """Which secret (by name) appears where: the worker logs, the server log, the API's logs."""
    places = {(str(path.relative_to(config.state_dir)) if path.is_relative_to(config.state_dir)
               else path.name): path.read_text(errors="replace") for path in
              (config.state_dir / "worker-build.log", config.state_dir / "worker-deploy.log",
               *config.state_dir.glob("hosts/*/worker-deploy.log"),
               config.state_dir / "prefect-server.log", *extra_files) if path.exists()}
    places["POST /api/logs/filter"] = api_logs(config, auth)
    return {name: [where for where, text in places.items() if value in text]
            for name, value in secrets.items() if any(value in text for text in places.values())}
