"""Signed promotion records: what lets a digest into the next environment.

Every completed promotion (and every rollback) produces an in-toto Statement v1 about the
digest with predicate type :data:`PROMOTION_V1`, signed by the deploy side of *that*
environment with its own promotion key (never the build key). The record is stored in
cosign's key-pair layout (a DSSE envelope in an OCI manifest under tag ``sha256-<hex>.att``)
in the repository :func:`record_repository` names, ``promotions/<environment>/<image repo>``
(cosign's ``COSIGN_REPOSITORY``)::

    COSIGN_REPOSITORY=REGISTRY/promotions/staging/portcullis/hello \\
      cosign verify-attestation --key staging-promotion.pub \\
      --type https://portcullis.dev/promotion/v1 REGISTRY/portcullis/hello@sha256:...

Records live apart from the image repository because registry tokens are scoped per
repository, never per tag: a promoter allowed to push into the image repository could push
image tags there. Here it may push records and nothing else (see infra/registry_auth.py).

The next environment's deploy side takes a digest only when :func:`verify_promotion` finds a
record for that digest, app and environment signed by a key in that environment's trust root.
No audit log line, file or database row is consulted: a forged one gets nothing through.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import Field, ValidationError

from portcullis.attestations import statement
from portcullis.errors import PolicyRefusal, VerificationFailed
from portcullis.models import Digest, Frozen, ImageRef
from portcullis.oci import RegistryClient
from portcullis.signing import cosign_format

PROMOTION_V1 = "https://portcullis.dev/promotion/v1"
#: First path component of every promotion-record repository; no image is deployed from below.
RECORDS_ROOT = "promotions"
CHECK = "promotion-record"


def record_repository(image: ImageRef, environment: str) -> str:
    """Where ``environment``'s records about ``image``'s repository live (same registry)."""
    return f"{RECORDS_ROOT}/{environment}/{image.repository}"


class EvidenceEntry(Frozen):
    """One piece of build evidence the deploy side verified before it let the digest in."""

    check: str = Field(description="signature, provenance, sbom, scan")
    detail: str
    signer: str = Field(default="", description="trusted key id or keyless identity")
    attestation: str = Field(default="", description="digest of the verified attestation")


class ApprovalEntry(Frozen):
    """One approval that counted."""

    approver: str
    at: datetime | None = None
    verified_by: str = Field(description="how the approver's identity was verified")


class FreezeEntry(Frozen):
    """The change-freeze decision taken right before traffic moved."""

    frozen: bool
    bypassed: bool = Field(default=False, description="emergency path: recorded, not enforced")
    summary: str
    checked_at: datetime


class CanaryStepEntry(Frozen):
    """One canary step: its verdict with the numbers it was judged on."""

    step: int
    summary: str


class CanaryEntry(Frozen):
    """What the canary analysis decided."""

    phase: str
    reason: str
    decided_by: str
    steps: tuple[CanaryStepEntry, ...] = ()


class PromotionPredicate(Frozen):
    """The predicate of a promotion record: who let this digest in, and on what evidence."""

    kind: Literal["promotion", "rollback"]
    app: str
    environment: str
    image: str = Field(description="registry/repository@digest")
    digest: Digest
    commit: str = ""
    policy_sha256: str
    requested_by: str | None = None
    evidence: tuple[EvidenceEntry, ...] = ()
    freeze: FreezeEntry | None = None
    approvals: tuple[ApprovalEntry, ...] = ()
    canary: CanaryEntry | None = None
    incident_ticket: str | None = None
    run_id: str
    run_url: str | None = None
    started_at: datetime | None = None
    completed_at: datetime
    deployed_to: str | None = Field(default=None, description="URL, or the GitOps commit")
    rolled_back_from: str | None = Field(default=None, description="rollback: the digest replaced")
    reason: str | None = Field(default=None, description="rollback: why")


@dataclass(frozen=True)
class SignedRecord:
    """Where a promotion record was stored and how long signing and pushing took."""

    location: str  # registry/repository:tag
    envelope_digest: str
    key_id: str
    seconds: float


@dataclass(frozen=True)
class VerifiedPromotion:
    """A promotion record that verified against an environment's trust root."""

    image: ImageRef
    predicate: PromotionPredicate
    key_id: str
    envelope_digest: str
    location: str

    def describe(self) -> str:
        """Who let this digest in, and on what evidence: lines for people."""
        p = self.predicate
        lines = [
            f"{p.image}",
            f"  {p.kind} to {p.environment} of {p.app} completed {p.completed_at.isoformat()}",
            (f"  record   {self.location} ({self.envelope_digest[:19]}), "
             f"signed by {p.environment}'s deploy side key:{self.key_id[:16]}"),
            f"  run      {p.run_url or p.run_id}"
            + (f", requested by {p.requested_by}" if p.requested_by else ""),
            f"  policy   sha256 {p.policy_sha256}",
        ]
        if p.commit:
            lines.append(f"  commit   {p.commit}")
        lines += [f"  evidence {e.check}: {e.detail}"
                  + (f" [attestation {e.attestation[:19]}]" if e.attestation else "")
                  for e in p.evidence]
        if p.freeze is not None:
            state = "bypassed (emergency)" if p.freeze.bypassed else ("frozen" if p.freeze.frozen else "clear")
            lines.append(f"  freeze   {state}: {p.freeze.summary}")
        lines += [f"  approved by {a.approver}"
                  + (f" at {a.at.isoformat()}" if a.at else "") + f" ({a.verified_by})"
                  for a in p.approvals]
        if not p.approvals:
            lines.append("  approved by nobody (the policy asks for no approval)")
        if p.canary is not None:
            lines.append(f"  canary   {p.canary.phase}, decided by {p.canary.decided_by}")
            lines += [f"           step {s.step}: {s.summary}" for s in p.canary.steps]
        if p.incident_ticket:
            lines.append(f"  incident {p.incident_ticket}")
        if p.kind == "rollback":
            lines.append(f"  rolled back from {p.rolled_back_from}: {p.reason}")
        if p.deployed_to:
            lines.append(f"  running  {p.deployed_to}")
        return "\n".join(lines)


