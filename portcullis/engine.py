"""The flow process the Portcullis worker starts: ``python -m portcullis.engine``.

Prefect's own ``python -m prefect.engine`` reads the deployment from the API, runs its pull
steps and imports the entrypoint the API names, after the worker checked them: whoever
changes the deployment in between runs their code. This entry point takes the flow from the
worker's configuration file instead (the entrypoint configured for ``--deployment``, from the
configured checkout), runs no pull step, and hands the flow run to Prefect's flow engine.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from portcullis.sides import load_worker_config


def main(argv: list[str] | None = None) -> None:
    """Run the flow run ``$PREFECT__FLOW_RUN_ID`` from the configured entrypoint."""
    parser = argparse.ArgumentParser(prog="python -m portcullis.engine")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--deployment", required=True, help="flow/deployment, a key of the file")
    args = parser.parse_args(argv)
    config = load_worker_config(args.config)
    path, _, function = config.deployments[args.deployment].partition(":")
    flow_run_id = UUID(os.environ["PREFECT__FLOW_RUN_ID"])

    from prefect._internal.control_listener import configure_from_env
    from prefect.engine import handle_engine_signals

    # As prefect.engine does: take the control channel's address before loading flow code.
    configure_from_env()
    with handle_engine_signals(flow_run_id):
        from prefect.flow_engine import load_flow_run, run_flow
        from prefect.flows import Flow, load_flow_from_entrypoint
        from prefect.logging.loggers import flow_run_logger

        flow_run = load_flow_run(flow_run_id=flow_run_id)
        logger = flow_run_logger(flow_run=flow_run)
        try:
            flow: Flow[..., Any] = load_flow_from_entrypoint(f"{config.checkout / path}:{function}",
                                             use_placeholder_flow=False)
        except Exception:
            logger.exception("could not load the configured flow %s", args.deployment)
            raise
        # Prefect's own engine passes the run's adapter too: errors then reach the run's logs.
        run_flow(flow, flow_run=flow_run, error_logger=cast(logging.Logger, logger))


if __name__ == "__main__":
    main()
