"""The local stack: everything a promotion needs on one machine.

``python -m infra.stack up`` brings up (idempotently) a Docker engine, an OCI registry with
separate build (push), deploy (pull) and promoter (push promotion records only) accounts, a Prefect server and the locally made base
image, the traffic side (HAProxy, Prometheus) and the stack's users (``infra/loadgen.py``: steady
requests through every catalog app's front door, so canaries have traffic to be judged on),
then prints where each part listens. ``down`` stops what ``up`` started. State lives in
``$PORTCULLIS_HOME`` (default ``.stack/`` in the repository), including generated registry
passwords (mode 600), and ``.stack/env`` can be sourced by a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker

from infra import prefect_server, registry
from infra.base_image import ensure_base_image
from infra.change_calendar import ensure_calendar, stop_calendar
from infra.daemon import running_pid
from infra.demo_data import (
    ensure_approvers,
    ensure_gitops_repo,
    ensure_promotion_keys,
    ensure_signing_keys,
    ensure_trivy_db,
    promotion_env,
    trusted_keys_env,
)
from infra.docker_engine import ensure_engine, stop_private_engine
from infra.loadgen import DEFAULT_RATE, LoadGenerator, stack_targets
from infra.traffic import TrafficPorts, ensure_traffic, stop_traffic
from portcullis.catalog import load_catalog
from portcullis.errors import PortcullisError

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The traffic side's default loopback ports.
TRAFFIC_PORTS = TrafficPorts(syslog=5514, exporter_http=9101, haproxy_stats=8404, prometheus=9090)


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses."""

    state_dir: Path
    registry_port: int = 5000
    prefect_port: int = 4200
    #: The change calendar prod's policy consults (policies/prod.toml names this port).
    calendar_port: int = 8470
    with_prefect: bool = True
    traffic_ports: TrafficPorts = TRAFFIC_PORTS
    #: Requests per second the stack's users send to each front door.
    load_rate: float = DEFAULT_RATE

    @classmethod
    def from_env(cls) -> StackConfig:
        """Read ``PORTCULLIS_HOME``, ``PORTCULLIS_REGISTRY_PORT``, ``PORTCULLIS_PREFECT_PORT``,
        ``PORTCULLIS_CALENDAR_PORT``, the traffic side's ``PORTCULLIS_SYSLOG_PORT``,
        ``PORTCULLIS_LATENCY_PORT``, ``PORTCULLIS_HAPROXY_STATS_PORT``,
        ``PORTCULLIS_PROMETHEUS_PORT`` and ``PORTCULLIS_LOAD_RATE``."""
        defaults = TRAFFIC_PORTS
        return cls(
            state_dir=Path(os.environ.get("PORTCULLIS_HOME", REPO_ROOT / ".stack")).resolve(),
            registry_port=int(os.environ.get("PORTCULLIS_REGISTRY_PORT", "5000")),
            prefect_port=int(os.environ.get("PORTCULLIS_PREFECT_PORT", "4200")),
            calendar_port=int(os.environ.get("PORTCULLIS_CALENDAR_PORT", "8470")),
            traffic_ports=TrafficPorts(
                syslog=int(os.environ.get("PORTCULLIS_SYSLOG_PORT", defaults.syslog)),
                exporter_http=int(os.environ.get("PORTCULLIS_LATENCY_PORT", defaults.exporter_http)),
                haproxy_stats=int(os.environ.get("PORTCULLIS_HAPROXY_STATS_PORT", defaults.haproxy_stats)),
                prometheus=int(os.environ.get("PORTCULLIS_PROMETHEUS_PORT", defaults.prometheus)),
            ),
            load_rate=float(os.environ.get("PORTCULLIS_LOAD_RATE", str(DEFAULT_RATE))),
        )


