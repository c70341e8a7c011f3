"""Evidence stored next to an image, behind one interface for both signing modes.

* Key pair: cosign's own layout (``sha256-<hex>.sig`` / ``.att`` tags), so ``cosign verify
  --key`` and ``cosign verify-attestation --key`` accept what we push.
* Keyless (Sigstore): bundles pushed as OCI referrers of the image (the registry's referrers
  API, or the ``sha256-<hex>`` tag-schema fallback where it has none).

Whatever the mode, the verifier's answer is the same: which trusted signer signed this digest,
and which in-toto statements about this digest that signer vouches for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from portcullis.errors import VerificationFailed
from portcullis.models import ImageRef
from portcullis.oci import RegistryClient
from portcullis.signing import cosign_format
from portcullis.signing.keyless import (
    BUNDLE_MEDIA_TYPE,
    KeylessSigner,
    KeylessVerifier,
    simple_signing_payload,
)

# Annotation on a keyless referrer that says what the bundle carries. It is only a hint for
# finding things: the verifier re-derives everything from the signed content.
KIND_ANNOTATION = "dev.portcullis.evidence"
SIMPLESIGNING_MEDIA_TYPE = cosign_format.SIMPLESIGNING_MEDIA_TYPE


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
    """Signs keyless with Sigstore and pushes each bundle as an OCI referrer of the image."""

    def __init__(self, client: RegistryClient, signer: KeylessSigner) -> None:
        self._client = client
        self._signer = signer

    def _push(self, image: ImageRef, kind: str, bundle: bytes, payload: bytes | None) -> str:
        layers = [self._client.push_blob_descriptor(image.repository, bundle, BUNDLE_MEDIA_TYPE)]
        if payload is not None:
            layers.append(self._client.push_blob_descriptor(
                image.repository, payload, SIMPLESIGNING_MEDIA_TYPE))
        subject = self._client.head_manifest(image.repository, image.digest)
        if subject is None:
            raise VerificationFailed(kind, image.digest, f"{image} is not in the registry")
        pushed = self._client.attach_artifact(
            image.repository, subject, artifact_type=BUNDLE_MEDIA_TYPE, layers=layers,
            annotations={KIND_ANNOTATION: kind},
        )
        return f"{image.name}@{pushed.digest}"

    def sign_image(self, image: ImageRef) -> str:
        """Sign the simple-signing payload for the digest; push bundle and payload."""
        payload = simple_signing_payload(image)
        bundle = self._signer.sign_image_signature(payload)
        return self._push(image, "signature", bundle.bundle_bytes(), payload)

    def attest(self, image: ImageRef, predicate_type: str, predicate: dict[str, Any]) -> str:
        """Sign an in-toto statement as a DSSE bundle and push it."""
        bundle = self._signer.sign_statement(
            digest=image.digest, subject_name=image.name, predicate_type=predicate_type,
            predicate=predicate,
        )
        return self._push(image, predicate_type, bundle.bundle_bytes(), None)


class KeylessEvidenceVerifier:
    """Verifies Sigstore bundles found among the image's referrers."""

    def __init__(self, client: RegistryClient, verifiers: Sequence[KeylessVerifier]) -> None:
        self._client = client
        self._verifiers = list(verifiers)

    def _bundles(self, image: ImageRef, kind: str) -> list[tuple[bytes, bytes | None, str]]:
        found = []
        for ref in self._client.list_referrers(image.repository, image.digest,
                                               artifact_type=BUNDLE_MEDIA_TYPE):
            manifest = json.loads(self._client.get_manifest(image.repository, ref.digest).raw)
            if manifest.get("annotations", {}).get(KIND_ANNOTATION) != kind:
                continue
            # The fallback index is an unsigned pointer list: check the subject ourselves.
            if manifest.get("subject", {}).get("digest") != image.digest:
                continue
            layers = manifest.get("layers", [])
            blobs = {lay["mediaType"]: self._client.get_blob(image.repository, lay["digest"])
                     for lay in layers}
            if BUNDLE_MEDIA_TYPE in blobs:
                found.append((blobs[BUNDLE_MEDIA_TYPE], blobs.get(SIMPLESIGNING_MEDIA_TYPE),
                              ref.digest))
        return found

    def verify_signature(self, image: ImageRef) -> str:
        """The identity that signed exactly this digest."""
        if not self._verifiers:
            raise VerificationFailed("signature", image.digest, "no trusted identities were given")
        reasons = []
        for bundle, payload, _ in self._bundles(image, "signature"):
            for verifier in self._verifiers:
                try:
                    ok = verifier.verify_image_signature(bundle, payload or b"", digest=image.digest)
                except VerificationFailed as exc:
                    reasons.append(exc.reason)
                    continue
                return f"{ok.signer.identity} ({ok.signer.issuer})"
        raise VerificationFailed(
            "signature", image.digest,
            "; ".join(dict.fromkeys(reasons)) or "no Sigstore signature is attached to this digest",
        )

    def statements(self, image: ImageRef, predicate_type: str) -> list[VerifiedEvidence]:
        """Verified statements of ``predicate_type`` about this digest."""
        out = []
        for bundle, _, where in self._bundles(image, predicate_type):
            for verifier in self._verifiers:
                try:
                    st = verifier.verify_statement(bundle, digest=image.digest,
                                                   predicate_type=predicate_type)
                except VerificationFailed:
                    continue
                out.append(VerifiedEvidence(f"{st.signer.identity} ({st.signer.issuer})",
                                            st.statement, where))
                break
        return out


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
