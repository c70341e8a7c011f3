"""Evidence stored next to an image, behind one interface for both signing modes.

* Key pair: cosign's own layout (``sha256-<hex>.sig`` / ``.att`` tags), so ``cosign verify
  --key`` and ``cosign verify-attestation --key`` accept what we push.
* Keyless (Sigstore): cosign v3's layout (its BUNDLE_SPEC): each signature or attestation is
  a Sigstore bundle holding a DSSE-wrapped in-toto statement about the digest, pushed as an OCI
  1.1 referrer of the image (artifactType ``application/vnd.dev.sigstore.bundle.v0.3+json``,
  the empty config, the bundle as the only layer, annotations ``dev.sigstore.bundle.content``,
  ``dev.sigstore.bundle.predicateType`` and ``org.opencontainers.image.created``; the
  registry's referrers API or the ``sha256-<hex>`` tag-schema fallback). The image signature
  is the statement cosign v3 signs (predicate type ``https://sigstore.dev/cosign/sign/v1``),
  so ``cosign verify --certificate-identity ... --certificate-oidc-issuer ...`` and an
  admission controller that reads cosign's layout find and check it.

Whatever the mode, the verifier's answer is the same: which trusted signer signed this digest,
and which in-toto statements about this digest that signer vouches for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from portcullis.errors import VerificationFailed
from portcullis.models import ImageRef
from portcullis.oci import RegistryClient
from portcullis.signing import cosign_format
from portcullis.signing.keyless import BUNDLE_MEDIA_TYPE, KeylessSigner, KeylessVerifier

#: The predicate type of a cosign v3 image signature (a statement about the digest, no predicate).
SIGN_PREDICATE_TYPE = "https://sigstore.dev/cosign/sign/v1"
# Annotations of cosign's bundle layout. They only help find things: the verifier re-derives
# everything from the signed content.
CONTENT_ANNOTATION = "dev.sigstore.bundle.content"
PREDICATE_TYPE_ANNOTATION = "dev.sigstore.bundle.predicateType"
CREATED_ANNOTATION = "org.opencontainers.image.created"


@dataclass(frozen=True)
class VerifiedEvidence:
    """A verified in-toto statement and who signed it."""

    signer: str
    statement: Mapping[str, Any] = field(repr=False)
    attestation: str = ""  # digest of the signed envelope or bundle, where one is known

    @property
    def predicate(self) -> Mapping[str, Any]:
        """The statement's predicate."""
        value = self.statement.get("predicate")
        return value if isinstance(value, Mapping) else {}


class EvidenceSigner(Protocol):
    """The build side's signing interface."""

    def sign_image(self, image: ImageRef) -> str:
        """Sign the digest; returns where the signature was stored."""

    def attest(self, image: ImageRef, predicate_type: str, predicate: dict[str, Any]) -> str:
        """Sign an in-toto statement about the digest; returns where it was stored."""


class EvidenceVerifier(Protocol):
    """The deploy side's verification interface."""

    def verify_signature(self, image: ImageRef) -> str:
        """Who (which key or identity) signed exactly this digest; raises if nobody trusted."""

    def statements(self, image: ImageRef, predicate_type: str) -> list[VerifiedEvidence]:
        """Statements of ``predicate_type`` about this digest, each signed by a trusted signer."""


class KeyPairSigner:
    """Signs with a cosign-format key pair and pushes cosign's own layout."""

    def __init__(self, client: RegistryClient, key: ec.EllipticCurvePrivateKey) -> None:
        self._client = client
        self._key = key

    def sign_image(self, image: ImageRef) -> str:
        """Push a ``.sig`` signature for the digest."""
        return str(cosign_format.sign_image(self._client, image, self._key).tag)

    def attest(self, image: ImageRef, predicate_type: str, predicate: dict[str, Any]) -> str:
        """Push a DSSE attestation under the ``.att`` tag."""
        from portcullis.attestations import statement

        pushed = cosign_format.attest(self._client, image, statement(image, predicate_type, predicate),
                                      self._key)
        return str(pushed.tag)


class KeyPairVerifier:
    """Verifies cosign key-pair signatures against the deploy side's trusted keys."""

    def __init__(self, client: RegistryClient, trusted_keys: Sequence[ec.EllipticCurvePublicKey]) -> None:
        self._client = client
        self._keys = list(trusted_keys)

    def verify_signature(self, image: ImageRef) -> str:
        """Key id of the trusted key that signed the digest."""
        return "key:" + cosign_format.verify_image_signature(self._client, image, self._keys).key_id[:16]

    def statements(self, image: ImageRef, predicate_type: str) -> list[VerifiedEvidence]:
        """Verified attestations of ``predicate_type``; empty when there are none."""
        try:
            found = cosign_format.verify_attestations(self._client, image, self._keys, predicate_type)
        except VerificationFailed:
            return []
        return [VerifiedEvidence("key:" + a.key_id[:16], a.statement, a.envelope_digest)
                for a in found]


