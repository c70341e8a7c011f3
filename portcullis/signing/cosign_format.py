"""cosign key-pair signatures and attestations, compatible with ``cosign sign/attest --key``.

What cosign writes, and this module reads and writes the same way:

* ``cosign.key``: PEM ``ENCRYPTED SIGSTORE PRIVATE KEY`` whose body is JSON
  ``{"kdf": {"name": "scrypt", "params": {"N": 32768, "r": 8, "p": 1}, "salt": B64},
  "cipher": {"name": "nacl/secretbox", "nonce": B64}, "ciphertext": B64}``; the plaintext is
  the PKCS#8 DER of an ECDSA P-256 key; the secretbox key is scrypt(password, salt), 32 bytes.
  ``cosign.pub`` is the PKIX public key as PEM ``PUBLIC KEY``.
* an image signature lives in the image's repository under tag ``sha256-<hex>.sig``: an OCI
  image manifest with one layer per signature, each a simple-signing JSON payload that names
  the image digest, its ECDSA-P256/SHA-256 signature (base64 of DER) in the layer annotation
  ``dev.cosignproject.cosign/signature``. Signing again appends a layer.
* an attestation lives under ``sha256-<hex>.att``: one layer per attestation, each a DSSE
  envelope around an in-toto statement, signed over DSSE's pre-authentication encoding, with
  the (unsigned, informational) annotation ``predicateType``.

Verification trusts nothing the registry says that the signature does not cover: the payload
must name the image digest, and an attestation's statement must have the image as its subject.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from portcullis.canonical import canonical_json
from portcullis.errors import PolicyRefusal, VerificationFailed
from portcullis.models import ImageRef
from portcullis.oci import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    NotFoundInRegistry,
    RegistryClient,
    digest_of,
)

log = logging.getLogger(__name__)

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PREDICATE_TYPE_ANNOTATION = "predicateType"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"
INTOTO_STATEMENT_TYPES = ("https://in-toto.io/Statement/v0.1", "https://in-toto.io/Statement/v1")

PRIVATE_KEY_PEM_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
# Keys written by cosign before v2 carry the older label; the body is the same.
_ACCEPTED_PEM_LABELS = (PRIVATE_KEY_PEM_LABEL, "ENCRYPTED COSIGN PRIVATE KEY")
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 32768, 8, 1
# Newer cosign releases write N=65536; reading accepts exactly these, never a value from the
# file alone: a key file asking for a huge N would make opening it a memory bomb.
_ACCEPTED_SCRYPT_N = (32768, 65536)
_SALT_BYTES, _KEY_BYTES = 32, 32

Password = str | bytes


# -- key files -------------------------------------------------------------------------------


def generate_key_pair() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key (the kind ``cosign generate-key-pair`` makes)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable name for a public key: SHA-256 of its DER SubjectPublicKeyInfo, in hex."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _password_bytes(password: Password) -> bytes:
    return password.encode() if isinstance(password, str) else password


def _scrypt(password: Password, salt: bytes, n: int = _SCRYPT_N) -> bytes:
    return hashlib.scrypt(
        _password_bytes(password),
        salt=salt,
        n=n,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        # scrypt needs 128 * N * r bytes; hashlib's default cap is exactly 32 MiB, which the
        # bookkeeping on top of N=32768 already exceeds.
        maxmem=2 * 128 * n * _SCRYPT_R,
        dklen=_KEY_BYTES,
    )


def _pem(label: str, body: bytes) -> bytes:
    b64 = base64.b64encode(body).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n"
    ).encode()


def _unpem(pem: bytes, labels: Sequence[str]) -> bytes:
    text = pem.decode("ascii", errors="replace").strip()
    for label in labels:
        begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
        if text.startswith(begin) and text.endswith(end):
            try:
                return base64.b64decode(
                    "".join(text[len(begin) : -len(end)].split()), validate=True
                )
            except binascii.Error:
                break
    raise PolicyRefusal(
        f"not a cosign private key: expected PEM '{labels[0]}'",
        hint="use a key written by `cosign generate-key-pair` or by write_key_pair()",
    )


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, password: Password) -> bytes:
    """``cosign.key`` content for ``key``, encrypted under ``password``.

    Args:
        key: an ECDSA P-256 private key.
        password: the passphrase (an empty one is allowed, as cosign allows it).

    Returns:
        PEM bytes labelled ``ENCRYPTED SIGSTORE PRIVATE KEY``.
    """
    _require_p256(key.curve)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt = os.urandom(_SALT_BYTES)
    nonce = os.urandom(SecretBox.NONCE_SIZE)
    # PyNaCl's ciphertext is tag || box, the same layout as Go's secretbox.Seal.
    sealed = SecretBox(_scrypt(password, salt)).encrypt(der, nonce).ciphertext
    document = {
        "kdf": {
            "name": "scrypt",
            "params": {"N": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P},
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(sealed).decode(),
    }
    return _pem(PRIVATE_KEY_PEM_LABEL, json.dumps(document, separators=(",", ":")).encode())


def decrypt_private_key(pem: bytes, password: Password) -> ec.EllipticCurvePrivateKey:
    """Open ``cosign.key`` content with ``password``.

    Raises:
        PolicyRefusal: not a cosign key, unexpected KDF parameters, or the wrong password.
    """
    body = _unpem(pem, _ACCEPTED_PEM_LABELS)
    try:
        document = json.loads(body)
        kdf, cipher = document["kdf"], document["cipher"]
        params = kdf["params"]
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        sealed = base64.b64decode(document["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise PolicyRefusal("the cosign private key file is malformed") from None
    if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
        raise PolicyRefusal(
            f"unsupported cosign key encryption {kdf.get('name')!r}/{cipher.get('name')!r}"
        )
    n = params.get("N") if isinstance(params, dict) else None
    if n not in _ACCEPTED_SCRYPT_N or (params.get("r"), params.get("p")) != (_SCRYPT_R, _SCRYPT_P):
        raise PolicyRefusal(f"unexpected scrypt parameters in the cosign key: {params}")
    if len(nonce) != SecretBox.NONCE_SIZE:
        raise PolicyRefusal("the cosign private key has a malformed nonce")
    try:
        der = SecretBox(_scrypt(password, salt, int(n))).decrypt(sealed, nonce)
    except CryptoError:
        raise PolicyRefusal(
            "cannot open the cosign private key: wrong password (or the file was altered)",
            hint="check the signing-key password in the credentials block",
        ) from None
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PolicyRefusal("the cosign private key is not an ECDSA key")
    _require_p256(key.curve)
    return key


def public_key_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """``cosign.pub`` content: the PKIX public key as PEM ``PUBLIC KEY``."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Parse ``cosign.pub`` content; :class:`PolicyRefusal` unless it is a P-256 key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise PolicyRefusal("not a PEM public key", hint="pass the content of cosign.pub") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PolicyRefusal("the public key is not an ECDSA key; cosign key pairs are P-256")
    _require_p256(key.curve)
    return key


