"""Find a Docker engine that answers, or start a private one where none does.

A developer laptop already has Docker: use it. A fresh Debian machine (root, no engine) gets a
private dockerd with the flags verified on this kind of machine (vfs storage, no iptables, no
bridge), so every container runs with host networking.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import docker

from infra.daemon import start_daemon, stop_daemon, wait_until
from portcullis.errors import PortcullisError
from portcullis.toolrun import run_tool


@dataclass(frozen=True)
class DockerEngine:
    """A Docker engine that answered ``info``."""

    host: str
    private: bool
    server_version: str


def engine_answers(host: str | None) -> str | None:
    """Return the server version if the engine at ``host`` (None: environment default) answers."""
    try:
        client = docker.DockerClient(base_url=host, version="auto", timeout=5) if host else (
            docker.from_env(version="auto", timeout=5)
        )
        try:
            return str(client.version().get("Version", "?"))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "this engine does not answer"
        return None


def _install_docker_engine() -> None:
    if os.geteuid() != 0 or not Path("/etc/debian_version").exists():
        raise PortcullisError(
            "no Docker engine answers and this machine cannot start one "
            "(starting a private dockerd needs root on Debian)",
            hint="start Docker and set DOCKER_HOST, then run again",
        )
    run_tool(["apt-get", "install", "-y", "-q", "docker.io"], timeout=900,
             env={"DEBIAN_FRONTEND": "noninteractive"})


def ensure_engine(state_dir: Path) -> DockerEngine:
    """Use the engine that answers; otherwise start a private dockerd under ``state_dir``."""
    configured = os.environ.get("DOCKER_HOST")
    private_sock = state_dir / "docker.sock"
    private_host = f"unix://{private_sock}"
    if configured and configured != private_host:
        version = engine_answers(configured)
        if version is None:
            raise PortcullisError(
                f"DOCKER_HOST={configured} does not answer",
                hint="start that engine, or unset DOCKER_HOST to let Portcullis start its own",
            )
        return DockerEngine(configured, False, version)
    if not configured and (version := engine_answers(None)) is not None:
        return DockerEngine(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"), False, version)
    if shutil.which("dockerd") is None:
        _install_docker_engine()
    argv = [
        "dockerd",
        "--storage-driver", "vfs",
        "--iptables=false", "--ip6tables=false", "--bridge=none",
        "--data-root", str(state_dir / "root"),
        "--exec-root", str(state_dir / "exec"),
        "-H", private_host,
        "--pidfile", str(state_dir / "docker.pid"),
    ]
    start_daemon(
        "dockerd", argv, state_dir=state_dir, pid_file=state_dir / "docker.pid",
        ready=lambda: engine_answers(private_host) is not None, timeout=60,
    )
    version = engine_answers(private_host) or "?"
    return DockerEngine(private_host, True, version)


def stop_private_engine(state_dir: Path) -> bool:
    """Stop the private dockerd, if this stack started one (its containers stop with it)."""
    stopped = stop_daemon("dockerd", state_dir=state_dir, pid_file=state_dir / "docker.pid")
    if stopped:
        wait_until(lambda: not (state_dir / "docker.sock").exists(), timeout=10)
    # dockerd leaves its network-namespace mounts behind; without unmounting them the state
    # directory cannot be removed.
    prefix = str(state_dir.resolve()) + "/"
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1] for line in fh if line.split()[1].startswith(prefix)]
    for mount in sorted(mounts, key=len, reverse=True):
        run_tool(["umount", "-l", mount], timeout=10, check=False)
    return stopped
