"""A Prefect server on loopback with its state (SQLite database, logs) in the stack directory."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from infra.daemon import start_daemon, stop_daemon


def prefect_env(state_dir: Path, port: int) -> dict[str, str]:
    """Environment for the server and for any client that should talk to it."""
    return {
        "PREFECT_HOME": str(state_dir),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        # Telemetry would try DNS on an offline machine and log an error at every start.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }


def server_answers(port: int) -> bool:
    """True when the Prefect API on ``port`` reports healthy."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_server(state_dir: Path, port: int) -> str:
    """Start ``prefect server start`` unless it answers already; return its API URL."""
    prefect = Path(sys.executable).with_name("prefect")
    env = prefect_env(state_dir, port)
    start_daemon(
        "prefect-server",
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        state_dir=state_dir,
        env=env,
        ready=lambda: server_answers(port),
        timeout=120,
    )
    return env["PREFECT_API_URL"]


def stop_server(state_dir: Path) -> bool:
    """Stop the Prefect server this stack started."""
    return stop_daemon("prefect-server", state_dir=state_dir)
