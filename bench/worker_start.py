"""Trigger -> running on the Portcullis worker (``uv run python -m bench.worker_start [N]``).

Brings the production-like setup up in a temporary directory on free ports (1 s worker poll),
registers the shipped deployments, starts ``post-incident-reviews`` N times one after the
other through the API and prints, per run and as medians: trigger -> Running (worker poll,
refusal checks, process start up to the flow engine) and trigger -> Completed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from infra.production import ProductionConfig, down, up
from infra.registry import free_port
from tests.support.production import REPO_ROOT, deploy_all, pause_shipped_schedules, wait_final


def main(runs: int = 5) -> None:
    """Measure ``runs`` reviews runs and print the figures."""
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
            running, done = [], []
            with get_client(sync_client=True) as client:
                reviews = client.read_deployment_by_name("post-incident-reviews/reviews")
                for i in range(runs):
                    created = client.create_flow_run_from_deployment(reviews.id, name=f"bench-{i}")
                    run = wait_final(client, created.id, timeout=120)
                    assert run.state_name == "Completed", run.state
                    assert run.start_time and run.end_time and run.created
                    running.append((run.start_time - run.created).total_seconds())
                    done.append((run.end_time - run.created).total_seconds())
                    print(f"run {i}: trigger -> running {running[-1]:.2f}s, "
                          f"-> completed {done[-1]:.2f}s")
        print(f"Portcullis worker, {runs} runs, 1 s poll: trigger -> running median "
              f"{statistics.median(running):.2f}s (min {min(running):.2f}, max "
              f"{max(running):.2f}); trigger -> completed median {statistics.median(done):.2f}s")
    finally:
        down(config)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
