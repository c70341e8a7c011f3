"""The flow process the Portcullis worker starts: ``python -m portcullis.engine``.

Prefect's own ``python -m prefect.engine`` reads the deployment from the API, runs its pull
steps and imports the entrypoint the API names, after the worker checked them: whoever
changes the deployment in between runs their code. This entry point takes the flow from the
worker's configuration file instead (the entrypoint configured for ``--deployment``, from the
configured checkout), runs no pull step, and hands the flow run to Prefect's flow engine.
The warm start (:mod:`portcullis.zygote`) calls :func:`run_configured` in a forked child.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from portcullis.sides import WorkerConfig, load_worker_config

if TYPE_CHECKING:
    from prefect.flows import Flow


def load_configured_flow(config: WorkerConfig, deployment: str) -> Flow[..., Any]:
    """The flow object of the entrypoint ``config`` names for ``deployment`` (never the API's)."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, function = config.deployments[deployment].partition(":")
    return load_flow_from_entrypoint(f"{config.checkout / path}:{function}",
                                     use_placeholder_flow=False)


def run_configured(config: WorkerConfig, deployment: str, flow_run_id: UUID,
                   flow: Flow[..., Any] | None = None) -> None:
    """Run ``flow_run_id`` with the flow configured for ``deployment``.

    Args:
        config: the worker's configuration (read from its file).
        deployment: ``flow/deployment``, a key of ``config.deployments``.
        flow_run_id: the run to execute.
        flow: that flow, already imported (a warm start); None loads it here.
    """
    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import handle_engine_signals

    # As prefect.engine does: take the control channel's address before loading flow code.
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        from prefect.flow_engine import load_flow_run, run_flow
        from prefect.logging.loggers import flow_run_logger

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        logger = flow_run_logger(flow_run=flow_run)
        if flow is None:
            try:
                flow = load_configured_flow(config, deployment)
            except Exception:
                logger.exception("could not load the configured flow %s", deployment)
                raise
        # Prefect's own engine passes the run's adapter too: errors then reach the run's logs.
        run_flow(flow, flow_run=flow_run, error_logger=cast(logging.Logger, logger))


def main(argv: list[str] | None = None) -> None:
    """Run the flow run ``$PREFECT__FLOW_RUN_ID`` from the configured entrypoint."""
    parser = argparse.ArgumentParser(prog="python -m portcullis.engine")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--deployment", required=True, help="flow/deployment, a key of the file")
    args = parser.parse_args(argv)
    config = load_worker_config(args.config)
    run_configured(config, args.deployment, UUID(os.environ["PREFECT__FLOW_RUN_ID"]))


if __name__ == "__main__":
    main()
