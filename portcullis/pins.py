"""Environment pins: after a manual rollback, schedules must not promote over it.

A pin names the app, the environment, the digest it holds and who set it and why. Scheduled
promotions skip a pinned environment (recording that they did) until someone clears the pin;
a person can still promote by hand, deliberately. Pins are kept in the shared state store
(:class:`portcullis.state.StorePinStore`).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field

from portcullis.models import Digest, Frozen


class Pin(Frozen):
    """An environment held at one digest."""

    app: str
    environment: str
    digest: Digest
    pinned_by: str
    reason: str
    pinned_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
