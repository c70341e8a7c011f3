"""The promotion chain: staging and prod only take digests that passed the environment before.

"Passed" means the audit log holds a ``promotion.completed`` record for that digest in that
environment; the record counts only if the hash chain verifies, so an edited log cannot
manufacture a pass.
"""

from __future__ import annotations

from portcullis.audit import AuditLog, AuditRecord
from portcullis.errors import PolicyRefusal

COMPLETED = "promotion.completed"


def _verified_records(log: AuditLog) -> list[AuditRecord]:
    report = log.verify()
    if not report.ok:
        raise PolicyRefusal(
            f"the audit log {log.path} does not verify (record {report.first_broken}: {report.reason}); "
            "no promotion history can be trusted",
            hint="investigate the log; `python -m portcullis.audit verify` shows the broken record",
        )
    return log.records()


def passed_in(log: AuditLog, digest: str, environment: str) -> AuditRecord:
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


def newest_passed(log: AuditLog, app: str, environment: str) -> AuditRecord | None:
    """The most recent digest of ``app`` that completed a promotion to ``environment``."""
    for record in reversed(_verified_records(log)):
        if record.event == COMPLETED and record.environment == environment and record.app == app:
            return record
    return None


ROLLED_BACK = "rollback.completed"
BUILT = "build.completed"
SCAN_VERDICT = "scan.verdict"


def running_in(log: AuditLog, app: str, environment: str) -> AuditRecord | None:
    """The record of what runs in ``environment`` now: the newest promotion or rollback there."""
    for record in reversed(_verified_records(log)):
        if (record.event in (COMPLETED, ROLLED_BACK) and record.environment == environment
                and record.app == app and record.digest is not None):
            return record
    return None


def built_before(log: AuditLog, app: str, commit: str, base_image: str | None) -> AuditRecord | None:
    """The newest ``build.completed`` record of ``app`` at ``commit`` on ``base_image``.

    A record without a base image (written before builds recorded one) never matches: reusing
    it could hide a changed base. Neither does a build whose evidence was never completed.
    """
    if base_image is None:
        return None
    records = _verified_records(log)
    # Only a build whose run went on to attach its evidence (the scan verdict is recorded
    # last, after signature, provenance and SBOM) is a candidate.
    attested = {(r.run_id, r.digest) for r in records if r.event == SCAN_VERDICT}
    for record in reversed(records):
        if (record.event == BUILT and record.app == app and record.commit == commit
                and record.digest is not None and record.details.get("base_image") == base_image
                and (record.run_id, record.digest) in attested):
            return record
    return None
