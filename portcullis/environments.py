"""Where each environment's versions run on its Docker host.

Containers use host networking (the private engine has no bridge), so every version listens
on its own loopback port. Each app/environment pair owns a small block of ports: the front
door (``base``, the router in front of stable and canary) and two slots that alternate between
deploys, so a new version can start and prove itself healthy before the old one stops.
"""

from __future__ import annotations

import zlib
from enum import Enum

from pydantic import Field

from portcullis.errors import PolicyRefusal
from portcullis.models import Frozen


class Slot(str, Enum):
    """The two places a version of an app can run in one environment."""

    BLUE = "blue"
    GREEN = "green"

    def other(self) -> Slot:
        """The slot a new version goes to while this one serves."""
        return Slot.GREEN if self is Slot.BLUE else Slot.BLUE


ENVIRONMENTS: dict[str, int] = {"dev": 20000, "staging": 30000, "prod": 40000}


class PortPlan(Frozen):
    """The ports one app uses in one environment."""

    app: str
    environment: str
    front: int = Field(description="the router's frontend: where users reach the app")
    blue: int
    green: int
    stats: int = Field(description="the router's metrics and admin frontend")

    def slot_port(self, slot: Slot) -> int:
        """The port a version in ``slot`` listens on."""
        return self.blue if slot is Slot.BLUE else self.green


def port_plan(app: str, environment: str) -> PortPlan:
    """Stable ports for ``app`` in ``environment``, derived from the names.

    The app name is hashed into one of 2000 blocks of 4 ports, so apps get distinct ports
    without a registry of assignments.
    """
    if environment not in ENVIRONMENTS:
        raise PolicyRefusal(
            f"unknown environment {environment!r}", hint=f"use one of {sorted(ENVIRONMENTS)}"
        )
    base = ENVIRONMENTS[environment] + (zlib.crc32(app.encode()) % 2000) * 4
    return PortPlan(app=app, environment=environment, front=base, blue=base + 1,
                    green=base + 2, stats=base + 3)
