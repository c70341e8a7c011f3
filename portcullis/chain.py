"""The promotion chain: staging and prod only take digests that passed the environment before.

"Passed" means the audit log holds a ``promotion.completed`` record for that digest in that
environment; the record counts only if the hash chain verifies, so an edited log cannot
manufacture a pass.
"""

from __future__ import annotations

from portcullis.audit import AuditRecord, AuditTrail
from portcullis.errors import PolicyRefusal

COMPLETED = "promotion.completed"


def _verified_records(log: AuditTrail) -> list[AuditRecord]:
    report = log.verify()
    if not report.ok:
        raise PolicyRefusal(
            f"the audit trail {log.location} does not verify (record {report.first_broken}: {report.reason}); "
            "no promotion history can be trusted",
            hint="investigate the log; `python -m portcullis.audit verify` shows the broken record",
        )
    return log.records()


def verified_records(log: AuditTrail) -> list[AuditRecord]:
    """Every record of ``log``; refuses when its hash chain does not verify."""
    return _verified_records(log)


def passed_in(log: AuditTrail, digest: str, environment: str) -> AuditRecord:
    """The record showing ``digest`` completed a promotion to ``environment``.

    Raises:
        PolicyRefusal: it never did.
    """
    for record in reversed(_verified_records(log)):
        if record.event == COMPLETED and record.environment == environment and record.digest == digest:
            return record
    raise PolicyRefusal(
        f"{digest} never passed {environment}: only digests promoted there (verified, canaried "
        f"and promoted) may go further",
        hint=f"promote it to {environment} first",
    )


def newest_passed(log: AuditTrail, app: str, environment: str) -> AuditRecord | None:
    """The most recent digest of ``app`` that completed a promotion to ``environment``."""
    for record in reversed(_verified_records(log)):
        if record.event == COMPLETED and record.environment == environment and record.app == app:
            return record
    return None
