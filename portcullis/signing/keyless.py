"""Sigstore keyless signing and offline verification of image evidence.

Signing: the CI's OIDC identity token (ambient, or handed in) buys a short-lived certificate
from a Fulcio CA; the signature is logged in a Rekor transparency log; the result is a
Sigstore bundle (v0.3 JSON) that carries certificate, signature and log proof together.
Two kinds are produced:

* an image signature: the cosign "simple signing" payload naming the image digest, signed
  as a message signature (``hashedrekord`` entry);
* an attestation: an in-toto v1 Statement whose subject is the image digest, signed as a
  DSSE envelope (``dsse`` entry).

Verification is offline, against a ``trusted_root.json``, with a policy of *exact*
certificate identity and OIDC issuer -- what cosign's ``--certificate-identity`` and
``--certificate-oidc-issuer`` mean. Any failure raises
:class:`~portcullis.errors.VerificationFailed`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography.x509 import (
    Certificate,
    ExtensionNotFound,
    ObjectIdentifier,
    RFC822Name,
    SubjectAlternativeName,
    UniformResourceIdentifier,
)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sigstore import dsse
from sigstore.errors import CertValidationError, VerificationError
from sigstore.errors import Error as SigstoreError
from sigstore.models import Bundle, ClientTrustConfig, TrustedRoot
from sigstore.oidc import ExpiredIdentity, IdentityError, IdentityToken, detect_credential
from sigstore.sign import Signer, SigningContext
from sigstore.verify import Verifier
from sigstore.verify.policy import AllOf, Identity, VerificationPolicy

from portcullis.errors import (
    ConfigurationError,
    PolicyRefusal,
    TransientError,
    VerificationFailed,
)
from portcullis.models import Digest, Frozen, ImageRef


class _NotRaised(Exception):
    """Stands for a sigstore exception type this version of sigstore does not have."""


def _sigstore_error(module: str, name: str) -> type[Exception]:
    """A sigstore exception type that sigstore raises but does not export publicly.

    Looked up at import rather than imported from ``sigstore._internal``: if an upgrade moves
    it, errors are still classified by the URL they came from (see :func:`_service_error`)
    instead of this module failing to import.
    """
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return _NotRaised
    return found if isinstance(found, type) and issubclass(found, Exception) else _NotRaised


ExpiredCertificate = _sigstore_error("sigstore._internal.fulcio.client", "ExpiredCertificate")
FulcioClientError = _sigstore_error("sigstore._internal.fulcio.client", "FulcioClientError")
RekorClientError = _sigstore_error("sigstore._internal.rekor", "RekorClientError")

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
"""Media type of the bundles produced here (what an OCI referrer's artifactType names)."""

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE_V1 = "https://in-toto.io/Statement/v1"
SIMPLE_SIGNING_TYPE = "cosign container image signature"

# Fulcio's OIDC issuer extensions: 1.1 holds the raw string (deprecated but still issued),
# 1.8 the same value DER-encoded as UTF8String.
_OID_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
_OID_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")

_DIGEST = TypeAdapter(Digest)
_T = TypeVar("_T")


class BundleContent(StrEnum):
    """What a bundle signs."""

    MESSAGE_SIGNATURE = "message_signature"
    """A signature over a payload's SHA-256 (the image signature payload)."""
    DSSE = "dsse"
    """A DSSE envelope around an in-toto Statement (an attestation)."""


class SignerIdentity(Frozen):
    """Who signed: a certificate identity and the OIDC issuer that vouched for it.

    As a verification policy both must match *exactly*; there is no pattern matching, so a
    policy cannot be widened by accident.
    """

    identity: str = Field(
        min_length=1,
        description="certificate SAN: an e-mail address or a URI such as a CI workflow ref",
    )
    issuer: str = Field(min_length=1, description="OIDC issuer URL recorded in the certificate")


class SignedBundle(Frozen):
    """A Sigstore bundle just produced, with what it says in plain fields."""

    content: BundleContent
    digest: Digest = Field(description="the image digest the signed payload or statement names")
    bundle_json: str = Field(description="the Sigstore bundle, v0.3 JSON")
    media_type: str = BUNDLE_MEDIA_TYPE
    signer: SignerIdentity = Field(description="identity and issuer the CA certified")
    log_index: int = Field(description="index of the transparency log entry")

    def bundle_bytes(self) -> bytes:
        """The bundle JSON as UTF-8 bytes, ready to store as an OCI blob."""
        return self.bundle_json.encode()


class VerifiedSignature(Frozen):
    """An image signature (or artifact signature) that passed verification."""

    digest: Digest = Field(description="the digest that was verified")
    payload: bytes = Field(description="the signed payload")
    docker_reference: str | None = Field(
        default=None, description="repository the simple-signing payload names, if any"
    )
    signer: SignerIdentity
    log_index: int
    integrated_time: datetime | None = Field(
        default=None, description="when the transparency log recorded the entry"
    )


class VerifiedStatement(Frozen):
    """An in-toto attestation that passed verification; its subject includes ``digest``."""

    digest: Digest
    predicate_type: str
    predicate: dict[str, Any]
    statement: dict[str, Any] = Field(description="the whole verified in-toto Statement")
    signer: SignerIdentity
    log_index: int
    integrated_time: datetime | None = None


# --------------------------------------------------------------------------------------------
# The cosign simple-signing payload
# --------------------------------------------------------------------------------------------


def simple_signing_payload(image: ImageRef) -> bytes:
    """Build the cosign "simple signing" payload for ``image`` (what an image signature signs).

    Args:
        image: the image, pinned by digest.

    Returns:
        Compact JSON bytes: ``{"critical": {"identity": {"docker-reference": ...},
        "image": {"docker-manifest-digest": ...}, "type": ...}, "optional": null}``.
    """
    document = {
        "critical": {
            "identity": {"docker-reference": image.name},
            "image": {"docker-manifest-digest": image.digest},
            "type": SIMPLE_SIGNING_TYPE,
        },
        "optional": None,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def parse_simple_signing_payload(payload: bytes) -> tuple[str | None, str]:
    """Read the repository and the digest a simple-signing payload names.

    Args:
        payload: the payload bytes.

    Returns:
        ``(docker_reference or None, manifest digest)``.

    Raises:
        ValueError: the payload is not a cosign container image signature payload.
    """
    try:
        critical = json.loads(payload)["critical"]
        kind = critical["type"]
        digest = critical["image"]["docker-manifest-digest"]
        reference = critical.get("identity", {}).get("docker-reference")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a cosign simple-signing payload: {exc!r}") from None
    if kind != SIMPLE_SIGNING_TYPE:
        raise ValueError(f"payload type is {kind!r}, expected {SIMPLE_SIGNING_TYPE!r}")
    try:
        digest = _DIGEST.validate_python(digest)
    except ValidationError:
        raise ValueError(f"payload names {digest!r}, which is not a sha256 digest") from None
    if reference is not None and not isinstance(reference, str):
        raise ValueError("payload's docker-reference is not a string")
    return reference, digest


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def _certificate_issuer(cert: Certificate) -> str | None:
    """The OIDC issuer Fulcio recorded, preferring the DER-encoded (1.8) extension."""
    try:
        raw: bytes = cert.extensions.get_extension_for_oid(_OID_ISSUER_V2).value.value  # type: ignore[attr-defined]
        return _decode_der_utf8(raw)
    except (ExtensionNotFound, ValueError):
        pass
    try:
        value: bytes = cert.extensions.get_extension_for_oid(_OID_ISSUER_V1).value.value  # type: ignore[attr-defined]
        return value.decode()
    except (ExtensionNotFound, UnicodeDecodeError):
        return None


def _decode_der_utf8(raw: bytes) -> str:
    if len(raw) < 2 or raw[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    length, offset = raw[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, offset = int.from_bytes(raw[2 : 2 + count], "big"), 2 + count
    if offset + length != len(raw):
        raise ValueError("DER UTF8String length does not match")
    return raw[offset:].decode()


def _certificate_identities(cert: Certificate) -> list[str]:
    """The e-mail and URI SANs, the identities Fulcio certifies."""
    try:
        san = cert.extensions.get_extension_for_class(SubjectAlternativeName).value
    except ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(RFC822Name),
        *san.get_values_for_type(UniformResourceIdentifier),
    ]


def _signer_of(cert: Certificate) -> SignerIdentity:
    identities = _certificate_identities(cert)
    return SignerIdentity(
        identity=identities[0] if identities else "<none>",
        issuer=_certificate_issuer(cert) or "<none>",
    )


class _ExactIssuer:
    """Policy: the certificate's OIDC issuer equals ``issuer`` exactly (as cosign compares it)."""

    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def verify(self, cert: Certificate) -> None:
        """Raise ``VerificationError`` unless the certificate names the expected issuer."""
        actual = _certificate_issuer(cert)
        if actual is None:
            raise VerificationError("certificate records no OIDC issuer")
        if actual != self._issuer:
            raise VerificationError(
                f"certificate was issued on a token from OIDC issuer {actual!r}; "
                f"policy requires {self._issuer!r}"
            )


class _ExactIdentity:
    """Policy: one of the certificate's SANs equals ``identity`` exactly."""

    def __init__(self, identity: str) -> None:
        self._identity = identity
        self._sigstore = Identity(identity=identity)  # sigstore's own SAN check, run as well

    def verify(self, cert: Certificate) -> None:
        """Raise ``VerificationError`` unless the certificate certifies the expected identity."""
        actual = _certificate_identities(cert)
        if self._identity not in actual:
            raise VerificationError(
                f"certificate identity is {', '.join(map(repr, actual)) or 'empty'}; "
                f"policy requires {self._identity!r}"
            )
        self._sigstore.verify(cert)


# --------------------------------------------------------------------------------------------
# Signing
# --------------------------------------------------------------------------------------------


def _http_facts(exc: BaseException) -> tuple[int | None, str | None, str | None]:
    """HTTP status, server message and URL behind a sigstore client error, found along its
    cause chain (sigstore's clients wrap the ``requests`` error without keeping these)."""
    seen: BaseException | None = exc
    while seen is not None:
        request = getattr(seen, "request", None)
        url = getattr(request, "url", None)
        response = getattr(seen, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            try:
                message = str(json.loads(getattr(response, "text", ""))["message"])
            except (ValueError, KeyError, TypeError):
                message = None
            return status, message, url if isinstance(url, str) else None
        if isinstance(url, str):
            return None, None, url
        seen = seen.__cause__ or seen.__context__
    return None, None, None


class KeylessSigner:
    """Signs image evidence with Sigstore keyless signing.

    Args:
        trust_config: a ``ClientTrustConfig`` JSON document: the trusted root plus where the
            CA, transparency log and OIDC issuer answer.
        identity_token: an OIDC ID token (audience ``sigstore``). ``None``: detect the CI's
            ambient credential (GitHub Actions, GitLab, Buildkite, CircleCI, GCP) at each
            signing, so a short-lived token is never reused past its life.
    """

    def __init__(self, trust_config: str | bytes, *, identity_token: str | None = None) -> None:
        try:
            config = ClientTrustConfig.from_json(
                trust_config.decode() if isinstance(trust_config, bytes) else trust_config
            )
            self._context = SigningContext.from_trust_config(config)
        except (SigstoreError, ValueError) as exc:
            raise ConfigurationError(
                f"the Sigstore client trust config is unusable: {exc}",
                hint="supply a ClientTrustConfig JSON with a trusted root, a CA and a Rekor log",
            ) from None
        self._explicit_token = identity_token

    @classmethod
    def from_file(cls, path: Path, *, identity_token: str | None = None) -> KeylessSigner:
        """Build a signer from a ClientTrustConfig JSON file.

        Args:
            path: the file.
            identity_token: as for the constructor.

        Returns:
            The signer.
        """
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read Sigstore trust config {path}: {exc}") from None
        return cls(text, identity_token=identity_token)

    def __repr__(self) -> str:
        # Never show the token: it is a bearer credential for the CA.
        source = "explicit" if self._explicit_token else "ambient"
        return f"KeylessSigner(identity_token=<{source}>)"

    def sign_image_signature(self, payload: bytes) -> SignedBundle:
        """Sign a cosign simple-signing payload as a message-signature bundle.

        Args:
            payload: the payload, e.g. from :func:`simple_signing_payload`; it must name the
                image digest, so a signature can never be made over something unidentified.

        Returns:
            The bundle and what it certifies.
        """
        try:
            _, digest = parse_simple_signing_payload(payload)
        except ValueError as exc:
            raise PolicyRefusal(
                f"refusing to sign: {exc}",
                hint="build the payload with portcullis.signing.simple_signing_payload(image)",
            ) from None
        bundle = self._sign(lambda signer: signer.sign_artifact(payload))
        return self._result(bundle, BundleContent.MESSAGE_SIGNATURE, digest)

    def sign_statement(
        self,
        *,
        digest: str,
        subject_name: str,
        predicate_type: str,
        predicate: Mapping[str, Any],
    ) -> SignedBundle:
        """Sign an in-toto v1 Statement about ``digest`` as a DSSE bundle.

        Args:
            digest: the image digest, ``sha256:<hex>``; the Statement's only subject.
            subject_name: the subject's name, usually the repository (``registry/repo``).
            predicate_type: URI of the predicate, e.g. ``https://slsa.dev/provenance/v1``.
            predicate: the predicate document (JSON-serialisable).

        Returns:
            The bundle and what it certifies.
        """
        try:
            digest = _DIGEST.validate_python(digest)
        except ValidationError:
            raise PolicyRefusal(f"refusing to attest {digest!r}: not a sha256 digest") from None
        hex_digest = digest.removeprefix("sha256:")
        try:
            statement = (
                dsse.StatementBuilder()
                .subjects(
                    [dsse.Subject(name=subject_name, digest=dsse.DigestSet({"sha256": hex_digest}))]
                )
                .predicate_type(predicate_type)
                .predicate(dict(predicate))
                .build()
            )
        except SigstoreError as exc:
            raise PolicyRefusal(f"refusing to sign an invalid in-toto statement: {exc}") from None
        bundle = self._sign(lambda signer: signer.sign_dsse(statement))
        return self._result(bundle, BundleContent.DSSE, digest)

    def _identity_token(self) -> IdentityToken:
        raw = self._explicit_token
        if raw is None:
            try:
                raw = detect_credential()
            except IdentityError as exc:
                raise ConfigurationError(
                    f"the CI's ambient OIDC credential could not be obtained: {exc}",
                    hint="grant the job OIDC token permission (GitHub: `permissions: id-token: write`)",
                ) from None
        if raw is None:
            raise ConfigurationError(
                "no OIDC identity token for keyless signing: none was given and no CI "
                "credential was detected",
                hint="run in CI with OIDC enabled, or pass identity_token",
            )
        try:
            return IdentityToken(raw)
        except IdentityError as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise PolicyRefusal(
                f"the OIDC identity token was refused before use: {exc}{cause}",
                hint="obtain a fresh token with audience 'sigstore'",
            ) from None

    def _sign(self, operation: Callable[[Signer], Bundle]) -> Bundle:
        token = self._identity_token()
        try:
            with self._context.signer(token, cache=True) as signer:
                return operation(signer)
        except (ExpiredIdentity, ExpiredCertificate):
            raise PolicyRefusal(
                "the OIDC identity token or its certificate expired before signing finished",
                hint="obtain a fresh token and sign again",
            ) from None
        except (FulcioClientError, RekorClientError, OSError) as exc:
            raise _service_error(exc) from None
        except VerificationError as exc:
            # Raised when the CA's certificate carries no SCT from a CT log we trust.
            raise PolicyRefusal(
                f"the certificate authority returned a certificate the trust config does not "
                f"accept: {exc}",
                hint="check that the trust config's CT log keys belong to this CA",
            ) from None

    def _result(self, bundle: Bundle, content: BundleContent, digest: str) -> SignedBundle:
        bundle_json = bundle.to_json()
        log_index, _ = _log_entry_facts(json.loads(bundle_json))
        return SignedBundle(
            content=content,
            digest=digest,
            bundle_json=bundle_json,
            signer=_signer_of(bundle.signing_certificate),
            log_index=log_index,
        )


def _service_error(exc: BaseException) -> TransientError | PolicyRefusal:
    status, message, url = _http_facts(exc)
    if isinstance(exc, FulcioClientError) or (url and "/signingCert" in url):
        service = "certificate authority"
    elif isinstance(exc, RekorClientError) or (url and "/log/" in url):
        service = "transparency log"
    else:
        service = "Sigstore service"
    where = f" at {url}" if url else ""
    if status is None or status >= 500 or status == 429:
        return TransientError(
            f"the {service}{where} could not be reached or failed ({message or exc})",
            hint="retry; if it persists check the trust config's service URLs",
        )
    return PolicyRefusal(
        f"the {service} refused the request with HTTP {status}: "
        f"{message or str(exc) or type(exc).__name__}",
        hint="check that the CI identity is one the CA accepts and the token is fresh",
    )


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def _log_entry_facts(document: Mapping[str, Any]) -> tuple[int, datetime | None]:
    entry = document["verificationMaterial"]["tlogEntries"][0]
    integrated = entry.get("integratedTime")
    when = datetime.fromtimestamp(int(integrated), tz=UTC) if integrated is not None else None
    return int(entry["logIndex"]), when


class KeylessVerifier:
    """Verifies Sigstore bundles offline against a trusted root and an exact signer policy.

    Args:
        trusted_root: path of a ``trusted_root.json`` (Sigstore trusted root, media type 0.1).
        signer: the certificate identity and OIDC issuer that must have signed.
    """

    def __init__(self, trusted_root: Path, signer: SignerIdentity) -> None:
        try:
            root = TrustedRoot.from_file(str(trusted_root))
            self._verifier = Verifier(trusted_root=root)
        except (OSError, ValueError, SigstoreError) as exc:
            raise ConfigurationError(
                f"the Sigstore trusted root {trusted_root} is unusable: {exc}",
                hint="point to the trusted_root.json of the Sigstore instance that signs",
            ) from None
        self.signer = signer
        policies: list[VerificationPolicy] = [
            _ExactIdentity(signer.identity),
            _ExactIssuer(signer.issuer),
        ]
        self._policy = AllOf(policies)

    def verify_image_signature(
        self, bundle_json: bytes | str, payload: bytes, *, digest: str
    ) -> VerifiedSignature:
        """Verify an image signature bundle and that its payload names ``digest``.

        Args:
            bundle_json: the Sigstore bundle.
            payload: the simple-signing payload the bundle signs.
            digest: the image digest being promoted.

        Returns:
            The verified signature.

        Raises:
            VerificationFailed: with check ``"signature"``.
        """
        check = "signature"
        digest = self._expected_digest(check, digest)
        verified = self._verify_message(check, digest, bundle_json, payload)
        try:
            reference, named = parse_simple_signing_payload(payload)
        except ValueError as exc:
            raise VerificationFailed(check, digest, str(exc)) from None
        if named != digest:
            raise VerificationFailed(
                check,
                digest,
                f"the signature is valid but for image {named}, not this digest: "
                "a signature cannot be moved from one image to another",
            )
        return verified.model_copy(update={"docker_reference": reference})

    def verify_artifact(self, bundle_json: bytes | str, artifact: bytes) -> VerifiedSignature:
        """Verify a message-signature bundle over arbitrary bytes (e.g. a file).

        Args:
            bundle_json: the Sigstore bundle.
            artifact: the signed bytes.

        Returns:
            The verified signature; ``digest`` is the artifact's sha256.

        Raises:
            VerificationFailed: with check ``"signature"``.
        """
        digest = "sha256:" + hashlib.sha256(artifact).hexdigest()
        return self._verify_message("signature", digest, bundle_json, artifact)

    def verify_statement(
        self,
        bundle_json: bytes | str,
        *,
        digest: str,
        predicate_type: str | None = None,
    ) -> VerifiedStatement:
        """Verify a DSSE attestation bundle whose in-toto subject must include ``digest``.

        Args:
            bundle_json: the Sigstore bundle.
            digest: the image digest the statement must be about.
            predicate_type: if given, the statement's predicate type must equal it.

        Returns:
            The verified statement.

        Raises:
            VerificationFailed: with check ``"attestation"``.
        """
        check = "attestation"
        digest = self._expected_digest(check, digest)
        bundle, document = self._load(check, digest, bundle_json)
        if not isinstance(document.get("dsseEnvelope"), dict):
            raise VerificationFailed(
                check, digest, "the bundle holds no DSSE envelope (is it an image signature?)"
            )
        payload_type, payload = self._run(
            check, digest, lambda: self._verifier.verify_dsse(bundle, self._policy)
        )
        if payload_type != IN_TOTO_PAYLOAD_TYPE:
            raise VerificationFailed(
                check, digest, f"DSSE payload type is {payload_type!r}, not an in-toto statement"
            )
        try:
            statement, subjects = _parse_statement(payload)
        except ValueError as exc:
            raise VerificationFailed(check, digest, f"malformed in-toto statement: {exc}") from None
        if digest not in subjects:
            raise VerificationFailed(
                check,
                digest,
                f"the statement is about {', '.join(subjects) or 'no sha256 subject'}, not this "
                "digest: an attestation cannot be moved from one image to another",
            )
        actual_type = str(statement["predicateType"])  # checked by _parse_statement
        if predicate_type is not None and actual_type != predicate_type:
            raise VerificationFailed(
                check, digest, f"predicate type is {actual_type!r}; expected {predicate_type!r}"
            )
        log_index, integrated = _log_entry_facts(document)
        return VerifiedStatement(
            digest=digest,
            predicate_type=actual_type,
            predicate=statement.get("predicate") or {},
            statement=statement,
            signer=_signer_of(bundle.signing_certificate),
            log_index=log_index,
            integrated_time=integrated,
        )

    def _expected_digest(self, check: str, digest: str) -> str:
        try:
            return _DIGEST.validate_python(digest)
        except ValidationError:
            raise VerificationFailed(
                check, digest, "the expected digest is not sha256:<hex>"
            ) from None

    def _load(
        self, check: str, digest: str, bundle_json: bytes | str
    ) -> tuple[Bundle, dict[str, Any]]:
        try:
            document = json.loads(bundle_json)
            bundle = Bundle.from_json(bundle_json)
        except (SigstoreError, ValueError) as exc:
            raise VerificationFailed(check, digest, f"not a valid Sigstore bundle: {exc}") from None
        return bundle, document

    def _verify_message(
        self, check: str, digest: str, bundle_json: bytes | str, message: bytes
    ) -> VerifiedSignature:
        bundle, document = self._load(check, digest, bundle_json)
        signed = document.get("messageSignature")
        if not isinstance(signed, dict):
            raise VerificationFailed(
                check, digest, "the bundle holds no message signature (is it an attestation?)"
            )
        recorded = (signed.get("messageDigest") or {}).get("digest")
        actual = hashlib.sha256(message).digest()
        if recorded is not None and base64.b64decode(recorded) != actual:
            raise VerificationFailed(
                check,
                digest,
                f"the payload's sha256 is {actual.hex()} but the bundle signs "
                f"{base64.b64decode(recorded).hex()}: the payload changed after signing",
            )
        self._run(
            check, digest, lambda: self._verifier.verify_artifact(message, bundle, self._policy)
        )
        log_index, integrated = _log_entry_facts(document)
        return VerifiedSignature(
            digest=digest,
            payload=message,
            signer=_signer_of(bundle.signing_certificate),
            log_index=log_index,
            integrated_time=integrated,
        )

    def _run(self, check: str, digest: str, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except (SigstoreError, ValueError) as exc:
            raise VerificationFailed(check, digest, _explain(exc)) from None


class _Subject(BaseModel):
    name: str | None = None
    digest: dict[str, str] = Field(min_length=1)


class _Statement(BaseModel):
    """The layout of an in-toto Statement.

    v0.1 is accepted besides v1 because cosign still writes it; both share this layout.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type_: Literal["https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1"] = Field(
        alias="_type"
    )
    subject: list[_Subject] = Field(min_length=1)
    predicate_type: str = Field(alias="predicateType", min_length=1)
    predicate: dict[str, Any] | None = None


def _parse_statement(payload: bytes) -> tuple[dict[str, Any], list[str]]:
    """Check an in-toto Statement's layout; return it and its sha256 subjects as digests.

    Raises:
        ValueError: the payload is not an in-toto Statement.
    """
    parsed = _Statement.model_validate_json(payload)
    statement: dict[str, Any] = json.loads(payload)
    subjects = [
        f"sha256:{s.digest['sha256'].lower()}" for s in parsed.subject if "sha256" in s.digest
    ]
    return statement, subjects


def _explain(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, CertValidationError):
        return (
            "the signing certificate does not chain to a CA in the trusted root "
            f"(signed by another Sigstore instance, or forged): {text}"
        )
    if isinstance(exc, VerificationError):
        return f"the Sigstore bundle does not verify: {text}"
    return f"the bundle could not be checked: {text}"
