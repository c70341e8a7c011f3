"""Deploy-side verification: every check must pass for the exact digest, or nothing deploys.

Checks are small objects with one ``verify()`` method combined with :class:`AllOf`. An empty
``AllOf`` fails: a policy with nothing in it never passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from pydantic import Field

from portcullis.attestations import BUILDER_ID, CYCLONEDX_BOM, SLSA_PROVENANCE_V1
from portcullis.errors import VerificationFailed
from portcullis.evidence import EvidenceVerifier, VerifiedEvidence
from portcullis.models import Frozen, ImageRef


class CheckResult(Frozen):
    """One passed check: its name and what it established."""

    check: str
    detail: str
    facts: dict[str, str] = Field(default_factory=dict, description="structured findings")
    signer: str = Field(default="", description="the trusted key or identity that signed it")
    attestation: str = Field(default="", description="digest of the signed attestation, if any")


class VerifiedProvenance(Frozen):
    """What the verified SLSA provenance established about the digest's source."""

    repository: str
    ref: str
    commit: str
    author: str = ""
    signer: str = ""


def verified_provenance(checks: Sequence[CheckResult]) -> VerifiedProvenance:
    """The source the verified provenance among ``checks`` names.

    Raises:
        VerificationFailed: no provenance check among ``checks``.
    """
    found = next((c.facts for c in checks if c.check == "provenance"), None)
    if found is None:
        raise VerificationFailed("provenance", "the digest", "no verified provenance among the checks")
    return VerifiedProvenance.model_validate(found)


class Check(Protocol):
    """A deploy-side check of the evidence for one digest."""

    @property
    def name(self) -> str:
        """The check's name, as refusals and results report it."""

    def verify(self, image: ImageRef, evidence: EvidenceVerifier) -> list[CheckResult]:
        """Return what passed, or raise :class:`VerificationFailed`."""


@dataclass(frozen=True)
class SignatureCheck:
    """A trusted key or identity signed exactly this digest."""

    name: str = "signature"

    def verify(self, image: ImageRef, evidence: EvidenceVerifier) -> list[CheckResult]:
        """Verify the image signature."""
        signer = evidence.verify_signature(image)
        return [CheckResult(check=self.name, detail=f"signed by {signer}", signer=signer)]


def _one(image: ImageRef, evidence: EvidenceVerifier, check: str, predicate_type: str) -> list[VerifiedEvidence]:
    found = evidence.statements(image, predicate_type)
    if not found:
        raise VerificationFailed(
            check, image.digest,
            f"no {predicate_type} attestation signed by a trusted signer is attached",
        )
    return found


@dataclass(frozen=True)
class ProvenanceCheck:
    """SLSA provenance from our builder, from an allowed repository and branch.

    Repositories and branches are fnmatch patterns (``feature/*``); a plain name matches only
    itself.
    """

    allowed_repositories: tuple[str, ...]
    allowed_branches: tuple[str, ...]
    builder_id: str = BUILDER_ID
    name: str = "provenance"

    def verify(self, image: ImageRef, evidence: EvidenceVerifier) -> list[CheckResult]:
        """Accept if any trusted provenance statement satisfies every rule."""
        if not self.allowed_branches or not self.allowed_repositories:
            raise VerificationFailed(self.name, image.digest,
                                     "the environment allows no source repository or branch")
        reasons = []
        for found in _one(image, evidence, self.name, SLSA_PROVENANCE_V1):
            pred: Any = found.predicate
            source = pred.get("buildDefinition", {}).get("externalParameters", {}).get("source", {})
            builder = pred.get("runDetails", {}).get("builder", {}).get("id")
            ref = str(source.get("ref", "")).removeprefix("refs/heads/")
            repo = source.get("repository")
            if builder != self.builder_id:
                reasons.append(f"built by {builder!r}, not {self.builder_id!r}")
            elif not any(fnmatchcase(str(repo), p) for p in self.allowed_repositories):
                reasons.append(f"source repository {repo!r} is not allowed")
            elif not any(fnmatchcase(ref, p) for p in self.allowed_branches):
                reasons.append(
                    f"built from branch {ref!r}; this environment only accepts "
                    f"{', '.join(self.allowed_branches)}"
                )
            else:
                commit = str(source.get("commit", ""))
                facts = {"repository": str(repo), "ref": ref, "commit": commit,
                         "author": str(source.get("author", "")), "signer": found.signer}
                return [CheckResult(check=self.name, facts=facts, signer=found.signer,
                                    attestation=found.attestation,
                                    detail=f"{repo} {ref} @ {commit[:12]}, {found.signer}")]
        raise VerificationFailed(self.name, image.digest, "; ".join(reasons))


@dataclass(frozen=True)
class AttestationCheck:
    """A signed attestation of a given type about this digest, optionally validated."""

    name: str
    predicate_type: str
    validate: Callable[[VerifiedEvidence], str | None] | None = None

    def verify(self, image: ImageRef, evidence: EvidenceVerifier) -> list[CheckResult]:
        """Accept the first statement that passes ``validate`` (None means: any)."""
        reasons = []
        for found in _one(image, evidence, self.name, self.predicate_type):
            problem = self.validate(found) if self.validate else None
            if problem is None:
                return [CheckResult(check=self.name, detail=f"signed by {found.signer}",
                                    signer=found.signer, attestation=found.attestation)]
            reasons.append(problem)
        raise VerificationFailed(self.name, image.digest, "; ".join(reasons))


def sbom_is_cyclonedx(found: VerifiedEvidence) -> str | None:
    """The SBOM predicate must be a CycloneDX document."""
    return None if found.predicate.get("bomFormat") == "CycloneDX" else "SBOM is not CycloneDX"


def sbom_check() -> AttestationCheck:
    """The signed CycloneDX SBOM attestation."""
    return AttestationCheck("sbom", CYCLONEDX_BOM, sbom_is_cyclonedx)


@dataclass(frozen=True)
class AllOf:
    """Every check must pass; an empty list fails."""

    checks: Sequence[Check]
    name: str = "all-of"

    def verify(self, image: ImageRef, evidence: EvidenceVerifier) -> list[CheckResult]:
        """Run every check in order; the first failure stops verification."""
        if not self.checks:
            raise VerificationFailed(self.name, image.digest, "the verification policy is empty")
        results: list[CheckResult] = []
        for check in self.checks:
            results.extend(check.verify(image, evidence))
        return results