class KeylessEvidenceSigner:
    """Signs keyless with Sigstore and pushes each bundle as an OCI referrer, as cosign v3 does."""

    def __init__(self, client: RegistryClient, signer: KeylessSigner) -> None:
        self._client = client
        self._signer = signer

    def _push(self, image: ImageRef, predicate_type: str, bundle: bytes) -> str:
        layers = [self._client.push_blob_descriptor(image.repository, bundle, BUNDLE_MEDIA_TYPE)]
        subject = self._client.head_manifest(image.repository, image.digest)
        if subject is None:
            raise VerificationFailed(predicate_type, image.digest, f"{image} is not in the registry")
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        pushed = self._client.attach_artifact(
            image.repository, subject, artifact_type=BUNDLE_MEDIA_TYPE, layers=layers,
            annotations={CONTENT_ANNOTATION: "dsse-envelope",
                         PREDICATE_TYPE_ANNOTATION: predicate_type, CREATED_ANNOTATION: created},
        )
        return f"{image.name}@{pushed.digest}"

    def sign_image(self, image: ImageRef) -> str:
        """Sign cosign v3's image-signature statement about the digest; push its bundle."""
        return self.attest(image, SIGN_PREDICATE_TYPE, {})

    def attest(self, image: ImageRef, predicate_type: str, predicate: dict[str, Any]) -> str:
        """Sign an in-toto statement as a DSSE bundle and push it."""
        bundle = self._signer.sign_statement(
            digest=image.digest, subject_name=image.name, predicate_type=predicate_type,
            predicate=predicate,
        )
        return self._push(image, predicate_type, bundle.bundle_bytes())


class KeylessEvidenceVerifier:
    """Verifies Sigstore bundles found among the image's referrers (cosign v3's layout)."""

    def __init__(self, client: RegistryClient, verifiers: Sequence[KeylessVerifier]) -> None:
        self._client = client
        self._verifiers = list(verifiers)

    def _bundles(self, image: ImageRef, predicate_type: str) -> list[tuple[bytes, str]]:
        found = []
        for ref in self._client.list_referrers(image.repository, image.digest,
                                               artifact_type=BUNDLE_MEDIA_TYPE):
            manifest = json.loads(self._client.get_manifest(image.repository, ref.digest).raw)
            if manifest.get("annotations", {}).get(PREDICATE_TYPE_ANNOTATION) != predicate_type:
                continue
            # The fallback index is an unsigned pointer list: check the subject ourselves.
            if manifest.get("subject", {}).get("digest") != image.digest:
                continue
            for layer in manifest.get("layers", []):
                if layer.get("mediaType") == BUNDLE_MEDIA_TYPE:
                    found.append((self._client.get_blob(image.repository, layer["digest"]),
                                  ref.digest))
        return found

    def _verified(self, image: ImageRef, predicate_type: str) -> tuple[list[VerifiedEvidence], list[str]]:
        out, reasons = [], []
        for bundle, where in self._bundles(image, predicate_type):
            for verifier in self._verifiers:
                try:
                    st = verifier.verify_statement(bundle, digest=image.digest,
                                                   predicate_type=predicate_type)
                except VerificationFailed as exc:
                    reasons.append(exc.reason)
                    continue
                out.append(VerifiedEvidence(f"{st.signer.identity} ({st.signer.issuer})",
                                            st.statement, where))
                break
        return out, reasons

    def verify_signature(self, image: ImageRef) -> str:
        """The identity that signed cosign's image-signature statement about exactly this digest."""
        if not self._verifiers:
            raise VerificationFailed("signature", image.digest, "no trusted identities were given")
        found, reasons = self._verified(image, SIGN_PREDICATE_TYPE)
        if found:
            return found[0].signer
        raise VerificationFailed(
            "signature", image.digest,
            "; ".join(dict.fromkeys(reasons)) or "no Sigstore signature is attached to this digest",
        )

    def statements(self, image: ImageRef, predicate_type: str) -> list[VerifiedEvidence]:
        """Verified statements of ``predicate_type`` about this digest."""
        return self._verified(image, predicate_type)[0]


class AnyVerifier:
    """Accepts evidence that any of several verifiers accepts (keys and identities together)."""

    def __init__(self, verifiers: Sequence[EvidenceVerifier]) -> None:
        if not verifiers:
            # An empty trust set must fail, never pass: refuse to build one.
            raise ValueError("AnyVerifier needs at least one verifier")
        self._verifiers = list(verifiers)

    def verify_signature(self, image: ImageRef) -> str:
        """The first trusted signer found; otherwise the last verifier's refusal."""
        errors: list[Exception] = []
        for verifier in self._verifiers:
            try:
                return verifier.verify_signature(image)
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
        raise errors[-1]

    def statements(self, image: ImageRef, predicate_type: str) -> list[VerifiedEvidence]:
        """Statements verified by any verifier."""
        return [s for v in self._verifiers for s in v.statements(image, predicate_type)]
