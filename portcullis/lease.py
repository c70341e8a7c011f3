"""Leases: who holds something shared (a canary's share of traffic, an environment's deploy
slot), and until when.

A holder writes a lease and renews it from a thread while it works. When the holder dies
(SIGKILL, out of memory, a lost host) nothing renews it, the lease expires, and whoever watches
applies the rules below: the canary's traffic goes back to stable, the deploy slot is freed.
A holder that comes back after its lease expired finds it gone or taken and must stop.

The rules (:func:`expired`, :func:`may_renew`, :func:`reclaim_traffic`) are pure.
:class:`LeaseStore` keeps one small JSON file per subject; every change is made under that
subject's file lock, so a renewal and a reclaim never interleave.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import Field, ValidationError

from portcullis.errors import PolicyRefusal
from portcullis.models import Frozen

_log = logging.getLogger(__name__)

_SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}$")


class Lease(Frozen):
    """Who holds a subject and until when."""

    subject: str = Field(description="what is held; also the file name")
    holder: str = Field(description="the flow run id, or pid@host outside a flow run")
    pid: int = Field(ge=1, description="process that renews the lease")
    host: str
    ttl_seconds: float = Field(gt=0, description="each renewal extends the lease by this much")
    expires_at: datetime


class TrafficLease(Lease):
    """A canary holds a share of an app's traffic in an environment."""

    app: str
    environment: str
    canary_container: str = Field(description="id of the canary container to remove on reclaim")
    canary_port: int = Field(ge=1, le=65535, description="127.0.0.1 port the canary serves on")


class LockLease(Lease):
    """A run holds an environment's deploy slot (a Prefect global concurrency limit)."""

    environment: str
    prefect_lease_id: str = Field(description="Prefect's lease on the slot, revoked on reclaim")


class RouteView(Frozen):
    """What the router has for the leased app/environment right now."""

    stable_port: int
    canary_port: int | None
    canary_weight: int


class Reclaim(Frozen):
    """What to do about an expired traffic lease."""

    restore_stable: bool = Field(description="send all traffic to stable, canary server off")
    remove_canary: bool = Field(description="remove the canary container the lease names")
    reason: str


def expired(lease: Lease, now: datetime) -> bool:
    """True once the holder has missed renewing ``lease``."""
    return now >= lease.expires_at


def may_renew(current: Lease | None, holder: str, now: datetime) -> bool:
    """A holder may renew (and act under) a lease only while it is still its own and live.

    A lease that expired is never brought back: a watcher may already have acted on it.
    """
    return current is not None and current.holder == holder and not expired(current, now)


def reclaim_traffic(lease: TrafficLease, route: RouteView | None, now: datetime) -> Reclaim | None:
    """The rule for a canary whose holder stopped renewing.

    Returns:
        None while the lease is live; otherwise what to do. Traffic always goes back to stable
        and the canary container is removed, except when the router already serves from the
        canary's port as *stable* (the run died after the promotion's switch): then that
        container is the serving version and must stay.
    """
    if not expired(lease, now):
        return None
    late = f"lease of {lease.holder} (pid {lease.pid}) expired at {lease.expires_at.isoformat()}"
    if route is None:
        return Reclaim(restore_stable=False, remove_canary=True,
                       reason=f"{late}; no route left for the canary")
    if route.stable_port == lease.canary_port:
        return Reclaim(restore_stable=route.canary_port is not None, remove_canary=False,
                       reason=f"{late}; the canary had already been made stable: kept")
    return Reclaim(restore_stable=True, remove_canary=True,
                   reason=f"{late}; traffic back to stable, canary removed")


def holder_identity(run_id: str | None) -> str:
    """The holder name of this process: its flow run (if any), pid and host.

    The pid is part of it so that two processes outside a flow run, or a retried run in a
    new process, never pass for each other.
    """
    return f"{run_id or 'no-run'}/pid{os.getpid()}@{socket.gethostname()}"


L = TypeVar("L", bound=Lease)


