"""An OCI registry on loopback: Debian's ``docker-registry`` (distribution 2.8) as a process,
with a token service in front that decides who may pull and who may push.

With accounts, the registry runs in distribution's ``auth: token`` mode and
:mod:`infra.registry_auth` runs next to it as its own process: the registry accepts only
tokens that service signed, and the service grants each account what its role allows (the
build account may push, the deploy account may only pull). Without accounts the registry is
open, as before.

The registry lives in one state directory::

    STATE/config.yml            generated registry configuration (mode 600: upload secret)
    STATE/registry-auth.json    token service configuration: bcrypt hashes and grants (mode 600)
    STATE/token-signing.key     the ES256 key tokens are signed with (mode 600)
    STATE/token-signing.crt     its self-signed certificate: the registry's rootcertbundle
    STATE/registry.json         port, token service port, accounts and grants in use
    STATE/registry.pid          pid of the registry (written by infra.daemon)
    STATE/registry-auth.pid     pid of the token service
    STATE/registry.log          what the registry printed
    STATE/registry-auth.log     the token service's grant/deny decisions (no secrets)
    STATE/data/                 blobs and manifests

:func:`start_registry` is idempotent: a registry (and token service) already running from the
same state directory with the same port, accounts and grants is reused; one started with other
settings is restarted, token service first, so that both read the new settings.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.daemon import running_pid, start_daemon, stop_daemon
from infra.registry_auth import (
    HEALTH_PATH,
    SERVER_NAME,
    AccountConfig,
    AuthServiceConfig,
    Grant,
    Role,
    ensure_signing_material,
    hash_password,
    load_config,
    password_matches,
    write_config,
)
from portcullis.errors import ConfigurationError, PortcullisError, TransientError
from portcullis.promotion_record import RECORDS_ROOT

REGISTRY_BINARY = "docker-registry"
_NAME = "registry"
_AUTH_NAME = "registry-auth"
_AUTH_CONFIG = "registry-auth.json"
_HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parents[1]

#: Grants for accounts when ``roles`` is not given: the stack's build account pushes, its
#: deploy account pulls, and any other account may only pull.
DEFAULT_GRANTS: Mapping[str, Grant] = {
    "builder": Grant(Role.PUSH),
    "deployer": Grant(Role.PULL),
    # The deploy side's promoter: pulls images, pushes signed promotion records only.
    "promoter": Grant(Role.PROMOTE, records=RECORDS_ROOT),
}
_DEFAULT_GRANT = Grant(Role.PULL)


@dataclass(frozen=True)
class RegistryCredentials:
    """One registry account. The password is kept out of ``repr`` so it never lands in logs."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RunningRegistry:
    """A registry process that answers on loopback (and its token service, with accounts)."""

    url: str  # base URL, e.g. http://127.0.0.1:5000
    address: str  # host:port, the form image references use
    port: int
    pid: int
    state_dir: Path
    accounts: tuple[RegistryCredentials, ...] = ()
    token_realm: str | None = None  # the token endpoint, None for an open registry
    auth_pid: int | None = None  # pid of the token service
    grants: Mapping[str, Grant] = field(default_factory=dict, hash=False)

    @property
    def credentials(self) -> RegistryCredentials | None:
        """The first account (accounts keep the order they were given in), or None if open."""
        return self.accounts[0] if self.accounts else None

    def account(self, username: str) -> RegistryCredentials:
        """The account called ``username``; :class:`ConfigurationError` if there is none."""
        for acct in self.accounts:
            if acct.username == username:
                return acct
        raise ConfigurationError(
            f"the registry at {self.address} has no account {username!r}",
            hint="pass it in users= to start_registry",
        )


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _probe(url: str) -> bool:
    """True when something that speaks the registry API answers ``/v2/``."""
    try:
        resp = httpx.get(f"{url}/v2/", timeout=2.0)
    except httpx.HTTPError:
        return False
    # 401 is a ready registry that wants credentials; the header tells it is a registry.
    return resp.status_code in (200, 401) and "docker-distribution-api-version" in resp.headers


def _probe_auth(port: int) -> bool:
    """True when the token service answers its health endpoint on ``port``."""
    try:
        resp = httpx.get(f"http://{_HOST}:{port}{HEALTH_PATH}", timeout=2.0)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and resp.headers.get("server") == SERVER_NAME


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def _grants(users: Mapping[str, str], roles: Mapping[str, Grant | Role] | None) -> dict[str, Grant]:
    """Each account's grant: ``roles`` when given (an account missing there gets nothing),
    else :data:`DEFAULT_GRANTS`."""
    for user, password in users.items():
        if not user or ":" in user or any(c.isspace() for c in user):
            raise ConfigurationError(f"registry user name {user!r} is not valid")
        if not password:
            raise ConfigurationError(f"registry user {user!r} has an empty password")
    if roles is None:
        return {u: DEFAULT_GRANTS.get(u, _DEFAULT_GRANT) for u in users}
    unknown = sorted(set(roles) - set(users))
    if unknown:
        raise ConfigurationError(
            f"roles name accounts that do not exist: {', '.join(unknown)}",
            hint="give every account in roles a password in users",
        )
    out: dict[str, Grant] = {}
    for user in users:
        role = roles.get(user, Role.NONE)
        out[user] = role if isinstance(role, Grant) else Grant(role)
    return out


