"""Deploy targets: where an environment's promotions go, and the router in front of them.

An environment's policy names its target (``target`` in its policy file):

* ``docker``: containers on a Docker host. With a canary in the policy the host sits behind a
  :class:`TrafficRouter` that moves a share of the traffic to the new version step by step;
  without one, blue/green behind the health check, on the slots' own ports.
* ``gitops``: a commit to an overlay repository that a controller in the cluster applies.

:func:`deploy_target` makes that choice once, for the promote and the rollback flows alike.
The router's implementation is HAProxy (:mod:`portcullis.router_haproxy`); starting and
stopping its process is the local stack's business (``infra/haproxy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from portcullis.policy import EnvironmentPolicy
from portcullis.router_haproxy import HaproxyRouter
from portcullis.settings import Settings


class TrafficRouter(Protocol):
    """Routes an app's traffic in an environment between a stable and a canary server.

    Every change is live (no request fails because of it) and persistent: the router keeps
    its desired state, so a restarted router routes as before. The methods return the
    implementation's record of the route, which callers do not need.
    """

    @property
    def state_dir(self) -> Path:
        """The router's state directory; rollouts keep their traffic leases under it."""
        ...

    def running(self) -> bool:
        """The router is up and answers."""
        ...

    def ensure_route(self, app: str, environment: str, *, listen_port: int, stable_port: int,
                     health_path: str = "/") -> object:
        """The app has a front door on ``listen_port`` whose stable server is ``stable_port``;
        an existing route keeps its canary."""
        ...

    def point_stable(self, app: str, environment: str, port: int) -> object:
        """Point the stable server at another 127.0.0.1 port."""
        ...

    def point_canary(self, app: str, environment: str, port: int) -> object:
        """Point the canary server at a 127.0.0.1 port (its weight stays as it was)."""
        ...

    def set_canary_weight(self, app: str, environment: str, percent: int) -> object:
        """Send ``percent`` of the requests to the canary and the rest to stable."""
        ...

    def disable_canary(self, app: str, environment: str) -> object:
        """All traffic to stable; the canary server leaves the rotation."""
        ...

    def canary_weight(self, app: str, environment: str) -> int:
        """The canary's share as the running router reports it."""
        ...


@dataclass(frozen=True)
class DeployTarget:
    """Where one environment's promotions and rollbacks go, as its policy says.

    Attributes:
        kind: ``docker`` or ``gitops``.
        router: the router in front of the Docker host when the policy has a canary; None
            for blue/green on the slots' ports and for GitOps.
    """

    kind: Literal["docker", "gitops"]
    router: TrafficRouter | None


def deploy_target(policy: EnvironmentPolicy, settings: Settings) -> DeployTarget:
    """The target of ``policy``'s environment, with its router (the worker host's own
    configuration: ``settings.router_dir``, never a flow parameter)."""
    if policy.target == "gitops":
        return DeployTarget(kind="gitops", router=None)
    router = HaproxyRouter(settings.router_dir) if policy.canary is not None else None
    return DeployTarget(kind="docker", router=router)
