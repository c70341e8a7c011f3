"""The canary watcher: traffic goes back to stable when the run that holds a canary dies.

A rollout keeps a :class:`~portcullis.lease.TrafficLease` per app/environment in the router's
``leases/`` directory and renews it while its canary holds traffic. This daemon looks at those
leases every ``--interval`` seconds and applies :func:`~portcullis.lease.reclaim_traffic` to
each: an expired lease sends all traffic to stable, takes the canary server out of rotation,
removes the canary container it names, then deletes the lease.

Everything it needs is on disk (``router.json``, the lease files): a watcher that dies and is
started again simply finds the same expired leases and applies the same, idempotent, steps.
It only removes a container that carries the leased app's and environment's labels and is not
the one the router serves as stable: a lease file is writable by the flow's user, so it is not
trusted to name anything else.

Run: ``python -m infra.canary_watch --router-dir DIR [--docker-host URL] [--interval S]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import docker
import docker.errors

from portcullis.environments import Slot, port_plan
from portcullis.errors import PortcullisError
from portcullis.lease import Reclaim, RouteView, TrafficLease, reclaim_traffic, traffic_leases
from portcullis.router_haproxy import HaproxyRouter

_log = logging.getLogger("portcullis.canary_watch")

LABEL_APP = "dev.portcullis.app"
LABEL_ENV = "dev.portcullis.environment"
LABEL_SLOT = "dev.portcullis.slot"

GRACE_SECONDS = 1.0
"""Time requests in flight on the canary get to finish after it leaves the rotation."""


def _route_view(router: HaproxyRouter, lease: TrafficLease) -> RouteView | None:
    route = router.settings().find(lease.app, lease.environment)
    if route is None:
        return None
    return RouteView(stable_port=route.stable_port, canary_port=route.canary_port,
                     canary_weight=route.canary_weight)


def _remove_canary(client: docker.DockerClient, lease: TrafficLease, stable_port: int | None) -> str:
    try:
        container = client.containers.get(lease.canary_container)
    except docker.errors.NotFound:
        return "already gone"
    labels = container.labels or {}
    if labels.get(LABEL_APP) != lease.app or labels.get(LABEL_ENV) != lease.environment:
        return f"not removed: {container.name} is not a container of {lease.app} in {lease.environment}"
    try:
        port = port_plan(lease.app, lease.environment).slot_port(Slot(labels.get(LABEL_SLOT, "")))
    except ValueError:
        port = None
    if port is None or port == stable_port:
        return f"not removed: {container.name} serves as stable"
    container.remove(force=True)
    return f"removed {container.name}"


class Watcher:
    """Applies the reclaim rule to every traffic lease of one router.

    Args:
        router_dir: the router's state directory.
        docker_host: the Docker engine running the canaries (None: the environment's).
    """

    def __init__(self, router_dir: Path, docker_host: str | None = None) -> None:
        self.router = HaproxyRouter(router_dir)
        self.store = traffic_leases(router_dir)
        self.docker_host = docker_host
        self.journal = router_dir / "leases" / "reclaimed.jsonl"

    def _client(self) -> docker.DockerClient:
        if self.docker_host:
            return docker.DockerClient(base_url=self.docker_host, version="auto")
        return docker.from_env()

    def sweep(self, now: datetime | None = None) -> list[dict[str, str]]:
        """Reclaim every expired lease once; returns what was done."""
        done = []
        for subject in self.store.subjects():
            with self.store.locked(subject):
                lease = self.store.read(subject)
                if lease is None:
                    continue
                route = _route_view(self.router, lease)
                action = reclaim_traffic(lease, route, now or datetime.now(UTC))
                if action is None:
                    continue
                done.append(self._apply(lease, route, action))
                # Deleted only once applied: a watcher killed half-way applies it again.
                self.store.remove(subject)
        return done

    def _apply(self, lease: TrafficLease, route: RouteView | None, action: Reclaim) -> dict[str, str]:
        if action.restore_stable:
            self.router.disable_canary(lease.app, lease.environment)
        container = "kept"
        if action.remove_canary:
            if action.restore_stable:
                time.sleep(GRACE_SECONDS)
            client = self._client()
            try:
                container = _remove_canary(client, lease, route.stable_port if route else None)
            finally:
                client.close()
        entry = {"at": datetime.now(UTC).isoformat(), "event": "canary.reclaimed",
                 "app": lease.app, "environment": lease.environment, "holder": lease.holder,
                 "reason": action.reason, "container": container}
        with self.journal.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        _log.warning("%s", entry)
        return entry


def main(argv: list[str] | None = None) -> int:
    """Run the watcher until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m infra.canary_watch", description=__doc__)
    parser.add_argument("--router-dir", type=Path, required=True)
    parser.add_argument("--docker-host", default=None)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    watcher = Watcher(args.router_dir, args.docker_host)
    if args.ready_file is not None:
        args.ready_file.parent.mkdir(parents=True, exist_ok=True)
        args.ready_file.write_text(json.dumps({"router_dir": str(args.router_dir)}))
    while not stop.is_set():
        try:
            watcher.sweep()
        except (PortcullisError, docker.errors.DockerException, OSError) as exc:
            # The router or the engine may be restarting; the leases stay on disk for the
            # next sweep.
            _log.error("sweep failed: %s", exc)
        stop.wait(args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
