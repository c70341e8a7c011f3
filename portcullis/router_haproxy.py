"""HAProxy as the traffic router of a Docker host: the product side of the canary router.

One HAProxy process routes every app and environment: each gets a frontend on its own port
and a backend with exactly two servers, ``stable`` and ``canary``, pointing at 127.0.0.1
ports (containers run with ``--network host``). The canary's share of the traffic is the
servers' weights: ``canary = N`` and ``stable = 100 - N``.

Three layers, from pure to live:

* :func:`render_config` turns :class:`RouterSettings` into ``haproxy.cfg`` (pure).
* :class:`RuntimeApi` speaks HAProxy's runtime API over the admin stats socket: weights,
  addresses and maintenance change live, without a reload and without dropping a connection.
* :class:`HaproxyRouter` keeps the desired state in ``router.json`` inside its state
  directory, applies changes through the runtime API, and re-renders + reloads seamlessly
  (``-x`` hands the listening sockets over, ``-sf`` lets the old process finish its
  connections) only when the set of routes changes. Because every runtime change is also
  written to ``router.json``, a reload renders the same weights and addresses the running
  process had. It implements :class:`portcullis.targets.TrafficRouter`.

Starting and stopping the HAProxy process (and choosing its stats and syslog ports) is the
local stack's business: ``infra/haproxy.py``.

HAProxy also serves its Prometheus exporter on a separate stats frontend (``/metrics``) and
sends one log line per request (:data:`LOG_FORMAT`) to the latency exporter (UDP syslog on
loopback).
"""

from __future__ import annotations

import fcntl
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import assert_never

from pydantic import Field, field_validator

from portcullis.errors import ConfigurationError, ToolError, TransientError
from portcullis.models import Frozen
from portcullis.toolrun import run_tool

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/?&=%-]*$")
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

LOG_TAG = "portcullis-v1"
"""Marks our lines in the syslog stream; bump it when the format changes."""

LOG_FORMAT = f"{LOG_TAG} proxy=%b server=%s status=%ST tr=%Tr tt=%Tt"
"""HAProxy ``log-format`` of every request (infra/latency_exporter.py parses these lines)."""


class ServerRole(StrEnum):
    """The two servers of every backend."""

    STABLE = "stable"
    CANARY = "canary"


def backend_name(app: str, environment: str) -> str:
    """HAProxy backend name for an app in an environment (``app.environment``)."""
    return f"{app}.{environment}"


