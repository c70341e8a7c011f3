"""A production-like Prefect installation beside the local stack.

``python -m infra.production up`` brings up, idempotently and on loopback only:

* a private PostgreSQL cluster (Debian's ``postgresql`` binaries, ``initdb`` + ``postgres``
  in the state directory, run as the ``postgres`` user when started by root), with a
  ``prefect`` role that owns the ``prefect`` database and nothing else;
* a Prefect server against that database, its API closed by an auth string;
* the work pools ``portcullis-build`` and ``portcullis-deploy`` (type ``process``) with the
  locked base job template (:func:`portcullis.worker.locked_base_job_template`); a pool whose
  template was changed is reported, and reset only with ``up --reset-pools``;
* one Portcullis worker (``python -m portcullis.worker``) per pool, each configured by its own
  file ``<state>/worker-<side>.toml`` (0600): the build worker's flow runs get only
  ``PORTCULLIS_BUILD_*`` variables, the deploy worker's only ``PORTCULLIS_DEPLOY_*`` (plus the
  deploy-side incident, approver and canary settings); both get the shared, secret-free
  settings (:data:`SHARED_VARIABLES`: home, policy directory, trivy cache, scratch space,
  audit log, approval poll, flow code checkout) and one result store, so promote-dev on the
  deploy pool can read the evidence of the build-release run it started on the build pool.
  The worker processes themselves get no PORTCULLIS_* variable: the files are the authority.
* with ``PORTCULLIS_PRODUCTION_DEPLOY_HOSTS=b,c`` further deploy workers, one per name, each
  standing for another host: its own folder ``<state>/hosts/<name>/`` (worker file, pid, log,
  Prefect home, and its PORTCULLIS_HOME), the same server, state store and registry, polling
  only its own queue ``host-<name>`` of the deploy pool (then the first polls only
  ``default``); see docs/scaling.md, "Several deploy hosts".

``down`` stops what ``up`` started (workers, server, then the database); ``status`` reports
what runs. State (database files, generated passwords in ``secrets.json`` mode 0600, logs)
lives in ``$PORTCULLIS_PRODUCTION_HOME`` (default ``.production/`` in the repository), and
``<home>/env`` can be sourced by a client (API URL and auth string). See infra/production.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import secrets
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import URL

from infra.daemon import running_pid, start_daemon, stop_daemon, wait_until
from infra.prefect_server import prefect_env
from portcullis.errors import ConfigurationError, PortcullisError
from portcullis.sides import Side, WorkerConfig
from portcullis.state import BUILD_PRIVILEGES, FLOW_PRIVILEGES, engine_for, install_schema
from portcullis.toolrun import run_tool
from portcullis.worker import canonical, locked_base_job_template

REPO_ROOT = Path(__file__).resolve().parents[1]

SIDES: tuple[Side, ...] = ("build", "deploy")

#: Work pool of each side.
POOLS: dict[Side, str] = {"build": "portcullis-build", "deploy": "portcullis-deploy"}

#: Which PORTCULLIS_* variables of the shell running `up` go into a side's worker configuration
#: (exact names or prefixes ending "_"). Nothing else named PORTCULLIS_* reaches that side's
#: flow runs, so a build flow run cannot read deploy credentials and the other way round.
SIDE_VARIABLES: dict[Side, tuple[str, ...]] = {
    "build": ("PORTCULLIS_BUILD_",),
    "deploy": (
        "PORTCULLIS_DEPLOY_",
        "PORTCULLIS_INCIDENTS_",
        "PORTCULLIS_APPROVERS_FILE",
        # The canary's router state and metrics (locations, not secrets), deploy side only.
        "PORTCULLIS_TRAFFIC_DIR",
        "PORTCULLIS_PROMETHEUS_URL",
    ),
}

#: Settings both sides read (where state, policies, the trivy DB, scratch space, the audit log
#: and the flow code are; how often a paused approval polls). Locations and timings only:
#: a variable holding a credential never belongs here.
SHARED_VARIABLES: tuple[str, ...] = (
    "PORTCULLIS_HOME",
    "PORTCULLIS_POLICY_DIR",
    "PORTCULLIS_TRIVY_CACHE_DIR",
    "PORTCULLIS_WORK_DIR",
    "PORTCULLIS_AUDIT_LOG",
    "PORTCULLIS_APPROVAL_POLL_SECONDS",
    "PORTCULLIS_REPO_DIR",
)

#: The deployments (``flow/deployment``) each side's worker runs, and their only entrypoints
#: (as in deployments.yaml).
ENTRYPOINTS: dict[Side, dict[str, str]] = {
    "build": {"build-release/build": "flows/deployed.py:build_release"},
    "deploy": {
        "promote-dev/dev": "flows/deployed.py:promote_dev",
        "promote-staging/staging": "flows/deployed.py:promote_staging",
        "promote-prod/prod": "flows/deployed.py:promote_prod",
        "promote-dev/dev-greeter": "flows/deployed.py:promote_dev",
        "promote-staging/staging-greeter": "flows/deployed.py:promote_staging",
        "promote-prod/prod-greeter": "flows/deployed.py:promote_prod",
        "dora-report/dora": "flows/deployed.py:dora_report",
        "emergency-promote/emergency": "flows/deployed.py:emergency_promote",
        "post-incident-reviews/reviews": "flows/deployed.py:post_incident_reviews",
        "rollback/rollback": "flows/deployed.py:rollback_deployed",
        "clear-pin/clear-pin": "flows/deployed.py:clear_pin_deployed",
    },
}
DB_NAME = "prefect"
DB_ROLE = "prefect"
DB_ADMIN = "portcullis_admin"
#: Portcullis' shared state (audit chain, used codes, pins, reviews, ticket use): a database the
#: admin owns, used by deploy flows through a role that may only append audit records.
STATE_DB = "portcullis_state"
STATE_ROLE = "portcullis_flows"
#: The build side's role there: it may append audit records and read them, nothing more.
BUILD_STATE_ROLE = "portcullis_build"

# Client-side Prefect settings and database secrets that must not leak from the shell that
# runs `up` into a daemon: each daemon gets exactly the Prefect settings set here.
_NEVER_INHERITED_PREFIXES = ("PREFECT_", "PG")


def _postgres_bindir() -> Path:
    """Directory with initdb/postgres/pg_ctl/psql: ``$PORTCULLIS_PG_BINDIR``, else Debian's."""
    configured = os.environ.get("PORTCULLIS_PG_BINDIR")
    if configured:
        return Path(configured)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    raise ConfigurationError(
        "PostgreSQL server binaries (initdb, postgres) are not installed",
        hint="apt-get install -y postgresql, or set PORTCULLIS_PG_BINDIR",
    )


