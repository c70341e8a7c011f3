"""The production-like setup: PostgreSQL, a Prefect server on it, and one worker per pool.

Given a fresh state directory and free loopback ports, when ``up`` runs, then the API (closed
by its auth string) lists both work pools (locked base job template) with an ONLINE Portcullis
worker each, every worker's configuration file holds only its own side's variables and the
worker processes none, a second ``up`` changes nothing, a changed pool template is reported and
reset only when asked, and ``down`` stops everything.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.daemon import running_pid
from infra.production import (
    POOLS,
    ProductionConfig,
    down,
    status,
    up,
    worker_config_path,
    worker_name,
)
from infra.registry import free_port
from portcullis.sides import load_worker_config
from portcullis.worker import canonical, locked_base_job_template

pytestmark = [pytest.mark.prefect_server, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture()
def production(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProductionConfig]:
    """A config on free ports; whatever ``up`` started is stopped and removed afterwards."""
    # Not under pytest's 0700 temp root: the postgres account must be able to reach its files.
    state = Path(tempfile.mkdtemp(prefix="portcullis-production-"))
    monkeypatch.setenv("PORTCULLIS_BUILD_PROBE", "build-only")
    monkeypatch.setenv("PORTCULLIS_DEPLOY_PROBE", "deploy-only")
    monkeypatch.setenv("PORTCULLIS_HOME", "/srv/portcullis")  # shared setting: seen by both
    monkeypatch.setenv("PORTCULLIS_STACK_PROBE", "local-stack-only")  # unlisted: seen by neither
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # must not leak into daemons
    config = ProductionConfig(state_dir=state, postgres_port=free_port(), prefect_port=free_port())
    try:
        yield config
    finally:
        down(config)
        shutil.rmtree(state, ignore_errors=True)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if item)
    return {k: v for k, _, v in pairs}


def test_up_brings_database_server_pools_and_workers(production: ProductionConfig) -> None:
    started = time.monotonic()
    info = up(production)
    took = time.monotonic() - started
    print(f"production up from scratch: {took:.1f}s")

    assert info.server_healthy and info.postgres_pid and info.server_pid
    secrets = json.loads((production.state_dir / "secrets.json").read_text())
    auth = base64.b64encode(secrets["api_auth_string"].encode()).decode()
    headers = {"Authorization": f"Basic {auth}"}
    api = production.api_url

    # The API is closed without the auth string, open with it.
    assert httpx.post(f"{api}/work_pools/filter", json={}, timeout=10).status_code == 401
    pools = httpx.post(f"{api}/work_pools/filter", json={}, headers=headers, timeout=10).json()
    assert {p["name"]: p["type"] for p in pools if p["name"] in POOLS.values()} == {
        "portcullis-build": "process",
        "portcullis-deploy": "process",
    }

    # Poll the API, independently of `up`, until each pool shows its worker online.
    def online() -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for side, pool in POOLS.items():
            workers = httpx.post(
                f"{api}/work_pools/{pool}/workers/filter", json={}, headers=headers, timeout=10
            ).json()
            seen[side] = {w["name"] for w in workers if w["status"] == "ONLINE"}
        return seen

    expected = {"build": {worker_name("build")}, "deploy": {worker_name("deploy")}}
    deadline = time.monotonic() + 30
    while (seen := online()) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen == expected

    # Each worker's file has its own side's variables, nothing of the other's; the worker
    # processes have no PORTCULLIS_* variable at all (the file is the authority).
    for side, other in (("build", "deploy"), ("deploy", "build")):
        path = worker_config_path(production, side)  # type: ignore[arg-type]
        assert path.stat().st_mode & 0o777 == 0o600
        config = load_worker_config(path)
        assert config.side == side and config.pool == POOLS[side]
        env = config.environment
        assert env[f"PORTCULLIS_{side.upper()}_PROBE"] == f"{side}-only"
        assert f"PORTCULLIS_{other.upper()}_PROBE" not in env
        assert env["PORTCULLIS_HOME"] == "/srv/portcullis"
        assert "PORTCULLIS_STACK_PROBE" not in env
        # Both sides append to one audit chain, each as its own role (build: audit only).
        role = {"build": "portcullis_build", "deploy": "portcullis_flows"}[side]
        assert env["PORTCULLIS_STATE_URL"].startswith(f"postgresql+psycopg://{role}@127.0.0.1:")
        assert env["PORTCULLIS_STATE_PASSWORD"] == secrets[
            {"build": "build_state_password", "deploy": "state_password"}[side]]
        pid = running_pid(production.state_dir / f"worker-{side}.pid")
        assert pid is not None
        process_env = _environ(pid)
        assert not [k for k in process_env if k.startswith("PORTCULLIS_")]
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [
            b"-m", b"portcullis.worker"]
        # One result store for both sides: how promote-dev reads the build's evidence.
        assert process_env["PREFECT_LOCAL_STORAGE_PATH"] == str(production.results_dir)
        assert "PREFECT_API_DATABASE_CONNECTION_URL" not in process_env
        assert process_env["PREFECT_API_URL"] == api
        assert (production.state_dir / f"worker-{side}.log").stat().st_mode & 0o777 == 0o600
    assert config.deployments["promote-staging/staging"] == "flows/deployed.py:promote_staging"

    # Both pools carry the locked template; a changed one is reported, reset only when asked.
    for pool in POOLS.values():
        found = httpx.get(f"{api}/work_pools/{pool}", headers=headers, timeout=10).json()
        assert canonical(found["base_job_template"]) == canonical(locked_base_job_template())
    opened = locked_base_job_template()
    opened["variables"]["properties"]["command"] = {"type": "string"}
    patched = httpx.patch(f"{api}/work_pools/{POOLS['deploy']}", headers=headers, timeout=10,
                          json={"base_job_template": opened})
    assert patched.status_code == 204, patched.text
    noted = up(production)
    assert noted.notes == ((f"work pool {POOLS['deploy']}: its base job template was changed; its "
                           "worker refuses every run until `python -m infra.production up "
                           "--reset-pools`"),)
    reset = up(production, reset_pools=True)
    assert reset.notes == ((f"work pool {POOLS['deploy']}: its base job template was changed; "
                           "reset to the locked one"),)
    assert up(production).notes == ()

    # The server really runs on PostgreSQL, as the prefect role.
    server_env = _environ(info.server_pid)
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        f"postgresql+asyncpg://prefect:{secrets['db_password']}@127.0.0.1:{production.postgres_port}/"
    )
    assert (production.state_dir / "postgres" / "data" / "PG_VERSION").exists()

    # A second `up` finds everything running and starts nothing new.
    again = up(production)
    assert (again.postgres_pid, again.server_pid) == (info.postgres_pid, info.server_pid)
    assert {w.pid for w in again.workers} == {w.pid for w in info.workers}

    stopped = down(production)
    assert stopped == ["worker-build", "worker-deploy", "prefect-server", "postgres"]
    after = status(production)
    assert not after.server_healthy and after.postgres_pid is None and after.workers == ()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api}/health", timeout=2)
