"""The production-like setup: PostgreSQL, a Prefect server on it, and one worker per pool.

Given a fresh state directory and free loopback ports, when ``up`` runs, then the API (closed
by its auth string) lists both work pools with an ONLINE worker each, every worker sees only
its own side's variables, a second ``up`` changes nothing, and ``down`` stops everything.
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
    assert_worker_side,
    down,
    status,
    up,
    worker_name,
)
from infra.registry import free_port
from portcullis.errors import ConfigurationError

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

    # Each worker has its own side's variables and its side marker, nothing of the other's.
    for side, other in (("build", "deploy"), ("deploy", "build")):
        pid = running_pid(production.state_dir / f"worker-{side}.pid")
        assert pid is not None
        env = _environ(pid)
        assert env["PORTCULLIS_WORKER_SIDE"] == side
        assert env[f"PORTCULLIS_{side.upper()}_PROBE"] == f"{side}-only"
        assert f"PORTCULLIS_{other.upper()}_PROBE" not in env
        assert env["PORTCULLIS_HOME"] == "/srv/portcullis"
        assert "PORTCULLIS_STACK_PROBE" not in env
        # One result store for both sides: how promote-dev reads the build's evidence.
        assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(production.results_dir)
        assert "PREFECT_API_DATABASE_CONNECTION_URL" not in env
        assert env["PREFECT_API_URL"] == api
        assert_worker_side(side, env)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=f"must run on the {other} side"):
            assert_worker_side(other, env)  # type: ignore[arg-type]

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
