"""Glue for the gates: the audit trail of a run, freeze checks, and the environment lock.

The rules live in ``portcullis.freeze``, ``portcullis.approval`` and ``portcullis.audit``; this
module only connects them to a flow run.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import (
    ConcurrencyLimitWithLeaseResponse,
    GlobalConcurrencyLimitResponse,
)

# The renewal loop of Prefect's own concurrency() (prefect/concurrency/_sync.py), used alone
# because this lock needs the lease id, which concurrency() keeps to itself.
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import JsonValue

from blocks.credentials import DeployCredentials
from portcullis.audit import AuditEntry, AuditRecord, AuditTrail, HttpAuditSink
from portcullis.errors import ConfigurationError
from portcullis.freeze import ChangeCalendar, FreezeStatus, evaluate_freeze
from portcullis.lease import (
    LeaseKeeper,
    LeaseStore,
    LockLease,
    expired,
    holder_identity,
    lease_expiry,
)
from portcullis.policy import EnvironmentPolicy
from portcullis.settings import Settings
from portcullis.state import open_state

SYSTEM_ACTOR = "portcullis"


def open_audit_log(settings: Settings) -> AuditTrail:
    """The hash-chained trail in the state store (``PORTCULLIS_STATE_URL``), mirrored to
    ``PORTCULLIS_AUDIT_HTTP_URL`` when set."""
    mirrors = []
    url = os.environ.get("PORTCULLIS_AUDIT_HTTP_URL")
    if url:
        from pydantic import SecretStr

        mirrors.append(HttpAuditSink(url, SecretStr(os.environ.get("PORTCULLIS_AUDIT_HTTP_TOKEN", ""))))
    return open_state(settings).audit_log(mirrors=mirrors)


@dataclass(frozen=True)
class RunAudit:
    """Appends this run's decisions to the audit log with what/who/run/commit/when filled in.

    Immutable: a run learns its digest (and commit) part-way through, and says so once with
    :meth:`about`, which gives the records from there on their subject. A run is about one
    digest; naming another is a programming error, not something to record silently.
    """

    log: AuditTrail
    run_id: str
    app: str
    environment: str
    digest: str | None = None
    commit: str | None = None

    def about(self, digest: str, commit: str | None = None) -> RunAudit:
        """This run's trail with ``digest`` (and ``commit``, once known) on every record."""
        if self.digest is not None and self.digest != digest:
            raise ValueError(f"run {self.run_id} is about {self.digest}, not {digest}")
        if self.commit is not None and commit is not None and self.commit != commit:
            raise ValueError(f"run {self.run_id} is about commit {self.commit}, not {commit}")
        return replace(self, digest=digest, commit=commit or self.commit)

    def as_far_as_recorded(self) -> RunAudit:
        """This run's trail about the digest and commit its own latest records name.

        For records made where the stage that learnt the subject is out of reach, e.g. a
        refusal caught at the top of the flow: it still names what was refused.
        """
        digest, commit = self.digest, self.commit
        for record in self.log.run_records(self.run_id):
            digest, commit = record.digest or digest, record.commit or commit
        return replace(self, digest=digest, commit=commit)

    def record(self, event: str, actor: str = SYSTEM_ACTOR, **details: JsonValue) -> None:
        """Append one decision."""
        self.log.append(AuditEntry(
            event=event, actor=actor, run_id=self.run_id, app=self.app,
            environment=self.environment, digest=self.digest, commit=self.commit,
            details=dict(details),
        ))

    def earlier(self, event: str, **match: JsonValue) -> AuditRecord | None:
        """This run's first record of ``event`` whose details include ``match``, if any.

        A run that waited for people without holding a process (suspended) starts again from
        the top when it resumes; what it already did and recorded is taken from here instead
        of being done twice.
        """
        for record in self.log.run_records(self.run_id):
            if record.event == event and all(record.details.get(k) == v for k, v in match.items()):
                return record
        return None


def freeze_checker(policy: EnvironmentPolicy, credentials: DeployCredentials | None) -> Callable[[datetime], FreezeStatus]:
    """A function answering "is the environment frozen at this instant?" for this policy."""
    calendar = None
    if policy.change_calendar_url:
        token = credentials.change_calendar_token if credentials else None
        if token is not None:
            calendar = ChangeCalendar(policy.change_calendar_url, token)
    return lambda at: evaluate_freeze(policy.freeze, at, calendar)


def freeze_gate(stage: str, check: Callable[[datetime], FreezeStatus], audit: RunAudit) -> FreezeStatus:
    """Check the freeze now, record the answer, and refuse when frozen."""
    status = check(datetime.now(UTC))
    audit.record("freeze.checked", stage=stage, frozen=status.frozen, summary=status.summary())
    status.raise_if_frozen()
    return status


def lock_name(environment: str) -> str:
    """The global concurrency limit that allows one deploy at a time to ``environment``."""
    return f"portcullis-deploy-{environment}"


def ensure_environment_lock(environment: str) -> None:
    """Create the environment's limit (1 slot) if the server does not have it yet."""
    name = lock_name(environment)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # another run created it between our read and our create


PREFECT_MIN_LEASE_SECONDS = 60.0
"""Prefect 3.8.8's server refuses a shorter lease on a concurrency slot (``ge=60``)."""

DEFAULT_WINDOW_SECONDS = 30.0
"""Heartbeat window of the lock when the environment has no canary to size it from."""


def lock_lease_seconds(window_seconds: float) -> float:
    """Prefect's lease on the slot: two windows, but never under the server's minimum.

    It is the backstop for a holder that left no heartbeat; the heartbeat (one window) is what
    frees a dead holder's slot within two windows.
    """
    return max(PREFECT_MIN_LEASE_SECONDS, 2 * window_seconds)


