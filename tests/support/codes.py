"""Authenticator codes for tests that play several people.

The deploy side burns every code it accepts (per person, per 30 s step) and accepts the next
step too, so one person may act twice within a step; a third time waits for the next step.
"""

from __future__ import annotations

import time

import pyotp


class Codes:
    """Hands out, per person, a code that no earlier call handed out.

    Args:
        secrets: person -> base32 TOTP secret (the test's approver directory).
    """

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets
        self._last: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        """An unused, currently valid code of ``name``."""
        step = int(time.time() // 30)
        use = max(step, self._last.get(name, step - 1) + 1)
        if use > step + 1:  # a third use within one step: wait for the next step (rare)
            time.sleep((use - 1) * 30 - time.time() + 0.1)
        self._last[name] = use
        return pyotp.TOTP(self.secrets[name]).at(use * 30)
