"""Names for the apps tests deploy: unique, and never on another app's ports.

An app's ports are a hash of its name (``portcullis.environments.port_block``), and the test
engine keeps every test's containers until the session ends: a random name that landed in a
block already used in the session would fail its deploy with "address already in use".
"""

from __future__ import annotations

import secrets

from portcullis.environments import port_block

# The catalog's example apps run on the local stack and in some tests.
_TAKEN: set[int] = {port_block(name) for name in ("hello", "greeter")}


def unique_app_name() -> str:
    """A new ``t-`` app name (teardown removes what carries the prefix) in a free port block."""
    while True:
        name = f"t-{secrets.token_hex(3)}"
        block = port_block(name)
        if block not in _TAKEN:
            _TAKEN.add(block)
            return name