def _holder(run_id: str) -> ConcurrencyLeaseHolder | None:
    try:
        return ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id))
    except ValueError:
        return None


def _reclaim_dead_holder(client: SyncPrefectClient, store: LeaseStore[LockLease], subject: str,
                         audit: RunAudit) -> bool:
    """Free the slot of a holder whose heartbeat expired; True when one was freed."""
    with store.locked(subject):
        dead = store.read(subject)
        if dead is None or not expired(dead, datetime.now(UTC)):
            return False
        # Revoking by lease id frees exactly the dead holder's slot: if it was released in the
        # meantime, this is a no-op on the server.
        client.release_concurrency_slots_with_lease(UUID(dead.prefect_lease_id))
        store.remove(subject)
    audit.record("lock.reclaimed", lock=lock_name(subject), from_holder=dead.holder,
                 pid=dead.pid, host=dead.host, expired_at=dead.expires_at.isoformat())
    return True


def _acquire(client: SyncPrefectClient, name: str, store: LeaseStore[LockLease],
             environment: str, audit: RunAudit, window_seconds: float) -> UUID:
    poll = max(0.2, window_seconds / 4)
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency",
                lease_duration=lock_lease_seconds(window_seconds), holder=_holder(audit.run_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423 Locked: the slot is taken
                raise
            if not _reclaim_dead_holder(client, store, environment, audit):
                time.sleep(poll)
            continue
        granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        if not granted.limits:
            raise ConfigurationError(f"the Prefect server has no concurrency limit {name!r}",
                                     hint="it is created by ensure_environment_lock")
        return granted.lease_id


def lock_tampering(limit: GlobalConcurrencyLimitResponse) -> str | None:
    """Why ``limit`` no longer lets one deploy at a time in (None: it does).

    Anyone with the Prefect API can change a global concurrency limit. A disabled limit grants
    every request, a larger one lets several runs in, and slot decay frees a held slot by
    itself: each lets a second promotion deploy alongside the first, silently.
    """
    problems = []
    if not limit.active:
        problems.append("is disabled (a disabled limit grants every request)")
    if limit.limit != 1:
        problems.append(f"allows {limit.limit} at once")
    if limit.slot_decay_per_second:
        problems.append(f"frees held slots by decay ({limit.slot_decay_per_second:g}/s)")
    return "; ".join(problems) or None


def _refuse_tampered_lock(client: SyncPrefectClient, name: str, store: LeaseStore[LockLease],
                          environment: str, audit: RunAudit, lease_id: UUID) -> None:
    """Give the slot back and refuse when it was granted by a lock someone changed.

    Checked after the grant, so that whatever change let this run in is seen by this run.
    """
    problem = lock_tampering(client.read_global_concurrency_limit_by_name(name))
    if problem is None:
        with store.locked(environment):
            other = store.read(environment)
        if (other is not None and not expired(other, datetime.now(UTC))
                and other.holder != holder_identity(audit.run_id)):
            # The holder's heartbeat is live: the server's slot count was reset under it.
            problem = (f"was granted while {other.holder} still holds it (its heartbeat is live): "
                       "the slot count was changed")
    if problem is None:
        return
    client.release_concurrency_slots_with_lease(lease_id)
    audit.record("lock.refused", lock=name, reason=problem)
    raise ConfigurationError(
        f"the deploy lock {name} {problem}; refused rather than deploy alongside another run",
        hint=f"restore it (`prefect gcl update {name} --limit 1 --enable --slot-decay-per-second 0`) "
             "and find out who changed it",
    )


@contextmanager
def environment_lock(environment: str, audit: RunAudit, *,
                     window_seconds: float = DEFAULT_WINDOW_SECONDS,
                     state_dir: Path | None = None) -> Iterator[None]:
    """Hold the environment's one deploy slot; strict, so a missing limit is an error, not a pass.

    Taken after approval (a paused run must not block others) and held until traffic has
    settled. A deployment's own concurrency limit is no substitute: Prefect releases that slot
    while a run is paused.

    The holder keeps a heartbeat lease of one ``window_seconds`` in ``state_dir`` (default
    ``<home>/locks``) and Prefect's lease on the slot renewed; a run waiting for the slot
    revokes the Prefect lease of a holder whose heartbeat expired, so a killed run frees it
    within two windows instead of Prefect's lease (at least 60 s) plus its repossessor loop.
    If the slot is taken from a holder that is in fact alive, Prefect's renewal fails and
    cancels that holder's execution, as ``concurrency(strict=True)`` does.
    """
    ensure_environment_lock(environment)
    name = lock_name(environment)
    store = LeaseStore(state_dir or Settings().home / "locks", LockLease)
    with get_client(sync_client=True) as client:
        lease_id = _acquire(client, name, store, environment, audit, window_seconds)
        _refuse_tampered_lock(client, name, store, environment, audit, lease_id)
        heartbeat = LeaseKeeper(store, LockLease(
            subject=environment, holder=holder_identity(audit.run_id), pid=os.getpid(),
            host=socket.gethostname(), ttl_seconds=window_seconds,
            expires_at=lease_expiry(window_seconds), environment=environment,
            prefect_lease_id=str(lease_id))).start()
        try:
            with maintain_concurrency_lease(lease_id, lock_lease_seconds(window_seconds),
                                            raise_on_lease_renewal_failure=True):
                audit.record("lock.acquired", lock=name)
                try:
                    yield
                finally:
                    audit.record("lock.released", lock=name,
                                 heartbeat_lost=heartbeat.lost.is_set())
        finally:
            heartbeat.stop()
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except httpx.HTTPError as exc:
                # Not raised over the run's own outcome: the slot frees itself when Prefect's
                # lease runs out, since nothing renews it any more.
                audit.record("lock.release-failed", lock=name, reason=str(exc))
