"""Flows the warm-start tests deploy on a worker of their own (tests/test_warm_start.py).

``hold`` writes ``<dir>/<run id>.pid`` (its pid and its parent's pid) and then runs until
``<dir>/<run id>.release`` exists, so a test can cancel or kill it while it runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow(name="rollback", persist_result=False)
def hold(marker_dir: str, release: bool = False) -> int:
    """Report where it runs, then wait for the test's release file."""
    markers = Path(marker_dir)
    run_id = flow_run.get_id()
    (markers / f"{run_id}.tmp").write_text(f"{os.getpid()} {os.getppid()}")
    (markers / f"{run_id}.tmp").rename(markers / f"{run_id}.pid")
    while not release and not (markers / f"{run_id}.release").exists():
        time.sleep(0.05)  # the flow under test is what waits here, not the test
    return os.getpid()


@flow(name="clear-pin", persist_result=False)
def second() -> str:
    """A second configured entrypoint: the warm parent imports every one."""
    return "ok"
