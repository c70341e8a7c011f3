"""The stack's users (infra/loadgen.py) for a test: steady requests through one front door.

Tests that need traffic start the same background generator the local stack starts, wait
until its first run of requests completed, and read its own counts to show what the clients
saw (requests, failed requests) around an event, never a sleep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.loadgen import DEFAULT_RATE, LoadGenerator, TargetCounts


@contextmanager
def users_at(url: str, state_dir: Path, *, rate_per_second: float | None = DEFAULT_RATE,
             connections: int = 4) -> Iterator[LoadGenerator]:
    """The generator sending to ``url``, once its traffic flows; stopped on exit."""
    generator = LoadGenerator(state_dir)
    generator.start([url], rate_per_second=rate_per_second, connections=connections)
    try:
        generator.next_runs(url, 1)
        yield generator
    finally:
        generator.stop()


def one_run_after(users: LoadGenerator, url: str) -> TargetCounts:
    """What the users counted in one whole run that began after this call (the run in
    progress now is finished first)."""
    started = users.next_runs(url, 1)
    return users.next_runs(url, 1).since(started)
