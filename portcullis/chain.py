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