@dataclass(frozen=True)
class ProductionConfig:
    """Where the production-like setup keeps its state and which loopback ports it uses."""

    state_dir: Path
    postgres_port: int = 5433
    prefect_port: int = 4300
    #: Account PostgreSQL runs as when `up` runs as root (PostgreSQL refuses to run as root).
    postgres_user: str = "postgres"
    #: How often each worker asks its pool for due runs. Prefect's default, 10 s, would be
    #: most of the delay between triggering a run (or answering a wait) and its start; one
    #: query a second per worker is little for the server.
    worker_query_seconds: float = 1.0
    #: How often the server's scheduler turns deployment schedules into runs (Prefect's
    #: default: 60 s; a deployment changed in the last few seconds is scheduled sooner).
    scheduler_loop_seconds: float = 60.0
    #: How often the server revokes expired concurrency leases, a dead deploy lock holder's
    #: among them (Prefect's default: 15 s).
    repossessor_loop_seconds: float = 15.0
    #: Further deploy workers, each standing for another host: its own state folder
    #: (:meth:`host_dir`, with its own PORTCULLIS_HOME), worker file, logs and work queue
    #: (:func:`host_queue`) of the deploy pool; the same server, state database and registry.
    #: With any, the first deploy worker polls only the pool's ``default`` queue.
    deploy_hosts: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> ProductionConfig:
        """Read ``PORTCULLIS_PRODUCTION_HOME``, ``..._PG_PORT``, ``..._PREFECT_PORT`` and
        ``..._WORKER_QUERY_SECONDS`` and ``..._DEPLOY_HOSTS`` (comma-separated names)."""
        return cls(
            state_dir=Path(
                os.environ.get("PORTCULLIS_PRODUCTION_HOME", REPO_ROOT / ".production")
            ).resolve(),
            postgres_port=int(os.environ.get("PORTCULLIS_PRODUCTION_PG_PORT", "5433")),
            prefect_port=int(os.environ.get("PORTCULLIS_PRODUCTION_PREFECT_PORT", "4300")),
            worker_query_seconds=float(
                os.environ.get("PORTCULLIS_PRODUCTION_WORKER_QUERY_SECONDS", "1")
            ),
            deploy_hosts=tuple(
                name.strip()
                for name in os.environ.get("PORTCULLIS_PRODUCTION_DEPLOY_HOSTS", "").split(",")
                if name.strip()
            ),
        )

    def host_dir(self, host: str | None) -> Path:
        """The local state folder of deploy host ``host`` (None: the first host's, the state
        directory itself): its worker file, pid, log, Prefect home and PORTCULLIS_HOME."""
        return self.state_dir if host is None else self.state_dir / "hosts" / host

    @property
    def api_url(self) -> str:
        """The Prefect API this setup serves."""
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def pg_dir(self) -> Path:
        """The cluster's data directory."""
        return self.state_dir / "postgres" / "data"

    @property
    def pg_socket_dir(self) -> Path:
        """Where the cluster puts its unix socket (not the system's /var/run/postgresql)."""
        return self.state_dir / "postgres" / "run"

    @property
    def results_dir(self) -> Path:
        """Flow results both workers read: how promote-dev (deploy pool) receives the
        BuiltEvidence of the build-release run it started on the build pool."""
        return self.state_dir / "results"


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the API sees it."""

    pool: str
    name: str
    status: str
    pid: int | None


@dataclass(frozen=True)
class ProductionInfo:
    """What runs, where it listens, and the workers the API reports."""

    database: str
    postgres_pid: int | None
    api_url: str
    server_pid: int | None
    server_healthy: bool
    pools: tuple[str, ...]
    workers: tuple[WorkerInfo, ...]
    env_file: str
    #: What `up` found and did about the pools (a changed template, a reset).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Secrets:
    db_admin_password: str
    db_password: str
    api_auth_string: str
    state_password: str = ""
    build_state_password: str = ""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _secrets(state_dir: Path) -> _Secrets:
    """Passwords and the API auth string, generated once per setup, readable by the owner."""
    path = state_dir / "secrets.json"
    if path.exists():
        stored = json.loads(path.read_text())
        missing = [k for k in ("state_password", "build_state_password") if not stored.get(k)]
        if not missing:
            return _Secrets(**stored)
        # A setup from before the state database: add its passwords, keep the others.
        made = _Secrets(**{**stored, **{k: secrets.token_urlsafe(24) for k in missing}})
        _write_private(path, json.dumps(asdict(made)))
        return made
    made = _Secrets(
        db_admin_password=secrets.token_urlsafe(24),
        db_password=secrets.token_urlsafe(24),
        # Prefect compares the whole "user:password" string sent as HTTP basic auth.
        api_auth_string=f"portcullis:{secrets.token_urlsafe(24)}",
        state_password=secrets.token_urlsafe(24),
        build_state_password=secrets.token_urlsafe(24),
    )
    _write_private(path, json.dumps(asdict(made)))
    return made


def _as_db_user(config: ProductionConfig) -> tuple[list[str], pwd.struct_passwd | None]:
    """argv prefix that drops root to the database account, and that account (None: no drop)."""
    if os.geteuid() != 0:
        return [], None
    try:
        account = pwd.getpwnam(config.postgres_user)
    except KeyError:
        raise ConfigurationError(
            f"PostgreSQL must not run as root and there is no {config.postgres_user!r} account",
            hint="apt-get install -y postgresql creates it",
        ) from None
    prefix = [
        "setpriv",
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--clear-groups",
        "--",
    ]
    return prefix, account


def _check_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Refuse early when the database account cannot reach ``path`` (a 0700 parent)."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            continue
        if st.st_mode & 0o001 or (st.st_gid == account.pw_gid and st.st_mode & 0o010):
            continue
        raise ConfigurationError(
            f"the {account.pw_name} account cannot reach {path}: {parent} is mode "
            f"{st.st_mode & 0o777:o} and not its own",
            hint="put PORTCULLIS_PRODUCTION_HOME under a directory others may traverse "
            "(e.g. /srv or /tmp), or run `up` as a non-root user",
        )


def _clean_env_prefix(keep: Sequence[str], setting: Mapping[str, str]) -> list[str]:
    """``env -u NAME ...`` removing inherited variables a daemon must not see.

    ``start_daemon`` passes the caller's environment on; names (never values) of what to drop
    go on the command line. ``keep`` lists exact names or ``_``-terminated prefixes;
    ``setting`` is what the daemon is given explicitly, which is never dropped.
    """

    def kept(name: str) -> bool:
        return any(name == k or (k.endswith("_") and name.startswith(k)) for k in keep)

    drop = sorted(
        name
        for name in os.environ
        if (name.startswith("PORTCULLIS_") or name.startswith(_NEVER_INHERITED_PREFIXES))
        and not kept(name)
        and name not in setting
    )
    argv = ["env"]
    for name in drop:
        argv += ["-u", name]
    return argv


def _pg_ready(config: ProductionConfig) -> bool:
    result = run_tool(
        [
            str(_postgres_bindir() / "pg_isready"),
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            str(config.postgres_port),
            "-d",
            "postgres",
        ],
        timeout=5,
        check=False,
    )
    return result.returncode == 0


def _psql(config: ProductionConfig, password: str, sql: str) -> str:
    """Run ``sql`` (on stdin, where passwords may appear) as the cluster's admin."""
    result = run_tool(
        [
            str(_postgres_bindir() / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(config.postgres_port),
            "-U",
            DB_ADMIN,
            "-d",
            "postgres",
            "-tA",
        ],
        timeout=30,
        secret_env={"PGPASSWORD": password},
        stdin=sql.encode(),
    )
    return result.stdout.decode().strip()


def _ensure_postgres(config: ProductionConfig, made: _Secrets) -> int:
    bindir = _postgres_bindir()
    drop_root, account = _as_db_user(config)
    pg_home = config.pg_dir.parent
    pg_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    config.pg_socket_dir.mkdir(mode=0o700, exist_ok=True)
    if account is not None:
        _check_reachable(pg_home, account)
        for path in (pg_home, config.pg_socket_dir):
            os.chown(path, account.pw_uid, account.pw_gid)
    if not (config.pg_dir / "PG_VERSION").exists():
        # initdb reads the admin password from a file; it exists only while initdb runs.
        pwfile = pg_home / "initdb-password"
        _write_private(pwfile, made.db_admin_password)
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        try:
            run_tool(
                [
                    *drop_root,
                    str(bindir / "initdb"),
                    "-D",
                    str(config.pg_dir),
                    "-U",
                    DB_ADMIN,
                    f"--pwfile={pwfile}",
                    # Passwords even over the local socket: no peer trust for other accounts.
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
    pid = start_daemon(
        "postgres",
        [
            *drop_root,
            str(bindir / "postgres"),
            "-D",
            str(config.pg_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={config.postgres_port}",
            "-c",
            f"unix_socket_directories={config.pg_socket_dir}",
        ],
        state_dir=config.state_dir,
        ready=lambda: _pg_ready(config),
        timeout=60,
    )
    # Least privilege: Prefect logs in as a role that owns its database and nothing else.
    _psql(config, made.db_admin_password, _role_and_database(DB_ROLE, made.db_password, DB_NAME, DB_ROLE))
    return pid


def _role_and_database(role: str, password: str, database: str, owner: str) -> str:
    """SQL creating login ``role`` and ``database`` owned by ``owner``, each only if missing."""
    # \gexec runs the generated statement only when the role or database is missing.
    return f"""
SELECT format('CREATE ROLE {role} LOGIN PASSWORD %L', '{password}')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') \\gexec
SELECT 'CREATE DATABASE {database} OWNER {owner}'
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '{database}') \\gexec
"""


def state_url(config: ProductionConfig, role: str = STATE_ROLE, password: str | None = None) -> URL:
    """The state database's URL for ``role`` (password only in the URL object, never printed)."""
    return URL.create(
        "postgresql+psycopg",
        username=role,
        password=password,
        host="127.0.0.1",
        port=config.postgres_port,
        database=STATE_DB,
    )


def _ensure_state_database(config: ProductionConfig, made: _Secrets) -> None:
    """The state database, its tables, append-only triggers and the flows' role (idempotent)."""
    _psql(
        config,
        made.db_admin_password,
        _role_and_database(STATE_ROLE, made.state_password, STATE_DB, DB_ADMIN)
        + _role_and_database(BUILD_STATE_ROLE, made.build_state_password, STATE_DB, DB_ADMIN)
        + f"REVOKE ALL ON DATABASE {STATE_DB} FROM PUBLIC;\n"
        f"GRANT CONNECT ON DATABASE {STATE_DB} TO {STATE_ROLE}, {BUILD_STATE_ROLE};\n",
    )
    admin = engine_for(state_url(config, DB_ADMIN, made.db_admin_password), create_schema=False)
    install_schema(admin, {STATE_ROLE: FLOW_PRIVILEGES, BUILD_STATE_ROLE: BUILD_PRIVILEGES})


def state_urls(config: ProductionConfig) -> tuple[URL, URL]:
    """The state database's URL for the deploy flows' role and for the admin, passwords in
    the URL objects only (never render them with the password)."""
    made = _secrets(config.state_dir)
    return (
        state_url(config, STATE_ROLE, made.state_password),
        state_url(config, DB_ADMIN, made.db_admin_password),
    )


def ensure_state_store(config: ProductionConfig) -> tuple[URL, URL]:
    """Only the database part of :func:`up`: the cluster and the state database (idempotent).

    Returns:
        the state database's URL for the flows' role and for the admin, passwords included
        (in the URL objects only: never render them with the password).
    """
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.state_dir.chmod(0o711)
    made = _secrets(config.state_dir)
    _ensure_postgres(config, made)
    _ensure_state_database(config, made)
    return state_urls(config)


def _auth_headers(auth_string: str) -> dict[str, str]:
    token = base64.b64encode(auth_string.encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _api(config: ProductionConfig, made: _Secrets) -> httpx.Client:
    return httpx.Client(
        base_url=config.api_url, headers=_auth_headers(made.api_auth_string), timeout=10
    )


def _server_healthy(config: ProductionConfig) -> bool:
    try:
        return httpx.get(f"{config.api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _client_env(config: ProductionConfig, made: _Secrets, home: Path) -> dict[str, str]:
    env = prefect_env(home, config.prefect_port)
    env["PREFECT_API_AUTH_STRING"] = made.api_auth_string
    return env


def _ensure_server(config: ProductionConfig, made: _Secrets) -> int:
    home = config.state_dir / "prefect"
    env = prefect_env(home, config.prefect_port)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
        f"postgresql+asyncpg://{DB_ROLE}:{made.db_password}"
        f"@127.0.0.1:{config.postgres_port}/{DB_NAME}"
    )
    env["PREFECT_SERVER_API_AUTH_STRING"] = made.api_auth_string
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = f"{config.scheduler_loop_seconds:g}"
    env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] = f"{config.repossessor_loop_seconds:g}"
    prefect = Path(sys.executable).with_name("prefect")
    return start_daemon(
        "prefect-server",
        [
            *_clean_env_prefix(keep=(), setting=env),
            str(prefect),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(config.prefect_port),
        ],
        state_dir=config.state_dir,
        env=env,
        ready=lambda: _server_healthy(config),
        timeout=180,
    )


def _ensure_pool(config: ProductionConfig, made: _Secrets, pool: str, reset: bool) -> str | None:
    """Create ``pool`` with the locked template; report (and, when ``reset``, undo) a change."""
    locked = locked_base_job_template()
    with _api(config, made) as api:
        found = api.get(f"/work_pools/{pool}")
        if found.status_code == 404:
            created = api.post("/work_pools/", json={
                "name": pool, "type": "process", "base_job_template": locked})
            if created.status_code not in (200, 201):
                raise PortcullisError(
                    f"creating work pool {pool} failed: HTTP {created.status_code} {created.text[:300]}")
            return None
        if found.status_code != 200:
            raise PortcullisError(
                f"reading work pool {pool} from {config.api_url} failed: HTTP {found.status_code}",
                hint=f"see {config.state_dir / 'prefect-server.log'}",
            )
        if canonical(found.json().get("base_job_template")) == canonical(locked):
            return None
        if not reset:
            return (f"work pool {pool}: its base job template was changed; its worker refuses "
                    "every run until `python -m infra.production up --reset-pools`")
        patched = api.patch(f"/work_pools/{pool}", json={"base_job_template": locked})
        if patched.status_code not in (200, 204):
            raise PortcullisError(f"resetting work pool {pool} failed: HTTP {patched.status_code}")
        return f"work pool {pool}: its base job template was changed; reset to the locked one"


def _ensure_host_queues(config: ProductionConfig, made: _Secrets) -> None:
    """The deploy pool's queue of each further deploy host (a worker does not create them)."""
    with _api(config, made) as api:
        for host in config.deploy_hosts:
            created = api.post(f"/work_pools/{POOLS['deploy']}/queues",
                               json={"name": host_queue(host)})
            if created.status_code not in (200, 201, 409):  # 409: it exists
                raise PortcullisError(f"creating work queue {host_queue(host)} failed: "
                                      f"HTTP {created.status_code} {created.text[:300]}")


def worker_name(side: Side, host: str | None = None) -> str:
    """The name this host's worker for ``side`` (or deploy host ``host``'s) registers under."""
    return f"{side}-{socket.gethostname()}" + (f"-{host}" if host else "")


def host_queue(host: str) -> str:
    """The deploy pool's work queue only deploy host ``host`` polls: a run created with
    ``work_queue_name=host_queue(host)`` runs there."""
    return f"host-{host}"


def _workers(config: ProductionConfig, made: _Secrets, pool: str) -> list[dict[str, Any]]:
    with _api(config, made) as api:
        response = api.post(f"/work_pools/{pool}/workers/filter", json={})
    if response.status_code != 200:
        return []
    return [w for w in response.json() if isinstance(w, dict)]


def _worker_online(config: ProductionConfig, made: _Secrets, side: Side,
                   host: str | None = None) -> bool:
    return any(
        w.get("name") == worker_name(side, host) and w.get("status") == "ONLINE"
        for w in _workers(config, made, POOLS[side])
    )


def _worker_env(config: ProductionConfig, made: _Secrets, side: Side,
                host: str | None = None) -> dict[str, str]:
    """The Prefect settings a worker gets (its flow runs get them too); no PORTCULLIS_*."""
    env = _client_env(config, made, config.host_dir(host) / f"worker-{side}")
    env["PREFECT_WORKER_QUERY_SECONDS"] = f"{config.worker_query_seconds:g}"
    # One result store for both sides. Only flows that ask for it persist their result
    # (build-release does); task results stay in memory, so nothing a deploy task returns is
    # written where the build side could read it.
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(config.results_dir)
    return env


def worker_config_path(config: ProductionConfig, side: Side, host: str | None = None) -> Path:
    """Where ``up`` writes the configuration file of ``side``'s worker (on deploy host ``host``)."""
    return config.host_dir(host) / f"worker-{side}.toml"


def _queues(config: ProductionConfig, side: Side, host: str | None) -> tuple[str, ...]:
    if host is not None:
        return (host_queue(host),)
    # With further deploy hosts, runs steered to one of them must not be taken by this one.
    return ("default",) if side == "deploy" and config.deploy_hosts else ()


def worker_config(config: ProductionConfig, side: Side,
                  environ: Mapping[str, str] | None = None, *,
                  host: str | None = None) -> WorkerConfig:
    """``side``'s worker configuration, from the PORTCULLIS_* settings of ``environ`` (default:
    the environment `up` runs in) that :data:`SIDE_VARIABLES` / :data:`SHARED_VARIABLES` allow.

    For deploy host ``host`` (one of :attr:`ProductionConfig.deploy_hosts`) the same settings,
    but its own PORTCULLIS_HOME in its folder: local state (lock heartbeats, router state,
    sources, scratch space) is per host; the state store is the shared one.
    """
    env = os.environ if environ is None else environ
    keep = SIDE_VARIABLES[side] + SHARED_VARIABLES
    chosen = {k: v for k, v in env.items() if k.startswith("PORTCULLIS_")
              and any(k == p or (p.endswith("_") and k.startswith(p)) for p in keep)}
    if host is not None:
        chosen["PORTCULLIS_HOME"] = str(config.host_dir(host) / "home")
    return WorkerConfig(
        side=side, pool=POOLS[side], name=worker_name(side, host),
        queues=_queues(config, side, host),
        checkout=Path(chosen.get("PORTCULLIS_REPO_DIR", REPO_ROOT)).resolve(),
        deployments=ENTRYPOINTS[side], environment=chosen | _state_settings(config, side),
        # Warm by default (runs start in about a second); PORTCULLIS_PRODUCTION_WORKER_START=cold
        # gives each run a fresh interpreter.
        start="cold" if os.environ.get("PORTCULLIS_PRODUCTION_WORKER_START") == "cold" else "warm",
    )


def _state_settings(config: ProductionConfig, side: Side) -> dict[str, str]:
    """Where ``side``'s flows reach the shared state store, as which role, and the password.

    One audit chain for both sides; only the deploy side's role may touch anything else (used
    codes, pins, reviews, tickets).
    """
    made = _secrets(config.state_dir)
    role, password = {
        "build": (BUILD_STATE_ROLE, made.build_state_password),
        "deploy": (STATE_ROLE, made.state_password),
    }[side]
    return {"PORTCULLIS_STATE_URL": state_url(config, role).render_as_string(),
            "PORTCULLIS_STATE_PASSWORD": password}


def _ensure_worker(config: ProductionConfig, made: _Secrets, side: Side,
                   host: str | None = None) -> int:
    env = _worker_env(config, made, side, host)
    config.results_dir.mkdir(mode=0o700, exist_ok=True)
    folder = config.host_dir(host)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = worker_config_path(config, side, host)
    if running_pid(folder / f"worker-{side}.pid") is None:
        # Rewritten only when the worker (re)starts: a running worker keeps its file.
        _write_private(path, worker_config(config, side, host=host).to_toml())
    return start_daemon(
        f"worker-{side}",
        [
            *_clean_env_prefix(keep=(), setting=env),
            sys.executable,
            "-m",
            "portcullis.worker",
            "--side",
            side,
            "--config",
            str(path),
        ],
        state_dir=folder,
        env=env,
        ready=lambda: _worker_online(config, made, side, host),
        timeout=120,
    )


def up(config: ProductionConfig, *, reset_pools: bool = False) -> ProductionInfo:
    """Bring everything up (idempotent) and report what runs.

    Args:
        config: where and on which ports.
        reset_pools: put the locked base job template back on a pool whose template was
            changed (otherwise only reported in :attr:`ProductionInfo.notes`).
    """
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # Traversable (not listable) so the database account can reach its own subdirectory.
    config.state_dir.chmod(0o711)
    made = _secrets(config.state_dir)
    _ensure_postgres(config, made)
    _ensure_state_database(config, made)
    _ensure_server(config, made)
    notes = [note for side in SIDES
             if (note := _ensure_pool(config, made, POOLS[side], reset_pools)) is not None]
    _ensure_host_queues(config, made)
    # Side by side: each worker spends its first seconds importing and registering, and none
    # waits for another.
    workers: list[tuple[Side, str | None]] = [(side, None) for side in SIDES]
    workers += [("deploy", host) for host in config.deploy_hosts]
    with ThreadPoolExecutor(max_workers=len(workers)) as starting:
        for started in [starting.submit(_ensure_worker, config, made, side, host)
                        for side, host in workers]:
            started.result()
    env_lines = [
        f"export PREFECT_API_URL={config.api_url!r}",
        f"export PREFECT_API_AUTH_STRING={made.api_auth_string!r}",
    ]
    _write_private(config.state_dir / "env", "\n".join(env_lines) + "\n")
    return replace(status(config), notes=tuple(notes))


def status(config: ProductionConfig) -> ProductionInfo:
    """What runs now, as the pid files and the Prefect API report it."""
    made = _secrets(config.state_dir) if (config.state_dir / "secrets.json").exists() else None
    healthy = _server_healthy(config)
    pools: list[str] = []
    workers: list[WorkerInfo] = []
    if healthy and made is not None:
        for side in SIDES:
            with _api(config, made) as api:
                if api.get(f"/work_pools/{POOLS[side]}").status_code != 200:
                    continue
            pools.append(POOLS[side])
            hosts = {worker_name(side): None} | (
                {worker_name(side, h): h for h in config.deploy_hosts} if side == "deploy" else {})
            for w in _workers(config, made, POOLS[side]):
                name = str(w.get("name"))
                pid = (running_pid(config.host_dir(hosts[name]) / f"worker-{side}.pid")
                       if name in hosts else None)
                workers.append(
                    WorkerInfo(POOLS[side], str(w.get("name")), str(w.get("status")), pid)
                )
    return ProductionInfo(
        database=f"postgresql://{DB_ROLE}@127.0.0.1:{config.postgres_port}/{DB_NAME}",
        postgres_pid=running_pid(config.state_dir / "postgres.pid"),
        api_url=config.api_url,
        server_pid=running_pid(config.state_dir / "prefect-server.pid"),
        server_healthy=healthy,
        pools=tuple(pools),
        workers=tuple(workers),
        env_file=str(config.state_dir / "env"),
    )


def down(config: ProductionConfig) -> list[str]:
    """Stop workers, then the server, then the database. Returns what was stopped."""
    stopped = []
    for host in config.deploy_hosts:
        if stop_daemon("worker-deploy", state_dir=config.host_dir(host)):
            stopped.append(f"worker-deploy ({host})")
    for side in SIDES:
        if stop_daemon(f"worker-{side}", state_dir=config.state_dir):
            stopped.append(f"worker-{side}")
    if stop_daemon("prefect-server", state_dir=config.state_dir):
        stopped.append("prefect-server")
    pid_file = config.state_dir / "postgres.pid"
    if running_pid(pid_file) is not None:
        drop_root, _ = _as_db_user(config)
        # A fast shutdown (roll back sessions, checkpoint) instead of waiting for clients.
        run_tool(
            [
                *drop_root,
                str(_postgres_bindir() / "pg_ctl"),
                "stop",
                "-D",
                str(config.pg_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
            ],
            timeout=45,
            check=False,
        )
        wait_until(lambda: running_pid(pid_file) is None, timeout=10)
        stop_daemon("postgres", state_dir=config.state_dir)
        stopped.append("postgres")
    return stopped


def _describe(info: ProductionInfo) -> str:
    lines = [
        f"postgresql      {info.database}  (pid {info.postgres_pid or 'not running'})",
        (
            f"prefect server  {info.api_url}  "
            f"({'healthy' if info.server_healthy else 'not answering'}, pid {info.server_pid})"
        ),
        f"work pools      {', '.join(info.pools) or 'none'}",
    ]
    for w in info.workers:
        lines.append(f"worker          {w.pool}: {w.name} {w.status} (pid {w.pid})")
    lines.append(f"environment     source {info.env_file}")
    lines += [f"NOTE            {note}" for note in info.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m infra.production up|down|status [--json]``."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.production",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--reset-pools", action="store_true",
                        help="up: put the locked base job template back on a changed pool")
    args = parser.parse_args(argv)
    config = ProductionConfig.from_env()
    try:
        if args.command == "down":
            stopped = down(config)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
            return 0
        info = up(config, reset_pools=args.reset_pools) if args.command == "up" else status(config)
    except PortcullisError as exc:
        print(f"production {args.command} failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(info), indent=2) if args.json else _describe(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
