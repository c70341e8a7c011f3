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


# Each environment's ports lie below Linux's ephemeral range (32768-60999 by default): a
# client socket of any process may take a port in that range, and a version starting on it
# would fail with "address already in use".
ENVIRONMENTS: dict[str, int] = {"dev": 20000, "staging": 24000, "prod": 28000}


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


PORT_BLOCKS = 1000
"""How many blocks of 4 ports each environment's range holds."""


def port_block(app: str) -> int:
    """The block of ports ``app`` uses in every environment (a hash of its name): two apps
    with the same block would listen on the same ports, so the catalog refuses that."""
    return zlib.crc32(app.encode()) % PORT_BLOCKS


def port_plan(app: str, environment: str) -> PortPlan:
    """Stable ports for ``app`` in ``environment``, derived from the names.

    The app name is hashed into one of 1000 blocks of 4 ports (:func:`port_block`), so apps
    get ports without a registry of assignments; the catalog refuses two apps in one block.
    """
    if environment not in ENVIRONMENTS:
        raise PolicyRefusal(
            f"unknown environment {environment!r}", hint=f"use one of {sorted(ENVIRONMENTS)}"
        )
    base = ENVIRONMENTS[environment] + port_block(app) * 4
    return PortPlan(app=app, environment=environment, front=base, blue=base + 1,
                    green=base + 2, stats=base + 3)
