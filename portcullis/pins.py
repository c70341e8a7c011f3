"""Environment pins: after a manual rollback, schedules must not promote over it.

A pin names the app, the environment, the digest it holds and who set it and why. Scheduled
promotions skip a pinned environment (recording that they did) until someone clears the pin;
a person can still promote by hand, deliberately.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from portcullis.audit import file_lock, write_atomic
from portcullis.errors import PolicyRefusal
from portcullis.models import Digest, Frozen


class Pin(Frozen):
    """An environment held at one digest."""

    app: str
    environment: str
    digest: Digest
    pinned_by: str
    reason: str
    pinned_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class PinStore:
    """Pins kept as one small JSON file per app and environment in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, app: str, environment: str) -> Path:
        if "/" in app or "/" in environment or app.startswith("."):
            raise PolicyRefusal(f"invalid app or environment name: {app!r} {environment!r}")
        return self.directory / f"{environment}--{app}.json"

    def get(self, app: str, environment: str) -> Pin | None:
        """The pin on ``app`` in ``environment``, if any."""
        path = self._path(app, environment)
        try:
            return Pin.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None

    def all(self) -> list[Pin]:
        """Every pin in force."""
        if not self.directory.exists():
            return []
        return [Pin.model_validate_json(p.read_bytes()) for p in sorted(self.directory.glob("*--*.json"))]

    def pin(self, pin: Pin) -> None:
        """Set (or replace) a pin."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(pin.app, pin.environment)
        with file_lock(path.with_suffix(".lock")):
            write_atomic(path, pin.model_dump_json(indent=2).encode())

    def clear(self, app: str, environment: str) -> Pin:
        """Remove the pin and return it; refuses when there is none."""
        path = self._path(app, environment)
        with file_lock(path.with_suffix(".lock")):
            current = self.get(app, environment)
            if current is None:
                raise PolicyRefusal(f"{app} in {environment} is not pinned")
            os.unlink(path)
        return current


def describe(pin: Pin) -> str:
    """One line for logs and refusals."""
    return json.dumps({"digest": pin.digest, "by": pin.pinned_by, "reason": pin.reason,
                       "at": pin.pinned_at.isoformat()})