class LeaseStore(Generic[L]):
    """Leases of one kind as JSON files in ``directory`` (``<subject>.json``).

    Args:
        directory: created if missing.
        model: the lease type stored here.
    """

    def __init__(self, directory: Path, model: type[L]) -> None:
        self.directory = directory
        self.model = model

    def _path(self, subject: str, suffix: str) -> Path:
        if not _SUBJECT_RE.fullmatch(subject):
            raise ValueError(f"lease subject {subject!r} is not a plain name")
        return self.directory / f"{subject}{suffix}"

    @contextmanager
    def locked(self, subject: str) -> Iterator[None]:
        """Hold the subject's file lock (across processes) for a read-decide-write."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._path(subject, ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self, subject: str) -> L | None:
        """The lease on ``subject``; None when there is none (or it cannot be parsed)."""
        try:
            return self.model.model_validate_json(self._path(subject, ".json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, json.JSONDecodeError):
            return None

    def subjects(self) -> list[str]:
        """Every subject that has a lease file."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def write(self, lease: L) -> None:
        """Write ``lease`` atomically (the caller holds :meth:`locked`)."""
        path = self._path(lease.subject, ".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(lease.model_dump_json())
        tmp.replace(path)

    def remove(self, subject: str) -> None:
        """Delete the lease file (the caller holds :meth:`locked`)."""
        self._path(subject, ".json").unlink(missing_ok=True)

    def take(self, lease: L) -> None:
        """Write a new lease for its subject, replacing whatever was there."""
        with self.locked(lease.subject):
            self.write(lease)

    def renew(self, subject: str, holder: str, now: datetime) -> L | None:
        """Extend the holder's lease by its ttl; None when it is no longer the holder's."""
        with self.locked(subject):
            current = self.read(subject)
            if current is None or not may_renew(current, holder, now):
                return None
            renewed = current.model_copy(
                update={"expires_at": now + timedelta(seconds=current.ttl_seconds)})
            self.write(renewed)
            return renewed

    def release(self, subject: str, holder: str) -> None:
        """Remove the lease if it is still the holder's."""
        with self.locked(subject):
            current = self.read(subject)
            if current is not None and current.holder == holder:
                self.remove(subject)


def traffic_leases(router_dir: Path) -> LeaseStore[TrafficLease]:
    """Where rollouts keep their traffic leases for the router in ``router_dir`` (the canary
    watcher reads them there)."""
    return LeaseStore(router_dir / "leases", TrafficLease)


def traffic_subject(app: str, environment: str) -> str:
    """The lease subject of an app's canary in an environment (``app.environment``, the name
    the router gives the app's backend)."""
    return f"{app}.{environment}"


def lease_expiry(ttl_seconds: float, now: datetime | None = None) -> datetime:
    """When a lease taken or renewed now expires."""
    return (now or datetime.now(UTC)) + timedelta(seconds=ttl_seconds)


class LeaseLost(PolicyRefusal):
    """This run's lease expired or was taken over: it must not act on the subject any more."""


class LeaseKeeper(Generic[L]):
    """Takes a lease and renews it from a daemon thread every third of its ttl.

    The thread stops renewing, and :attr:`lost` is set, as soon as a renewal is refused (the
    lease expired or another holder has it). Act on the subject only inside :meth:`acting`.

    Args:
        store: where the lease lives.
        lease: the lease to take (its ``expires_at`` is set when taken).
    """

    def __init__(self, store: LeaseStore[L], lease: L) -> None:
        self.store = store
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LeaseKeeper[L]:
        """Take the lease and start renewing it."""
        self.lease = self.lease.model_copy(
            update={"expires_at": lease_expiry(self.lease.ttl_seconds)})
        self.store.take(self.lease)
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name=f"lease-{self.lease.subject}")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease.ttl_seconds / 3):
            try:
                renewed = self.store.renew(self.lease.subject, self.lease.holder, datetime.now(UTC))
            except OSError as exc:
                # Keep trying: if the disk stays unwritable the lease expires, and a watcher
                # then takes the safe way out.
                _log.warning("renewing lease %s failed: %s", self.lease.subject, exc)
                continue
            if renewed is None:
                self.lost.set()
                return

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is still ours and live."""
        with self.acting():
            pass

    @contextmanager
    def acting(self) -> Iterator[None]:
        """Hold the subject's lock while the lease is still ours and live.

        Raises:
            LeaseLost: it expired or was taken over; nothing may be changed any more.
        """
        with self.store.locked(self.lease.subject):
            current = self.store.read(self.lease.subject)
            if not may_renew(current, self.lease.holder, datetime.now(UTC)):
                self.lost.set()
                raise LeaseLost(
                    f"the lease on {self.lease.subject} of {self.lease.holder} expired or was "
                    "taken over, so this run no longer controls it",
                    hint="the watcher has put it back in a safe state; start a new promotion",
                )
            yield

    def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release``, remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release:
            self.store.release(self.lease.subject, self.lease.holder)
