"""The promotion chain: staging and prod only take digests that passed the environment before.

"Passed" means a promotion record for that digest, app and environment, signed by that
environment's deploy side and verified against its trust root (:mod:`portcullis.promotion_record`).
The audit log is never evidence of a pass: a forged line, even with the anchor rewritten, gets
nothing through. Scheduled runs may use the log to *find* a candidate (:func:`newest_passed`);
the candidate is then checked with :func:`passed_in` like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from portcullis.audit import AuditRecord, AuditTrail
from portcullis.errors import ConfigurationError, PolicyRefusal
from portcullis.models import ImageRef
from portcullis.oci import RegistryClient
from portcullis.promotion_record import VerifiedPromotion, verify_promotion

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


def passed_in(
    client: RegistryClient, image: ImageRef, environment: str,
    trust_root: Sequence[ec.EllipticCurvePublicKey], app: str,
) -> VerifiedPromotion:
    """The signed record showing ``image`` of ``app`` completed a promotion to ``environment``.

    Args:
        client: reads the image and the record repository (pull is enough).
        image: the digest-pinned candidate.
        environment: the environment it must have passed.
        trust_root: public keys of that environment's deploy side.
        app: the app being promoted; a record about another app does not count.

    Raises:
        PolicyRefusal: it never did (no record verifies), naming why.
        ConfigurationError: no trust root is configured.
    """
    try:
        return verify_promotion(client, image, environment, trust_root, app=app)
    except ConfigurationError:
        raise
    except PolicyRefusal as exc:
        raise PolicyRefusal(
            f"{image.digest} never passed {environment}: only digests promoted there (verified, "
            f"canaried and promoted, with a record signed by {environment}'s deploy side) may "
            f"go further; {exc}",
            hint=f"promote it to {environment} first",
        ) from None


def newest_passed(log: AuditTrail, app: str, environment: str) -> AuditRecord | None:
    """A candidate for a scheduled run: the newest ``promotion.completed`` of ``app`` in
    ``environment`` in the verified audit log. Not proof of anything: check it with
    :func:`passed_in`."""
    for record in reversed(_verified_records(log)):
        if record.event == COMPLETED and record.environment == environment and record.app == app:
            return record
    return None


ROLLED_BACK = "rollback.completed"
BUILT = "build.completed"
SCAN_VERDICT = "scan.verdict"


def running_in(log: AuditTrail, app: str, environment: str) -> AuditRecord | None:
    """The record of what runs in ``environment`` now: the newest promotion or rollback there."""
    for record in reversed(_verified_records(log)):
        if (record.event in (COMPLETED, ROLLED_BACK) and record.environment == environment
                and record.app == app and record.digest is not None):
            return record
    return None


def built_before(log: AuditTrail, app: str, commit: str, base_image: str | None, *,
                 source: str, context: str) -> AuditRecord | None:
    """The newest ``build.completed`` record of ``app`` at ``commit`` on ``base_image``, built
    from repository ``source`` (its URL as provenance records it) and directory ``context``.

    A record without a base image or a context (written before builds recorded them) never
    matches: reusing it could hide a changed base, or another directory's code built under
    this app's name. Neither does a build whose evidence was never completed.
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
                and record.details.get("source") == source and record.details.get("context") == context
                and (record.run_id, record.digest) in attested):
            return record
    return None