def _grants_json(grants: Mapping[str, Grant]) -> dict[str, list[str]]:
    return {u: [g.role.value, g.prefix, g.records] for u, g in sorted(grants.items())}


def _accounts_match(path: Path, users: Mapping[str, str]) -> bool:
    """Whether the token service config at ``path`` holds exactly ``users`` with these
    passwords."""
    try:
        config = load_config(path)
    except ConfigurationError:
        return not users
    if set(config.accounts) != set(users):
        return False
    return all(password_matches(users[u], config.accounts[u].password_bcrypt) for u in users)


def _config(state_dir: Path, port: int, auth: AuthServiceConfig | None, cert: Path | None) -> str:
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(state_dir / "data")},
            # Deleting manifests is how a rejected image is taken out of the registry.
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        # The secret signs upload state; without one each start picks a random secret and
        # uploads in flight across a restart fail with BLOB_UPLOAD_INVALID.
        "http": {"addr": f"{_HOST}:{port}", "secret": secrets.token_urlsafe(32)},
    }
    if auth is not None and cert is not None:
        config["auth"] = {
            "token": {
                "realm": auth.realm,
                "service": auth.service,
                "issuer": auth.issuer,
                "rootcertbundle": str(cert),
            }
        }
    # YAML is a superset of JSON, so no YAML writer is needed.
    return json.dumps(config, indent=2) + "\n"