class Route(Frozen):
    """Desired routing for one app in one environment."""

    app: str
    environment: str
    listen_port: int = Field(ge=1, le=65535, description="port of the app's frontend")
    stable_port: int = Field(ge=1, le=65535, description="127.0.0.1 port of the stable version")
    canary_port: int | None = Field(
        default=None, ge=1, le=65535, description="127.0.0.1 port of the canary; None: no canary"
    )
    canary_weight: int = Field(default=0, ge=0, le=100, description="percent of traffic")
    health_path: str = Field(default="/", description="HTTP path of the health check")
    bind_address: str = Field(default="127.0.0.1", description="address the frontend binds")

    @field_validator("app", "environment")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} must match {_NAME_RE.pattern} to be an HAProxy name")
        return value

    @field_validator("health_path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if not _PATH_RE.fullmatch(value):
            raise ValueError(f"health path {value!r} must be a plain absolute URL path")
        return value

    @property
    def backend(self) -> str:
        """The HAProxy backend name (also the ``proxy`` label in metrics)."""
        return backend_name(self.app, self.environment)

    def weight_of(self, role: ServerRole) -> int:
        """The HAProxy weight the given server should carry."""
        match role:
            case ServerRole.CANARY:
                return self.canary_weight
            case ServerRole.STABLE:
                return 100 - self.canary_weight
            case _:
                assert_never(role)


class RouterSettings(Frozen):
    """Everything :func:`render_config` needs; persisted as ``router.json``."""

    stats_port: int = Field(ge=1, le=65535, description="port of /metrics (Prometheus exporter)")
    syslog_port: int = Field(ge=1, le=65535, description="UDP port of the latency exporter")
    routes: tuple[Route, ...] = ()

    def find(self, app: str, environment: str) -> Route | None:
        """The route of an app in an environment, if configured."""
        name = backend_name(app, environment)
        return next((r for r in self.routes if r.backend == name), None)

    def with_route(self, route: Route) -> RouterSettings:
        """A copy with ``route`` added or replacing the route of the same backend."""
        others = tuple(r for r in self.routes if r.backend != route.backend)
        return self.model_copy(update={"routes": (*others, route)})


def render_config(settings: RouterSettings, socket_path: Path) -> str:
    """Render ``haproxy.cfg`` for the given routes.

    Args:
        settings: ports and routes.
        socket_path: where the admin runtime-API socket goes.

    Returns:
        The configuration text.
    """
    listen_ports = [r.listen_port for r in settings.routes] + [settings.stats_port]
    if len(set(listen_ports)) != len(listen_ports):
        raise ConfigurationError(
            f"two frontends would listen on the same port: {sorted(listen_ports)}",
            hint="give every app/environment its own listen port",
        )
    lines = [
        "# Rendered by portcullis/router_haproxy.py from router.json; edits here are overwritten.",
        "global",
        f"    log 127.0.0.1:{settings.syslog_port} len 2048 local0 info",
        # expose-fd listeners lets a reload take over the listening sockets (-x): no refused
        # connections while the new process starts.
        f"    stats socket {socket_path} mode 600 level admin expose-fd listeners",
        "    stats timeout 10s",
        "    maxconn 4096",
        "    hard-stop-after 30s",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-request 10s",
        "    timeout queue 5s",
        "    timeout http-keep-alive 10s",
        # On a reload the old process would close idle client connections at once, and a
        # client sending its next request at that instant sees a reset. Instead it answers
        # that next request itself, with "Connection: close".
        "    option idle-close-on-response",
        # A refused connection is retried, then sent to the other server: a container swap
        # never surfaces to clients. The failed attempt still counts as that server's error.
        "    retries 2",
        "    option redispatch",
        "    default-server inter 1s fall 2 rise 2",
        "",
        "frontend portcullis-stats",
        f"    bind 127.0.0.1:{settings.stats_port}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    monitor-uri /healthz",
    ]
    for route in sorted(settings.routes, key=lambda r: r.backend):
        canary_port = route.canary_port or route.stable_port
        # Without a canary the server still needs an address: it points at stable, disabled.
        canary_state = "" if route.canary_port else " disabled"
        lines += [
            "",
            f"frontend fe.{route.backend}",
            f"    bind {route.bind_address}:{route.listen_port}",
            "    log global",
            f'    log-format "{LOG_FORMAT}"',
            f"    default_backend {route.backend}",
            "",
            f"backend {route.backend}",
            "    balance roundrobin",
            f"    option httpchk GET {route.health_path}",
            (
                f"    server {ServerRole.STABLE.value} 127.0.0.1:{route.stable_port} "
                f"weight {route.weight_of(ServerRole.STABLE)} check"
            ),
            (
                f"    server {ServerRole.CANARY.value} 127.0.0.1:{canary_port} "
                f"weight {route.weight_of(ServerRole.CANARY)} check{canary_state}"
            ),
        ]
    return "\n".join(lines) + "\n"


# --- runtime API ---------------------------------------------------------------------------------


class OperationalState(IntEnum):
    """``srv_op_state`` of ``show servers state``."""

    STOPPED = 0
    STARTING = 1
    RUNNING = 2
    STOPPING = 3


_ADMIN_MAINT = 0x01 | 0x02 | 0x20  # forced, inherited, DNS-resolution maintenance
_ADMIN_DRAIN = 0x08 | 0x10  # forced, inherited drain


class ServerState(Frozen):
    """One server as the running HAProxy sees it."""

    backend: str
    server: str
    address: str
    port: int
    operational: OperationalState
    admin_flags: int
    weight: int
    initial_weight: int

    @property
    def in_maintenance(self) -> bool:
        """The server is administratively out of rotation."""
        return bool(self.admin_flags & _ADMIN_MAINT)

    @property
    def draining(self) -> bool:
        """The server takes no new connections but finishes the current ones."""
        return bool(self.admin_flags & _ADMIN_DRAIN)

    @property
    def up(self) -> bool:
        """Health checks pass and the server is not in maintenance."""
        return self.operational is OperationalState.RUNNING and not self.in_maintenance


class RuntimeApi:
    """Client of HAProxy's runtime API on its admin stats socket.

    Args:
        socket_path: path of the ``stats socket ... level admin``.
        timeout: seconds per command.
    """

    def __init__(self, socket_path: Path, *, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def command(self, line: str) -> str:
        """Send one command and return HAProxy's answer (stripped).

        Raises:
            TransientError: the socket is missing or does not answer (HAProxy not running).
        """
        if "\n" in line or ";" in line:
            raise ValueError("one runtime-API command at a time, without newlines or ';'")
        chunks: list[bytes] = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(line.encode() + b"\n")
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise TransientError(
                f"HAProxy's runtime API at {self.socket_path} did not answer {line!r}: {exc}",
                hint="check that the router's HAProxy is running",
            ) from exc
        return b"".join(chunks).decode(errors="replace").strip()

    def _expect_empty(self, line: str) -> None:
        answer = self.command(line)
        if answer:
            raise ConfigurationError(
                f"HAProxy refused {line!r}: {answer}",
                hint="check the backend and server names against the router's routes",
            )

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        """Set a server's weight (0-256) live."""
        if not 0 <= weight <= 256:
            raise ValueError(f"HAProxy weights are 0-256, got {weight}")
        self._expect_empty(f"set weight {backend}/{server} {weight}")

    def get_weight(self, backend: str, server: str) -> int:
        """The server's current weight."""
        line = f"get weight {backend}/{server}"
        answer = self.command(line)
        match = re.match(r"^(\d+) \(initial \d+\)", answer)
        if match is None:
            raise ConfigurationError(f"HAProxy refused {line!r}: {answer}")
        return int(match[1])

    def set_server_addr(self, backend: str, server: str, address: str, port: int) -> None:
        """Point a server at another address and port live (new connections go there)."""
        line = f"set server {backend}/{server} addr {address} port {port}"
        answer = self.command(line)
        if "changed" not in answer and "no need to change" not in answer:
            raise ConfigurationError(f"HAProxy refused {line!r}: {answer}")

    def enable_server(self, backend: str, server: str) -> None:
        """Take a server out of maintenance (it rejoins once its health check passes)."""
        self._expect_empty(f"set server {backend}/{server} state ready")

    def disable_server(self, backend: str, server: str) -> None:
        """Put a server into maintenance: no new requests reach it."""
        self._expect_empty(f"set server {backend}/{server} state maint")

    def server_state(self, backend: str, server: str) -> ServerState:
        """Address, health, maintenance flags and weights of one server."""
        line = f"show servers state {backend}"
        answer = self.command(line)
        rows = answer.splitlines()
        header = next((r for r in rows if r.startswith("# be_id")), None)
        if header is None:
            raise ConfigurationError(f"HAProxy refused {line!r}: {answer}")
        columns = header[2:].split()
        for row in rows:
            if row.startswith("#") or len(row.split()) != len(columns):
                continue
            fields = dict(zip(columns, row.split(), strict=True))
            if fields["srv_name"] == server:
                return ServerState(
                    backend=backend,
                    server=server,
                    address=fields["srv_addr"],
                    port=int(fields["srv_port"]),
                    operational=OperationalState(int(fields["srv_op_state"])),
                    admin_flags=int(fields["srv_admin_state"]),
                    weight=int(fields["srv_uweight"]),
                    initial_weight=int(fields["srv_iweight"]),
                )
        raise ConfigurationError(f"backend {backend!r} has no server {server!r}")


# --- the router ---------------------------------------------------------------------------------


class HaproxyRouter:
    """The HAProxy router of every app/environment, kept in one state directory.

    Files in ``state_dir``: ``router.json`` (desired state, the source of truth),
    ``haproxy.cfg`` (rendered from it), ``haproxy.pid``, ``admin.sock``, ``router.lock``.
    Every change takes the lock, so flows in several processes can share one router.

    Args:
        state_dir: the router's directory; created if missing.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / "admin.sock"
        if len(str(self.socket_path)) > _SOCKET_PATH_MAX:
            raise ConfigurationError(
                f"the router's socket path {self.socket_path} is longer than a unix socket "
                f"allows ({_SOCKET_PATH_MAX} bytes)",
                hint="use a shorter state directory",
            )
        self.runtime = RuntimeApi(self.socket_path)
        self._settings_path = state_dir / "router.json"
        self._config_path = state_dir / "haproxy.cfg"
        self._pid_path = state_dir / "haproxy.pid"

    # -- state ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "router.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def settings(self) -> RouterSettings:
        """The desired state as last written.

        Raises:
            ConfigurationError: the router was never started in this directory.
        """
        if not self._settings_path.exists():
            raise ConfigurationError(
                f"no router has been started in {self.state_dir}",
                hint="start the router first (locally: python -m infra.stack up)",
            )
        return RouterSettings.model_validate_json(self._settings_path.read_text())

    def _save(self, settings: RouterSettings) -> None:
        tmp = self._settings_path.with_suffix(".json.tmp")
        tmp.write_text(settings.model_dump_json(indent=2))
        tmp.replace(self._settings_path)

    @property
    def stats_target(self) -> str:
        """``host:port`` of HAProxy's ``/metrics`` for Prometheus to scrape."""
        return f"127.0.0.1:{self.settings().stats_port}"

    def route(self, app: str, environment: str) -> Route:
        """The configured route of an app in an environment.

        Raises:
            ConfigurationError: there is none.
        """
        return self._route_in(self.settings(), app, environment)

    # -- process ----------------------------------------------------------------------------

    def pid(self) -> int | None:
        """PID of the running HAProxy, or None when it is not running."""
        try:
            pid = int(self._pid_path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        # A recycled PID belongs to another program; a zombie has exited already.
        if comm != "haproxy" or stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return pid

    def running(self) -> bool:
        """HAProxy is running and its runtime API answers."""
        if self.pid() is None:
            return False
        try:
            self.runtime.command("show info")
        except TransientError:
            return False
        return True

    def _write_config(self, settings: RouterSettings) -> None:
        text = render_config(settings, self.socket_path)
        candidate = self._config_path.with_suffix(".cfg.new")
        candidate.write_text(text)
        try:
            run_tool(["haproxy", "-c", "-q", "-f", str(candidate)], timeout=15)
        except ToolError as exc:
            raise ConfigurationError(
                f"the rendered HAProxy configuration is invalid: {exc.stderr.strip()[-1000:]}",
                hint=f"inspect {candidate}; the running router was left unchanged",
            ) from None
        candidate.replace(self._config_path)

    def _apply(self, settings: RouterSettings) -> None:
        """Render, validate and (re)load HAProxy for ``settings``; lock held by the caller."""
        self._write_config(settings)
        old = self.pid()
        argv = ["haproxy", "-f", str(self._config_path), "-p", str(self._pid_path), "-D"]
        if old is not None:
            argv += ["-x", str(self.socket_path), "-sf", str(old)]
        run_tool(argv, timeout=20)
        self._save(settings)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None and pid != old and self.running():
                return
            time.sleep(0.05)
        raise TransientError(
            f"HAProxy in {self.state_dir} did not come up after {'reload' if old else 'start'}",
            hint=f"check {self._config_path} with `haproxy -c -f`",
        )

    # -- routes -----------------------------------------------------------------------------

    def ensure_route(
        self,
        app: str,
        environment: str,
        *,
        listen_port: int,
        stable_port: int,
        health_path: str = "/",
        bind_address: str = "127.0.0.1",
    ) -> Route:
        """Make sure the app/environment has a frontend and a backend; reload if needed.

        An existing route keeps its canary (port and weight); only a changed frontend or
        health check causes a (seamless) reload. A different ``stable_port`` is applied live.

        Returns:
            The route now in force.
        """
        with self._locked():
            settings = self.settings()
            current = settings.find(app, environment)
            wanted = Route(
                app=app,
                environment=environment,
                listen_port=listen_port,
                stable_port=stable_port,
                canary_port=current.canary_port if current else None,
                canary_weight=current.canary_weight if current else 0,
                health_path=health_path,
                bind_address=bind_address,
            )
            running = self.running()
            if current is not None and running:
                structural = ("listen_port", "health_path", "bind_address")
                if all(getattr(current, f) == getattr(wanted, f) for f in structural):
                    if current.stable_port != stable_port:
                        self.runtime.set_server_addr(
                            wanted.backend, ServerRole.STABLE.value, "127.0.0.1", stable_port
                        )
                        self._save(settings.with_route(wanted))
                    return wanted
            self._apply(settings.with_route(wanted))
            return wanted

    def point_stable(self, app: str, environment: str, port: int) -> Route:
        """Point the stable server at another 127.0.0.1 port, live.

        Returns:
            The updated route.
        """
        return self.point_server(app, environment, ServerRole.STABLE, port)

    def point_canary(self, app: str, environment: str, port: int) -> Route:
        """Point the canary server at a 127.0.0.1 port, live.

        Pointing the canary at a port for the first time also takes it out of maintenance;
        its weight stays as it was (0 for a new canary) until :meth:`set_canary_weight`.

        Returns:
            The updated route.
        """
        return self.point_server(app, environment, ServerRole.CANARY, port)

    def point_server(self, app: str, environment: str, role: ServerRole, port: int) -> Route:
        """Point the ``role`` server at another 127.0.0.1 port, live (see :meth:`point_stable`
        and :meth:`point_canary`).

        Returns:
            The updated route.
        """
        with self._locked():
            settings = self.settings()
            route = self._route_in(settings, app, environment)
            self.runtime.set_server_addr(route.backend, role.value, "127.0.0.1", port)
            match role:
                case ServerRole.STABLE:
                    updated = route.model_copy(update={"stable_port": port})
                case ServerRole.CANARY:
                    updated = route.model_copy(update={"canary_port": port})
                    self.runtime.enable_server(route.backend, role.value)
                case _:
                    assert_never(role)
            self._save(settings.with_route(updated))
            return updated

    def set_canary_weight(self, app: str, environment: str, percent: int) -> Route:
        """Send ``percent`` of the app's requests to the canary and the rest to stable, live.

        Raises:
            ConfigurationError: ``percent`` > 0 while no canary port is set.

        Returns:
            The updated route.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"canary weight is a percentage, got {percent}")
        with self._locked():
            settings = self.settings()
            route = self._route_in(settings, app, environment)
            if percent > 0 and route.canary_port is None:
                raise ConfigurationError(
                    f"cannot send {percent}% of {app} in {environment} to a canary: no canary "
                    "server is set",
                    hint="start the canary and call point_canary(app, environment, port) first",
                )
            updated = route.model_copy(update={"canary_weight": percent})
            # Raise the receiving side first so that no instant has both weights at 0.
            order = (
                (ServerRole.CANARY, ServerRole.STABLE)
                if percent >= route.canary_weight
                else (ServerRole.STABLE, ServerRole.CANARY)
            )
            for role in order:
                self.runtime.set_weight(route.backend, role.value, updated.weight_of(role))
            self._save(settings.with_route(updated))
            return updated

    def disable_canary(self, app: str, environment: str) -> Route:
        """All traffic back to stable and the canary server into maintenance, live.

        Returns:
            The updated route (no canary port, weight 0).
        """
        with self._locked():
            settings = self.settings()
            route = self._route_in(settings, app, environment)
            updated = route.model_copy(update={"canary_weight": 0, "canary_port": None})
            self.runtime.set_weight(route.backend, ServerRole.STABLE.value, 100)
            self.runtime.set_weight(route.backend, ServerRole.CANARY.value, 0)
            self.runtime.disable_server(route.backend, ServerRole.CANARY.value)
            self._save(settings.with_route(updated))
            return updated

    def canary_weight(self, app: str, environment: str) -> int:
        """The canary's weight as the running HAProxy reports it (not as ``router.json`` says)."""
        return self.runtime.get_weight(backend_name(app, environment), ServerRole.CANARY.value)

    def server_state(self, app: str, environment: str, role: ServerRole) -> ServerState:
        """What the running HAProxy reports for one server of the app's backend."""
        return self.runtime.server_state(backend_name(app, environment), role.value)

    @staticmethod
    def _route_in(settings: RouterSettings, app: str, environment: str) -> Route:
        route = settings.find(app, environment)
        if route is None:
            raise ConfigurationError(
                f"the router has no route for {app} in {environment}",
                hint="call ensure_route for it first",
            )
        return route
