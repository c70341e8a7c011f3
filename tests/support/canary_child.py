"""A promotion's canary rollout in a process of its own, for tests that SIGKILL it.

Run as ``python -m tests.support.canary_child SPEC.json``. The spec names the image, the app,
the router, Prometheus, the policy and whether to run inside a flow run; deploy credentials come from the PORTCULLIS_DEPLOY_*
environment (never the command line). Every event the rollout records is appended to the
spec's ``events`` file as one JSON line, flushed at once, so the test can follow the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from blocks.credentials import DeployCredentials
from portcullis.canary.analysis import CanaryPolicy
from portcullis.canary.metrics import PrometheusProvider
from portcullis.models import ImageRef
from portcullis.router_haproxy import HaproxyRouter
from tasks.canary import rollout


def main(spec_path: str) -> int:
    """Run the rollout the spec describes; exit 0 when promoted, 1 otherwise."""
    spec = json.loads(Path(spec_path).read_text())
    events = Path(spec["events"])

    def record(event: str, **details: Any) -> None:
        with events.open("a") as fh:
            fh.write(json.dumps({"event": event, **details}, default=str) + "\n")

    provider = PrometheusProvider(spec["prometheus_url"])

    def run() -> None:
        rollout(
            ImageRef.parse(spec["image"]), spec["app"], spec["environment"], spec["commit"],
            DeployCredentials.resolve(None), policy=CanaryPolicy.model_validate(spec["policy"]),
            router=HaproxyRouter(Path(spec["router_dir"])), provider=provider, record=record,
            on_inconclusive=lambda _verdict: ("rollback", "test"),
        )

    try:
        if spec.get("in_flow"):
            # Inside a flow run, as on a worker: Prefect's engine turns SIGTERM (how a
            # cancellation reaches a process) into TerminationSignal.
            flow(name="canary-child", persist_result=False)(run)()
        else:
            run()
    except BaseException as exc:  # noqa: BLE001 - the test reads what ended the run
        record("child.raised", kind=type(exc).__name__, message=str(exc))
        return 1
    finally:
        provider.close()
    record("child.promoted")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