def _recorded(state_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((state_dir / "registry.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _result(
    state_dir: Path,
    port: int,
    pid: int,
    users: Mapping[str, str],
    grants: Mapping[str, Grant],
    auth_port: int | None,
    auth_pid: int | None,
) -> RunningRegistry:
    return RunningRegistry(
        url=f"http://{_HOST}:{port}",
        address=f"{_HOST}:{port}",
        port=port,
        pid=pid,
        state_dir=state_dir,
        accounts=tuple(RegistryCredentials(u, p) for u, p in users.items()),
        token_realm=f"http://{_HOST}:{auth_port}/token" if auth_port is not None else None,
        auth_pid=auth_pid,
        grants=dict(grants),
    )


def _reusable(
    state_dir: Path,
    recorded: dict[str, object] | None,
    port: int | None,
    users: Mapping[str, str],
    grants: Mapping[str, Grant],
) -> RunningRegistry | None:
    """The running registry of ``state_dir`` if it runs with exactly these settings."""
    pid = running_pid(state_dir / f"{_NAME}.pid")
    if pid is None or recorded is None:
        return None
    rec_port, rec_auth = recorded.get("port"), recorded.get("auth_port")
    if not isinstance(rec_port, int) or (port is not None and port != rec_port):
        return None
    if recorded.get("users") != sorted(users) or recorded.get("grants") != _grants_json(grants):
        return None
    auth_pid = None
    if users:
        auth_pid = running_pid(state_dir / f"{_AUTH_NAME}.pid")
        if (
            auth_pid is None
            or not isinstance(rec_auth, int)
            or not _probe_auth(rec_auth)
            or not _accounts_match(state_dir / _AUTH_CONFIG, users)
        ):
            return None
    elif rec_auth is not None:
        return None
    if not _probe(f"http://{_HOST}:{rec_port}"):
        return None
    auth_port = rec_auth if isinstance(rec_auth, int) else None
    return _result(state_dir, rec_port, pid, users, grants, auth_port, auth_pid)


def _start_token_service(state_dir: Path, auth: AuthServiceConfig, timeout: float) -> int:
    """Start the token service process for ``auth``; returns its pid."""
    if _probe_auth(auth.port):
        raise TransientError(
            f"cannot start the registry token service on {_HOST}:{auth.port}: "
            "another one already answers there",
            hint="stop it (python -m infra.stack down) or choose another state directory",
        )
    config_path = state_dir / _AUTH_CONFIG
    write_config(config_path, auth)
    # The service imports infra.registry_auth: make the repository importable whatever the
    # caller's working directory is.
    pythonpath = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        return start_daemon(
            _AUTH_NAME,
            [sys.executable, "-m", "infra.registry_auth", "--config", str(config_path)],
            state_dir=state_dir,
            ready=lambda: _probe_auth(auth.port),
            timeout=timeout,
            env={"PYTHONPATH": pythonpath},
        )
    except PortcullisError as exc:  # a crashed or slow start, with the log tail
        raise TransientError(
            f"the registry token service did not start on {_HOST}:{auth.port}: {exc.message}",
            hint=exc.hint,
        ) from None


def start_registry(
    state_dir: Path,
    *,
    port: int | None = None,
    users: Mapping[str, str] | None = None,
    roles: Mapping[str, Grant | Role] | None = None,
    timeout: float = 30.0,
) -> RunningRegistry:
    """Start a registry on ``127.0.0.1:port`` in ``state_dir``, or reuse the one running there.

    Args:
        state_dir: directory for configuration, keys, data, pid and log files; created if
            missing.
        port: loopback port; None reuses the running registry's port or picks a free one.
        users: user name -> password. With any, the registry runs in token mode behind
            :mod:`infra.registry_auth` and every request needs a token from it. None or empty
            runs an open registry.
        roles: user name -> :class:`~infra.registry_auth.Grant` (or a bare
            :class:`~infra.registry_auth.Role`, covering every repository). An account not
            named here is granted nothing. None means :data:`DEFAULT_GRANTS`: ``builder``
            pushes, ``deployer`` and any other account only pull.
        timeout: seconds to wait for each process to answer.

    Returns:
        Where the registry listens, the accounts it accepts and what each may do.

    Raises:
        TransientError: a process did not come up (port taken, binary crashed).
        ConfigurationError: a user name or password is not usable, or roles name an unknown
            account.
    """
    users = dict(users or {})
    grants = _grants(users, roles) if users else {}
    if roles and not users:
        raise ConfigurationError("roles were given for a registry without accounts")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    recorded = _recorded(state_dir)
    reused = _reusable(state_dir, recorded, port, users, grants)
    if reused is not None:
        return reused
    # Running with other settings (or not answering): restart both processes so that they
    # read the wanted ones.
    stop_daemon(_NAME, state_dir=state_dir)
    stop_daemon(_AUTH_NAME, state_dir=state_dir)
    if port is None:
        rec_port = (recorded or {}).get("port")
        port = rec_port if isinstance(rec_port, int) else free_port()
    url = f"http://{_HOST}:{port}"
    if _probe(url):
        raise TransientError(
            f"cannot start a registry on {_HOST}:{port}: something else already answers there",
            hint="stop it or choose another port",
        )

    auth: AuthServiceConfig | None = None
    cert: Path | None = None
    auth_pid: int | None = None
    if users:
        material = ensure_signing_material(state_dir)
        cert = material.cert_path
        auth = AuthServiceConfig(
            port=free_port(),
            signing_key=material.key_path,
            accounts={
                u: AccountConfig(
                    password_bcrypt=hash_password(p),
                    role=grants[u].role.value,
                    prefix=grants[u].prefix,
                    records=grants[u].records,
                )
                for u, p in users.items()
            },
        )
        # The token service first: the registry sends clients to it from its first request.
        auth_pid = _start_token_service(state_dir, auth, timeout)
    else:
        (state_dir / _AUTH_CONFIG).unlink(missing_ok=True)
    (state_dir / "htpasswd").unlink(missing_ok=True)  # left by an older, htpasswd-mode start

    config_path = state_dir / "config.yml"
    _write_private(config_path, _config(state_dir, port, auth, cert))
    try:
        pid = start_daemon(
            _NAME,
            [REGISTRY_BINARY, "serve", str(config_path)],
            state_dir=state_dir,
            ready=lambda: _probe(url),
            timeout=timeout,
        )
    except FileNotFoundError:
        stop_daemon(_AUTH_NAME, state_dir=state_dir)
        raise TransientError(
            f"{REGISTRY_BINARY} is not installed", hint="apt-get install -y docker-registry"
        ) from None
    except PortcullisError as exc:  # a crashed or slow start, with the log tail
        stop_daemon(_AUTH_NAME, state_dir=state_dir)
        raise TransientError(
            f"the registry did not start on {_HOST}:{port}: {exc.message}", hint=exc.hint
        ) from None
    auth_port = auth.port if auth is not None else None
    (state_dir / "registry.json").write_text(
        json.dumps(
            {
                "port": port,
                "auth_port": auth_port,
                "users": sorted(users),
                "grants": _grants_json(grants),
            }
        )
        + "\n"
    )
    return _result(state_dir, port, pid, users, grants, auth_port, auth_pid)


def registry_running(state_dir: Path) -> bool:
    """Whether the registry of ``state_dir`` runs and answers (with its token service, if it
    has accounts)."""
    state_dir = state_dir.resolve()
    recorded = _recorded(state_dir)
    port = (recorded or {}).get("port")
    auth_port = (recorded or {}).get("auth_port")
    if auth_port is not None and not (
        isinstance(auth_port, int)
        and running_pid(state_dir / f"{_AUTH_NAME}.pid") is not None
        and _probe_auth(auth_port)
    ):
        return False
    return (
        running_pid(state_dir / f"{_NAME}.pid") is not None
        and isinstance(port, int)
        and _probe(f"http://{_HOST}:{port}")
    )


def stop_registry(state_dir: Path, *, timeout: float = 10.0) -> bool:
    """Stop the registry of ``state_dir`` and its token service. Data and keys stay.

    Returns:
        True if either process was running.
    """
    state_dir = state_dir.resolve()
    registry = stop_daemon(_NAME, state_dir=state_dir, timeout=timeout)
    auth = stop_daemon(_AUTH_NAME, state_dir=state_dir, timeout=timeout)
    return registry or auth