@dataclass(frozen=True)
class StackInfo:
    """Where each part of a running stack listens, and the accounts it made."""

    docker_host: str
    docker_private: bool
    docker_version: str
    registry: str
    build_user: str
    build_password: str
    deploy_user: str
    deploy_password: str
    prefect_api_url: str | None
    base_image_id: str
    state_dir: str
    cosign_private_key: str
    cosign_password: str
    cosign_public_key: str
    prometheus_url: str
    gitops_repo: str
    approvers_file: str
    calendar_url: str
    calendar_token: str
    promoter_password: str = ""
    promotion_env: dict[str, str] = field(default_factory=dict)  # keys and trust roots
    load_targets: tuple[str, ...] = ()
    load_status: str = ""

    def env(self) -> dict[str, str]:
        """Environment variables that point clients and credential settings at this stack."""
        env = {
            "DOCKER_HOST": self.docker_host,
            "PORTCULLIS_BUILD_REGISTRY": self.registry,
            "PORTCULLIS_BUILD_REGISTRY_USERNAME": self.build_user,
            "PORTCULLIS_BUILD_REGISTRY_PASSWORD": self.build_password,
            "PORTCULLIS_BUILD_DOCKER_HOST": self.docker_host,
            "PORTCULLIS_DEPLOY_REGISTRY": self.registry,
            "PORTCULLIS_DEPLOY_REGISTRY_USERNAME": self.deploy_user,
            "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": self.deploy_password,
            "PORTCULLIS_DEPLOY_DOCKER_HOST": self.docker_host,
            "PORTCULLIS_BUILD_SIGNING_MODE": "key",
            "PORTCULLIS_BUILD_COSIGN_PRIVATE_KEY": self.cosign_private_key,
            "PORTCULLIS_BUILD_COSIGN_PASSWORD": self.cosign_password,
            "PORTCULLIS_DEPLOY_TRUSTED_PUBLIC_KEYS": trusted_keys_env(self.cosign_public_key),
            "PORTCULLIS_HOME": self.state_dir,
            "PORTCULLIS_PROMETHEUS_URL": self.prometheus_url,
            "PORTCULLIS_GITOPS_REPO_URL": self.gitops_repo,
            "PORTCULLIS_GITOPS_WORKDIR": f"{self.state_dir}/gitops-work",
            "PORTCULLIS_APPROVERS_FILE": self.approvers_file,
            "PORTCULLIS_DEPLOY_CHANGE_CALENDAR_TOKEN": self.calendar_token,
            "PORTCULLIS_DEPLOY_PROMOTER_USERNAME": "promoter",
            "PORTCULLIS_DEPLOY_PROMOTER_PASSWORD": self.promoter_password,
            **self.promotion_env,
        }
        if self.prefect_api_url:
            env["PREFECT_API_URL"] = self.prefect_api_url
        return env


def _accounts(state_dir: Path) -> dict[str, str]:
    """Registry passwords, generated once per stack and kept readable by the owner only."""
    path = state_dir / "secrets.json"
    accounts: dict[str, str] = dict(json.loads(path.read_text())) if path.exists() else {}
    missing = [a for a in ("builder", "deployer", "promoter") if a not in accounts]
    if not missing:
        return accounts
    accounts.update({a: secrets.token_urlsafe(18) for a in missing})
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(accounts, fh)
    return accounts


def up(config: StackConfig) -> StackInfo:
    """Bring the stack up (idempotent) and return where each part listens."""
    state = config.state_dir
    engine = ensure_engine(state / "docker")
    accounts = _accounts(state)
    reg = registry.start_registry(state / "registry", port=config.registry_port, users=accounts)
    api_url = None
    if config.with_prefect:
        api_url = prefect_server.ensure_server(state / "prefect", config.prefect_port)
    client = docker.DockerClient(base_url=engine.host, version="auto")
    try:
        base_id = ensure_base_image(client)
    finally:
        client.close()
    private_pem, key_password, public_pem = ensure_signing_keys(state)
    ensure_trivy_db(state / "trivy")
    traffic = ensure_traffic(state / "traffic", config.traffic_ports, docker_host=engine.host)
    # The stack plays its users: every catalog app's front door gets steady requests (a door
    # with nothing behind it yet is only probed), so each canary window has traffic.
    users = LoadGenerator(state / "loadgen")
    targets = stack_targets(load_catalog())
    users.start(targets, rate_per_second=config.load_rate)
    gitops_repo = ensure_gitops_repo(state, REPO_ROOT / "examples" / "gitops")
    approvers = ensure_approvers(state)
    calendar_url, calendar_token = ensure_calendar(state / "calendar", config.calendar_port)
    info = StackInfo(
        docker_host=engine.host,
        docker_private=engine.private,
        docker_version=engine.server_version,
        registry=reg.address,
        build_user="builder",
        build_password=accounts["builder"],
        deploy_user="deployer",
        deploy_password=accounts["deployer"],
        prefect_api_url=api_url,
        base_image_id=base_id,
        state_dir=str(state),
        cosign_private_key=private_pem,
        cosign_password=key_password,
        cosign_public_key=public_pem,
        prometheus_url=traffic.prometheus_url,
        gitops_repo=gitops_repo,
        approvers_file=str(approvers),
        calendar_url=calendar_url,
        calendar_token=calendar_token,
        promoter_password=accounts["promoter"],
        promotion_env=promotion_env(ensure_promotion_keys(state)),
        load_targets=targets,
        load_status=str(users.status_path),
    )
    env_lines = [f"export {k}={shlex.quote(v)}" for k, v in info.env().items()]
    env_path = state / "env"
    fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(env_lines) + "\n")
    return info


