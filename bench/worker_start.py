"""Trigger -> running: Portcullis worker vs stock process worker (``python -m bench.worker_start [N]``).

Brings the production-like setup up in a temporary directory on free ports (1 s worker poll),
registers the shipped deployments, and adds a stock ``prefect worker start --type process`` on
a pool of its own (Prefect's default template) with a copy of ``post-incident-reviews`` on it.
Then it starts runs through the API, alternating between the two workers so both see the same
machine load, and prints per run and as medians: trigger -> Running (worker poll, checks,
process start up to the flow engine). On the stock worker the flow then refuses (it does not
run under a Portcullis worker file): only its start is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

from bench.report import figure as report
from infra.daemon import start_daemon, stop_daemon
from infra.prefect_server import prefect_env
from infra.production import ProductionConfig, down, up
from infra.registry import free_port
from tests.support.production import REPO_ROOT, deploy_all, pause_shipped_schedules, wait_final

STOCK_POOL = "bench-stock"


def _stock_worker(config: ProductionConfig, auth: str, client: SyncPrefectClient) -> UUID:
    """Start a stock process worker on its own pool; return a reviews deployment on that pool."""
    with httpx.Client(base_url=config.api_url, auth=tuple(auth.split(":", 1)), timeout=10) as api:  # type: ignore[arg-type]
        api.post("/work_pools/", json={"name": STOCK_POOL, "type": "process", "base_job_template":
                                       ProcessWorker.get_default_base_job_template()}).raise_for_status()

        def online() -> bool:
            found = api.post(f"/work_pools/{STOCK_POOL}/workers/filter", json={})
            return any(w["status"] == "ONLINE" for w in found.json())

        env = prefect_env(config.state_dir / "worker-stock", config.prefect_port)
        env.update(PREFECT_API_AUTH_STRING=auth, PREFECT_WORKER_QUERY_SECONDS="1")
        start_daemon("worker-stock", [str(Path(sys.executable).with_name("prefect")), "worker",
                                      "start", "--pool", STOCK_POOL, "--type", "process"],
                     state_dir=config.state_dir, env=env, ready=online, timeout=120)
    shipped = client.read_deployment_by_name("post-incident-reviews/reviews")
    return client.create_deployment(
        flow_id=shipped.flow_id, name="reviews-stock", work_pool_name=STOCK_POOL,
        entrypoint=shipped.entrypoint, path=shipped.path, pull_steps=shipped.pull_steps,
        parameter_openapi_schema=shipped.parameter_openapi_schema)


def main(runs: int = 5) -> None:
    """Measure ``runs`` runs on each worker and print the figures."""
    state = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    config = ProductionConfig(state_dir=state, postgres_port=free_port(),
                              prefect_port=free_port(), worker_query_seconds=1)
    os.environ.update(PORTCULLIS_HOME=str(state / "home"), PORTCULLIS_REPO_DIR=str(REPO_ROOT))
    try:
        up(config)
        auth = json.loads((state / "secrets.json").read_text())["api_auth_string"]
        with temporary_settings({PREFECT_API_URL: config.api_url, PREFECT_API_AUTH_STRING: auth}):
            deploy_all(config, auth)
            pause_shipped_schedules()
            figures: dict[str, list[float]] = {"portcullis": [], "stock": []}
            with get_client(sync_client=True) as client:
                targets = {
                    "portcullis": client.read_deployment_by_name("post-incident-reviews/reviews").id,
                    "stock": _stock_worker(config, auth, client),
                }
                for i in range(runs):
                    for worker, deployment in targets.items():
                        created = client.create_flow_run_from_deployment(deployment, name=f"b{i}")
                        run = wait_final(client, created.id, timeout=180)
                        assert run.start_time and run.created, run.state
                        figures[worker].append((run.start_time - run.created).total_seconds())
                        print(f"run {i} {worker:10}: trigger -> running {figures[worker][-1]:.2f}s "
                              f"({run.state_name})")
        for worker, seconds in figures.items():
            print(f"{worker:10} worker, {runs} runs, 1 s poll: trigger -> running median "
                  f"{statistics.median(seconds):.2f}s (min {min(seconds):.2f}, max {max(seconds):.2f})")
            report(f"trigger -> running, {worker} worker (median of {runs})",
                   f"{statistics.median(seconds):.2f} s (max {max(seconds):.2f})", "<= 3 s",
                   "8-9 s (stock worker, 1 s poll)")
    finally:
        stop_daemon("worker-stock", state_dir=state)
        down(config)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
