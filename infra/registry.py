"""An OCI registry on loopback: Debian's ``docker-registry`` (distribution 2.8) as a process.

The registry lives in one state directory::

    STATE/config.yml     generated configuration (mode 600: it holds the upload secret)
    STATE/htpasswd       bcrypt hashes of the accounts, when there are accounts
    STATE/registry.json  the port and accounts the running process was started with
    STATE/registry.pid   pid of the running process (written by infra.daemon)
    STATE/registry.log   what it printed
    STATE/data/          blobs and manifests

:func:`start_registry` is idempotent: a registry already running from the same state directory
with the same port and accounts is reused; one started with other settings is restarted,
because distribution reads its htpasswd file only at start-up.

Distribution's htpasswd mode authenticates but does not authorize: every account may push and
pull every repository. Read-only accounts need a token service in front of it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import httpx

from infra.daemon import running_pid, start_daemon, stop_daemon
from portcullis.errors import ConfigurationError, PortcullisError, TransientError

REGISTRY_BINARY = "docker-registry"
_NAME = "registry"
_HOST = "127.0.0.1"
# bcrypt cost for the htpasswd file. Distribution checks the hash on every request that carries
# basic credentials (about 60 ms per request at cost 10 on this machine), and a push is dozens
# of requests. The stack's passwords are random 144-bit tokens, which a slow hash cannot make
# any harder to guess, so a low cost loses nothing there.
_BCRYPT_ROUNDS = 5


@dataclass(frozen=True)
class RegistryCredentials:
    """One registry account. The password is kept out of ``repr`` so it never lands in logs."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RunningRegistry:
    """A registry process that answers on loopback."""

    url: str  # base URL, e.g. http://127.0.0.1:5000
    address: str  # host:port, the form image references use
    port: int
    pid: int
    state_dir: Path
    accounts: tuple[RegistryCredentials, ...] = ()

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


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _htpasswd(users: Mapping[str, str]) -> str:
    lines = []
    for user, password in users.items():
        if not user or ":" in user or "\n" in user:
            raise ConfigurationError(f"registry user name {user!r} is not valid in htpasswd")
        if not password:
            raise ConfigurationError(f"registry user {user!r} has an empty password")
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=_BCRYPT_ROUNDS))
        lines.append(f"{user}:{hashed.decode()}")
    return "\n".join(lines) + "\n"


def _htpasswd_matches(path: Path, users: Mapping[str, str]) -> bool:
    """Whether the htpasswd file at ``path`` holds exactly ``users`` with these passwords."""
    try:
        entries = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    except OSError:
        return not users
    if set(entries) != set(users):
        return False
    return all(bcrypt.checkpw(users[u].encode(), entries[u].encode()) for u in users)


def _config(state_dir: Path, port: int, with_auth: bool) -> str:
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
    if with_auth:
        config["auth"] = {
            "htpasswd": {"realm": "portcullis-registry", "path": str(state_dir / "htpasswd")}
        }
    # YAML is a superset of JSON, so no YAML writer is needed.
    return json.dumps(config, indent=2) + "\n"


def _recorded(state_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads((state_dir / "registry.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _result(state_dir: Path, port: int, pid: int, users: Mapping[str, str]) -> RunningRegistry:
    return RunningRegistry(
        url=f"http://{_HOST}:{port}",
        address=f"{_HOST}:{port}",
        port=port,
        pid=pid,
        state_dir=state_dir,
        accounts=tuple(RegistryCredentials(u, p) for u, p in users.items()),
    )


def start_registry(
    state_dir: Path,
    *,
    port: int | None = None,
    users: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> RunningRegistry:
    """Start a registry on ``127.0.0.1:port`` in ``state_dir``, or reuse the one running there.

    Args:
        state_dir: directory for configuration, data, pid and log files; created if missing.
        port: loopback port; None reuses the running registry's port or picks a free one.
        users: user name -> password; with any, every request needs basic credentials.
            None or empty runs an open registry.
        timeout: seconds to wait until ``/v2/`` answers.

    Returns:
        Where the registry listens and the accounts it accepts.

    Raises:
        TransientError: the process did not come up (port taken, binary crashed).
        ConfigurationError: a user name or password cannot be written to htpasswd.
    """
    users = dict(users or {})
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    pid_path = state_dir / f"{_NAME}.pid"
    recorded = _recorded(state_dir)
    pid = running_pid(pid_path)
    if pid is not None and recorded is not None:
        rec_port = recorded.get("port")
        same = (
            isinstance(rec_port, int)
            and (port is None or port == rec_port)
            and recorded.get("users") == sorted(users)
            and _htpasswd_matches(state_dir / "htpasswd", users)
        )
        if same and isinstance(rec_port, int) and _probe(f"http://{_HOST}:{rec_port}"):
            return _result(state_dir, rec_port, pid, users)
    if pid is not None:
        # Running with other settings (or not answering): distribution cannot reload
        # htpasswd, so restart it with the wanted ones.
        stop_daemon(_NAME, state_dir=state_dir)
    if port is None:
        rec_port = (recorded or {}).get("port")
        port = rec_port if isinstance(rec_port, int) else free_port()

    if users:
        _write_private(state_dir / "htpasswd", _htpasswd(users))
    else:
        (state_dir / "htpasswd").unlink(missing_ok=True)
    config_path = state_dir / "config.yml"
    _write_private(config_path, _config(state_dir, port, bool(users)))
    url = f"http://{_HOST}:{port}"
    if _probe(url):
        raise TransientError(
            f"cannot start a registry on {_HOST}:{port}: something else already answers there",
            hint="stop it or choose another port",
        )
    try:
        pid = start_daemon(
            _NAME,
            [REGISTRY_BINARY, "serve", str(config_path)],
            state_dir=state_dir,
            ready=lambda: _probe(url),
            timeout=timeout,
        )
    except FileNotFoundError:
        raise TransientError(
            f"{REGISTRY_BINARY} is not installed", hint="apt-get install -y docker-registry"
        ) from None
    except PortcullisError as exc:  # a crashed or slow start, with the log tail
        raise TransientError(
            f"the registry did not start on {_HOST}:{port}: {exc.message}", hint=exc.hint
        ) from None
    (state_dir / "registry.json").write_text(
        json.dumps({"port": port, "users": sorted(users)}) + "\n"
    )
    return _result(state_dir, port, pid, users)


def registry_running(state_dir: Path) -> bool:
    """Whether the registry of ``state_dir`` runs and answers."""
    state_dir = state_dir.resolve()
    recorded = _recorded(state_dir)
    port = (recorded or {}).get("port")
    return (
        running_pid(state_dir / f"{_NAME}.pid") is not None
        and isinstance(port, int)
        and _probe(f"http://{_HOST}:{port}")
    )


def stop_registry(state_dir: Path, *, timeout: float = 10.0) -> bool:
    """Stop the registry of ``state_dir``. Data stays. Returns True if one was running."""
    return stop_daemon(_NAME, state_dir=state_dir.resolve(), timeout=timeout)
