"""Glue for the gates: the audit trail of a run, freeze checks, and the environment lock.

The rules live in ``portcullis.freeze``, ``portcullis.approval`` and ``portcullis.audit``; this
module only connects them to a flow run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import JsonValue

from blocks.credentials import DeployCredentials
from portcullis.audit import AuditEntry, AuditLog, AuditRecord, HttpAuditSink
from portcullis.freeze import ChangeCalendar, FreezeStatus, evaluate_freeze
from portcullis.policy import EnvironmentPolicy
from portcullis.settings import Settings

SYSTEM_ACTOR = "portcullis"


def open_audit_log(settings: Settings) -> AuditLog:
    """The local hash-chained log, mirrored to ``PORTCULLIS_AUDIT_HTTP_URL`` when set."""
    mirrors = []
    url = os.environ.get("PORTCULLIS_AUDIT_HTTP_URL")
    if url:
        from pydantic import SecretStr

        mirrors.append(HttpAuditSink(url, SecretStr(os.environ.get("PORTCULLIS_AUDIT_HTTP_TOKEN", ""))))
    settings.audit_path.parent.mkdir(parents=True, exist_ok=True)
    return AuditLog(settings.audit_path, mirrors=mirrors)


@dataclass
class RunAudit:
    """Appends this run's decisions to the audit log with what/who/run/commit/when filled in."""

    log: AuditLog
    run_id: str
    app: str
    environment: str
    digest: str | None = None
    commit: str | None = None

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
        for record in self.log.records():
            if (record.run_id == self.run_id and record.event == event
                    and all(record.details.get(k) == v for k, v in match.items())):
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


@contextmanager
def environment_lock(environment: str, audit: RunAudit) -> Iterator[None]:
    """Hold the environment's one deploy slot; strict, so a missing limit is an error, not a pass.

    Taken after approval (a paused run must not block others) and held until traffic has
    settled. A deployment's own concurrency limit is no substitute: Prefect releases that slot
    while a run is paused.
    """
    ensure_environment_lock(environment)
    with concurrency(lock_name(environment), occupy=1, strict=True):
        audit.record("lock.acquired", lock=lock_name(environment))
        try:
            yield
        finally:
            audit.record("lock.released", lock=lock_name(environment))