def _require_p256(curve: ec.EllipticCurve) -> None:
    if not isinstance(curve, ec.SECP256R1):
        raise PolicyRefusal(f"cosign key pairs are ECDSA P-256, not {curve.name}")


@dataclass(frozen=True)
class KeyPairFiles:
    """Where :func:`write_key_pair` put the two files."""

    private_key: Path
    public_key: Path


def write_key_pair(
    directory: Path,
    key: ec.EllipticCurvePrivateKey,
    password: Password,
    *,
    overwrite: bool = False,
) -> KeyPairFiles:
    """Write ``cosign.key`` (mode 600) and ``cosign.pub`` into ``directory``.

    Raises:
        PolicyRefusal: a key file already exists and ``overwrite`` is False.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = KeyPairFiles(directory / "cosign.key", directory / "cosign.pub")
    if not overwrite and (files.private_key.exists() or files.public_key.exists()):
        raise PolicyRefusal(
            f"refusing to overwrite the key pair in {directory}",
            hint="pass overwrite=True to replace it; signatures made with the old key stay "
            "verifiable only with the old cosign.pub",
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with os.fdopen(os.open(files.private_key, flags, 0o600), "wb") as fh:
        fh.write(encrypt_private_key(key, password))
    files.public_key.write_bytes(public_key_pem(key))
    return files


def load_private_key(path: Path, password: Password) -> ec.EllipticCurvePrivateKey:
    """Read and open a ``cosign.key`` file."""
    return decrypt_private_key(path.read_bytes(), password)


def load_public_key_file(path: Path) -> ec.EllipticCurvePublicKey:
    """Read a ``cosign.pub`` file."""
    return load_public_key(path.read_bytes())


# -- payloads ---------------------------------------------------------------------------------


def signature_tag(digest: str) -> str:
    """Tag of the signature manifest for ``digest``: ``sha256-<hex>.sig``."""
    return digest.replace(":", "-") + ".sig"


def attestation_tag(digest: str) -> str:
    """Tag of the attestation manifest for ``digest``: ``sha256-<hex>.att``."""
    return digest.replace(":", "-") + ".att"


def cosign_payload(image: ImageRef, annotations: Mapping[str, str] | None = None) -> bytes:
    """The simple-signing payload cosign signs for ``image``.

    ``docker-reference`` is the repository without tag or digest, as cosign writes it;
    ``annotations`` become the ``optional`` claims (``cosign sign -a k=v``).
    """
    document = {
        "critical": {
            "identity": {"docker-reference": image.name},
            "image": {"docker-manifest-digest": image.digest},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": dict(annotations) if annotations else None,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def dsse_pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature is computed over."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def _verifying_key(
    keys: Sequence[ec.EllipticCurvePublicKey], signature_b64: str, data: bytes
) -> ec.EllipticCurvePublicKey | None:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except binascii.Error:
        return None
    for key in keys:
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return key
    return None


# -- pushing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedSignature:
    """Where a signature or attestation was stored."""

    image: ImageRef
    tag: str  # sha256-<hex>.sig or .att, in the image's repository
    manifest_digest: str  # digest of the signature/attestation manifest after the append
    layer_digest: str  # digest of the payload or envelope blob
    appended: bool  # False when an equivalent signature was already there


def _check_client(client: RegistryClient, image: ImageRef) -> None:
    if client.registry != image.registry:
        raise PolicyRefusal(
            f"the registry client talks to {client.registry}, but the image is in {image.registry}"
        )


def _append_layer(
    client: RegistryClient,
    image: ImageRef,
    tag: str,
    blob: bytes,
    layer: Descriptor,
    already_there: Callable[[Descriptor], bool],
    repository: str | None = None,
) -> PushedSignature:
    """Add ``layer`` to the manifest under ``tag`` (creating it), keeping what is there.

    ``repository`` is where the tag lives (cosign's ``COSIGN_REPOSITORY``); default the image's.
    """
    repo = repository or image.repository
    result: list[PushedSignature] = []

    def current_layers() -> list[Descriptor]:
        try:
            return list(client.get_manifest(repo, tag).layers())
        except NotFoundInRegistry:
            return []

    def write() -> None:
        existing = current_layers()
        if any(already_there(e) for e in existing):
            head = client.head_manifest(repo, tag)
            result[:] = [PushedSignature(image, tag, head.digest if head else "", layer.digest,
                                         bool(result and result[0].appended))]
            return
        client.upload_blob(repo, blob)
        layers = [*existing, layer]
        # The same config go-containerregistry writes for cosign's signature images: nothing
        # reads it, but registries want a config blob that lists the layers.
        config = canonical_json(
            {
                "architecture": "",
                "config": {},
                "created": "0001-01-01T00:00:00Z",
                "history": [{"created": "0001-01-01T00:00:00Z"} for _ in layers],
                "os": "",
                "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]},
            }
        )
        config_desc = client.push_blob_descriptor(repo, config, MEDIA_OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [x.to_json() for x in layers],
        }
        digest = client.put_manifest(repo, tag, canonical_json(manifest), MEDIA_OCI_MANIFEST)
        result[:] = [PushedSignature(image, tag, digest, layer.digest, True)]

    # Parallel attestations of one digest append to the same tag: converge_tag serialises
    # writers in this process and re-writes when another process replaced our layer.
    client.converge_tag(repo, tag, write,
                        lambda: any(already_there(e) for e in current_layers()))
    return result[0]


def _require_image(client: RegistryClient, image: ImageRef, check: str) -> None:
    """The digest must exist in the registry (fetching it also checks its bytes)."""
    try:
        client.get_manifest(image.repository, image.digest)
    except NotFoundInRegistry:
        raise VerificationFailed(check, image.digest, f"{image} is not in the registry") from None


def sign_image(
    client: RegistryClient,
    image: ImageRef,
    key: ec.EllipticCurvePrivateKey,
    *,
    annotations: Mapping[str, str] | None = None,
) -> PushedSignature:
    """Sign ``image`` the way ``cosign sign --key`` does and push the signature next to it.

    Args:
        client: a client for ``image.registry`` with push rights to its repository.
        image: the digest to sign; it must exist in the registry.
        key: the ECDSA P-256 signing key.
        annotations: optional claims written into the signed payload.

    Returns:
        Where the signature went. Signing the same digest again with the same key and claims
        adds nothing; other signatures already there are kept.
    """
    _check_client(client, image)
    _require_image(client, image, "signature")
    payload = cosign_payload(image, annotations)
    payload_digest = digest_of(payload)
    layer = Descriptor(
        SIMPLESIGNING_MEDIA_TYPE,
        payload_digest,
        len(payload),
        {SIGNATURE_ANNOTATION: _sign(key, payload)},
    )
    public = key.public_key()

    def same_signer_same_payload(existing: Descriptor) -> bool:
        # ECDSA signatures are randomised, so "the same signature" means: same payload and
        # an existing signature that this key made.
        return existing.digest == payload_digest and (
            _verifying_key([public], existing.annotations.get(SIGNATURE_ANNOTATION, ""), payload)
            is not None
        )

    pushed = _append_layer(
        client, image, signature_tag(image.digest), payload, layer, same_signer_same_payload
    )
    log.info("signed %s with key %s (%s)", image, key_id(public)[:16], pushed.tag)
    return pushed


def _statement_subject_digests(statement: Mapping[str, Any]) -> list[str]:
    subjects = statement.get("subject")
    found: list[str] = []
    if isinstance(subjects, list):
        for subject in subjects:
            digests = subject.get("digest") if isinstance(subject, dict) else None
            if isinstance(digests, dict) and isinstance(digests.get("sha256"), str):
                found.append("sha256:" + digests["sha256"])
    return found


def attest(
    client: RegistryClient,
    image: ImageRef,
    statement: Mapping[str, Any],
    key: ec.EllipticCurvePrivateKey,
    *,
    repository: str | None = None,
) -> PushedSignature:
    """Sign an in-toto statement about ``image`` as a DSSE envelope and push it as cosign does.

    Args:
        client: a client for ``image.registry`` with push rights to its repository.
        image: the digest the statement is about; it must exist in the registry.
        statement: an in-toto statement (``_type``, ``subject``, ``predicateType``,
            ``predicate``) whose subject includes ``image.digest``.
        key: the ECDSA P-256 signing key.
        repository: store the ``.att`` tag in this repository of the same registry instead
            of the image's (what ``COSIGN_REPOSITORY`` does); push rights are needed there only.

    Raises:
        PolicyRefusal: the statement is malformed or is not about ``image``.
    """
    _check_client(client, image)
    predicate_type = statement.get("predicateType")
    if statement.get("_type") not in INTOTO_STATEMENT_TYPES or not isinstance(predicate_type, str):
        raise PolicyRefusal(
            "refusing to attest: not an in-toto statement with a predicateType",
            hint=f"_type must be one of {', '.join(INTOTO_STATEMENT_TYPES)}",
        )
    subjects = _statement_subject_digests(statement)
    if image.digest not in subjects:
        raise PolicyRefusal(
            f"refusing to attach a statement about {subjects or 'nothing'} to {image}",
            hint="make the statement's subject the image digest",
        )
    _require_image(client, image, "attestation")
    payload = json.dumps(statement, separators=(",", ":")).encode()
    envelope = {
        "payloadType": INTOTO_PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        # cosign leaves keyid empty for key-pair signatures; verifiers try their trusted keys.
        "signatures": [{"keyid": "", "sig": _sign(key, dsse_pae(INTOTO_PAYLOAD_TYPE, payload))}],
    }
    blob = json.dumps(envelope, separators=(",", ":")).encode()
    layer = Descriptor(
        DSSE_MEDIA_TYPE,
        digest_of(blob),
        len(blob),
        # cosign writes an empty signature annotation on attestation layers: the signature is
        # inside the envelope.
        {SIGNATURE_ANNOTATION: "", PREDICATE_TYPE_ANNOTATION: predicate_type},
    )
    pushed = _append_layer(
        client,
        image,
        attestation_tag(image.digest),
        blob,
        layer,
        lambda e: e.digest == layer.digest,
        repository,
    )
    log.info("attested %s (%s) with key %s", image, predicate_type, key_id(key.public_key())[:16])
    return pushed


# -- verifying ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedKeySignature:
    """A cosign signature on an image that checked out against a trusted key."""

    image: ImageRef
    key_id: str  # see key_id(): which trusted key made it
    payload: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class VerifiedAttestation:
    """An in-toto statement about an image, signed by a trusted key."""

    image: ImageRef
    key_id: str
    predicate_type: str
    statement: Mapping[str, Any] = field(repr=False)
    envelope_digest: str = ""  # digest of the DSSE envelope blob (the attestation layer)


def _no_keys(check: str, image: ImageRef) -> VerificationFailed:
    # An empty trust set must fail: a policy with nothing in it never passes.
    return VerificationFailed(check, image.digest, "no trusted public keys were given")


def verify_image_signature(
    client: RegistryClient,
    image: ImageRef,
    trusted_public_keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    allowed_references: Collection[str] | None = None,
) -> VerifiedKeySignature:
    """Check that a trusted key signed exactly this digest (``cosign verify --key``).

    A signature counts only if it verifies with one of ``trusted_public_keys`` AND its payload
    is a cosign signature whose ``docker-manifest-digest`` is ``image.digest`` AND whose
    ``docker-reference`` is an allowed repository.

    Args:
        client: a client for ``image.registry``.
        image: the pinned image.
        trusted_public_keys: the keys whose signatures count.
        allowed_references: repositories (``registry/repo``) the signature may name; default
            only ``image.name``. Pass the build repository when verifying a copied image.

    Returns:
        The first signature that passes.

    Raises:
        VerificationFailed: check ``signature``, with every reason a candidate was refused.
    """
    _check_client(client, image)
    if not trusted_public_keys:
        raise _no_keys("signature", image)
    allowed = set(allowed_references) if allowed_references is not None else {image.name}
    _require_image(client, image, "signature")
    tag = signature_tag(image.digest)
    try:
        manifest = client.get_manifest(image.repository, tag)
    except NotFoundInRegistry:
        raise VerificationFailed(
            "signature", image.digest, f"no cosign signature: tag {tag} does not exist"
        ) from None
    reasons: list[str] = []
    for layer in manifest.layers():
        short = layer.digest[:19]
        if layer.media_type != SIMPLESIGNING_MEDIA_TYPE:
            reasons.append(f"layer {short} is {layer.media_type}, not a simple-signing payload")
            continue
        payload = client.get_blob(image.repository, layer.digest)
        signer = _verifying_key(
            trusted_public_keys, layer.annotations.get(SIGNATURE_ANNOTATION, ""), payload
        )
        if signer is None:
            reasons.append(f"signature on payload {short} is not from a trusted key")
            continue
        problem, document = _check_payload(payload, image, allowed)
        if problem:
            reasons.append(f"payload {short} signed by a trusted key {problem}")
            continue
        return VerifiedKeySignature(image, key_id(signer), document)
    raise VerificationFailed(
        "signature", image.digest, "; ".join(reasons) or f"tag {tag} holds no signatures"
    )


def _check_payload(
    payload: bytes, image: ImageRef, allowed: Collection[str]
) -> tuple[str | None, dict[str, Any]]:
    try:
        document = json.loads(payload)
        critical = document["critical"]
        kind = critical["type"]
        digest = critical["image"]["docker-manifest-digest"]
        reference = critical["identity"]["docker-reference"]
    except (ValueError, KeyError, TypeError):
        return "is not a cosign simple-signing payload", {}
    if kind != COSIGN_SIGNATURE_TYPE:
        return f"has type {kind!r}, not {COSIGN_SIGNATURE_TYPE!r}", document
    if digest != image.digest:
        return f"covers {digest}, not this image", document
    if reference not in allowed:
        return f"names repository {reference!r}, not one of {sorted(allowed)}", document
    return None, document


def verify_attestations(
    client: RegistryClient,
    image: ImageRef,
    trusted_public_keys: Sequence[ec.EllipticCurvePublicKey],
    predicate_type: str,
    *,
    repository: str | None = None,
) -> list[VerifiedAttestation]:
    """The statements of ``predicate_type`` about ``image`` that trusted keys signed.

    An attestation counts only if its DSSE signature verifies with a trusted key over the
    envelope's payload AND the signed statement has ``predicate_type`` AND names
    ``image.digest`` as a subject. The registry's ``predicateType`` annotation is unsigned and
    ignored. Attestations that fail are skipped (with their reason kept for the error).
    ``repository`` reads the ``.att`` tag from another repository (``COSIGN_REPOSITORY``).

    Raises:
        VerificationFailed: check ``attestation``, when not one attestation passes.
    """
    _check_client(client, image)
    if not trusted_public_keys:
        raise _no_keys("attestation", image)
    _require_image(client, image, "attestation")
    tag = attestation_tag(image.digest)
    where = repository or image.repository
    try:
        manifest = client.get_manifest(where, tag)
    except NotFoundInRegistry:
        raise VerificationFailed(
            "attestation", image.digest, f"no attestations: tag {tag} does not exist"
        ) from None
    verified: list[VerifiedAttestation] = []
    reasons: list[str] = []
    for layer in manifest.layers():
        short = layer.digest[:19]
        if layer.media_type != DSSE_MEDIA_TYPE:
            reasons.append(f"layer {short} is {layer.media_type}, not a DSSE envelope")
            continue
        problem, result = _check_envelope(
            client.get_blob(where, layer.digest), image, trusted_public_keys
        )
        if result is None:
            reasons.append(f"attestation {short} {problem}")
            continue
        if result.predicate_type != predicate_type:
            reasons.append(f"attestation {short} is a {result.predicate_type}")
            continue
        verified.append(replace(result, envelope_digest=layer.digest))
    if not verified:
        raise VerificationFailed(
            "attestation",
            image.digest,
            f"no {predicate_type} attestation signed by a trusted key is about this image"
            + (": " + "; ".join(reasons) if reasons else ""),
        )
    return verified


def _check_envelope(
    blob: bytes, image: ImageRef, keys: Sequence[ec.EllipticCurvePublicKey]
) -> tuple[str, VerifiedAttestation | None]:
    try:
        envelope = json.loads(blob)
        payload_type = envelope["payloadType"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [s["sig"] for s in envelope["signatures"]]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return "is not a DSSE envelope", None
    if payload_type != INTOTO_PAYLOAD_TYPE:
        return f"has payload type {payload_type!r}, not an in-toto statement", None
    pae = dsse_pae(payload_type, payload)
    signer = next(
        (k for s in signatures if isinstance(s, str) and (k := _verifying_key(keys, s, pae))),
        None,
    )
    if signer is None:
        return "has no signature from a trusted key over its payload", None
    try:
        statement = json.loads(payload)
    except ValueError:
        return "is signed but its payload is not JSON", None
    if not isinstance(statement, dict):
        return "is signed but its payload is not a JSON object", None
    predicate_type = statement.get("predicateType")
    if statement.get("_type") not in INTOTO_STATEMENT_TYPES or not isinstance(predicate_type, str):
        return "is signed but is not an in-toto statement", None
    subjects = _statement_subject_digests(statement)
    if image.digest not in subjects:
        log.warning(
            "attestation under %s is signed by a trusted key but is about %s: "
            "it was copied from another image",
            attestation_tag(image.digest),
            subjects,
        )
        return f"is about {', '.join(subjects) or 'no digest'}, not this image", None
    return "", VerifiedAttestation(image, key_id(signer), predicate_type, statement)