def down(config: StackConfig) -> list[str]:
    """Stop everything :func:`up` started. Returns the names of what was stopped."""
    state = config.state_dir
    # The users go first: requests to a router that is stopping would only fail.
    stopped = ["loadgen"] if LoadGenerator(state / "loadgen").stop() else []
    stopped += stop_traffic(state / "traffic")
    if stop_calendar(state / "calendar"):
        stopped.append("change-calendar")
    if prefect_server.stop_server(state / "prefect"):
        stopped.append("prefect-server")
    if registry.stop_registry(state / "registry"):
        stopped.append("registry")
    if stop_private_engine(state / "docker"):
        stopped.append("dockerd")
    return stopped


def status(config: StackConfig) -> list[tuple[str, int | None]]:
    """What of the stack runs now, from its pid files; starts nothing.

    Returns:
        (part, pid) for every daemon the stack ever started here; pid None: not running.
    """
    state = config.state_dir
    if not state.exists():
        return []
    return [(str(path.relative_to(state).with_suffix("")), running_pid(path))
            for path in sorted(state.rglob("*.pid"))]


def _describe(info: StackInfo) -> str:
    engine = "private dockerd" if info.docker_private else "existing engine"
    lines = [
        f"docker engine   {info.docker_host}  ({engine}, server {info.docker_version})",
        (f"registry        http://{info.registry}  (accounts: builder=push, deployer=pull, "
        "promoter=push promotions/* only)"),
        f"prefect server  {info.prefect_api_url or 'not started'}",
        f"prometheus      {info.prometheus_url}  (scrapes the HAProxy router and its latency log)",
        (f"users           {len(info.load_targets)} front doors, steady requests to each that "
         f"answers (counts in {info.load_status})"),
        f"gitops repo     {info.gitops_repo}  (prod overlays; Argo CD/Flux would apply them)",
        f"change calendar {info.calendar_url}  (freezes in {info.state_dir}/calendar/freezes.json)",
        f"base image      {info.base_image_id}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m infra.stack up|down|status [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    config = StackConfig.from_env()
    try:
        if args.command == "down":
            stopped = down(config)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
            return 0
        if args.command == "status":
            parts = status(config)
            if args.json:
                print(json.dumps(dict(parts), indent=2))
            elif not parts:
                print(f"no stack in {config.state_dir}: `python -m infra.stack up` starts one")
            else:
                for part, pid in parts:
                    print(f"{part:<40} {f'running, pid {pid}' if pid else 'not running'}")
            return 0 if all(pid for _, pid in parts) else 1
        info = up(config)
    except PortcullisError as exc:
        print(f"stack {args.command} failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        public = asdict(info)
        for secret in ("build_password", "deploy_password", "cosign_private_key", "cosign_password",
                       "calendar_token", "promoter_password", "promotion_env"):
            public.pop(secret)
        print(json.dumps(public, indent=2))
    else:
        print(_describe(info))
        print(f"environment     source {config.state_dir / 'env'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