def sign_promotion(
    client: RegistryClient, image: ImageRef, predicate: PromotionPredicate,
    key: ec.EllipticCurvePrivateKey,
) -> SignedRecord:
    """Sign ``predicate`` as an in-toto statement about ``image`` and push it.

    Args:
        client: a registry client that may pull ``image`` and push to its record repository
            (the promoter account).
        image: the digest the record is about.
        predicate: what happened; its digest and environment must match.
        key: the environment's promotion signing key.

    Raises:
        PolicyRefusal: the predicate is about another digest.
    """
    if predicate.digest != image.digest:
        raise PolicyRefusal(f"refusing to sign a record about {predicate.digest} for {image}")
    started = time.monotonic()
    repository = record_repository(image, predicate.environment)
    pushed = cosign_format.attest(
        client, image, statement(image, PROMOTION_V1, predicate.model_dump(mode="json")), key,
        repository=repository,
    )
    return SignedRecord(
        location=f"{image.registry}/{repository}:{pushed.tag}",
        envelope_digest=pushed.layer_digest,
        key_id=cosign_format.key_id(key.public_key()),
        seconds=time.monotonic() - started,
    )


def verify_promotion(
    client: RegistryClient,
    image: ImageRef,
    environment: str,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    app: str | None = None,
    kinds: Sequence[str] = ("promotion",),
) -> VerifiedPromotion:
    """The newest record showing ``image`` completed a promotion to ``environment``.

    A record counts only if its DSSE signature verifies with one of ``trusted_keys`` (that
    environment's trust root), its statement's subject is ``image.digest``, and its signed
    predicate names the same digest, ``environment``, ``app`` (when given) and one of
    ``kinds``. Only the registry and the keys are consulted.

    Raises:
        VerificationFailed: check ``promotion-record``, with every reason a candidate failed.
    """
    if image.repository == RECORDS_ROOT or image.repository.startswith(RECORDS_ROOT + "/"):
        raise VerificationFailed(CHECK, image.digest,
                                 f"{image.name} is a promotion-record repository, not an image's")
    if not trusted_keys:
        raise VerificationFailed(CHECK, image.digest,
                                 f"no trust root is configured for {environment}'s promotions")
    repository = record_repository(image, environment)
    try:
        found = cosign_format.verify_attestations(
            client, image, trusted_keys, PROMOTION_V1, repository=repository)
    except VerificationFailed as exc:
        raise VerificationFailed(
            CHECK, image.digest,
            f"no {environment} promotion record signed by {environment}'s deploy side: {exc.reason}",
        ) from None
    reasons: list[str] = []
    best: VerifiedPromotion | None = None
    for att in found:
        try:
            predicate = PromotionPredicate.model_validate(att.statement.get("predicate"))
        except ValidationError as exc:
            reasons.append(f"record {att.envelope_digest[:19]} is malformed: {exc.errors()[0]['msg']}")
            continue
        problem = (
            f"is about {predicate.digest}" if predicate.digest != image.digest
            else f"is for {predicate.environment}" if predicate.environment != environment
            else f"is for app {predicate.app}" if app is not None and predicate.app != app
            else f"records a {predicate.kind}" if predicate.kind not in kinds
            else None
        )
        if problem is not None:
            reasons.append(f"record {att.envelope_digest[:19]} {problem}")
            continue
        if best is None or predicate.completed_at > best.predicate.completed_at:
            best = VerifiedPromotion(image, predicate, att.key_id, att.envelope_digest,
                                     f"{image.registry}/{repository}:{cosign_format.attestation_tag(image.digest)}")
    if best is None:
        raise VerificationFailed(CHECK, image.digest, "; ".join(reasons) or "no record")
    return best


__all__ = [
    "CHECK",
    "PROMOTION_V1",
    "RECORDS_ROOT",
    "ApprovalEntry",
    "CanaryEntry",
    "CanaryStepEntry",
    "EvidenceEntry",
    "FreezeEntry",
    "PromotionPredicate",
    "SignedRecord",
    "VerifiedPromotion",
    "record_repository",
    "sign_promotion",
    "verify_promotion",
]
