"""A Sigstore-protocol instance on loopback, with real keys, for keyless signing tests.

Three small HTTP services, each on 127.0.0.1 with a port the OS picks:

* :class:`OidcIssuer` -- an OpenID Connect provider: discovery document, JWKS, ES256-signed ID
  tokens for any subject/e-mail a test asks for, and GitHub Actions' ambient token endpoint
  (so ``sigstore.oidc.detect_credential`` finds a credential exactly as it would in CI).
* :class:`FulcioCA` -- a Fulcio-style CA (root + intermediate) speaking ``/api/v2/signingCert``:
  it verifies the ID token against the issuer's JWKS, checks the CSR's proof of possession and
  issues a short-lived code-signing certificate for the token's identity, with an SCT from a CT
  log key it holds embedded the way RFC 6962 precertificates carry it.
* :class:`RekorLog` -- a Rekor v1-style transparency log speaking ``/api/v1/log/entries``: it
  checks each entry's signature, canonicalises it, appends it to an RFC 6962 Merkle tree and
  answers with an inclusion proof, a signed checkpoint and a signed entry timestamp.

:class:`SigstoreInstance` starts all three and writes the matching ``trusted_root.json`` and
client trust config, so sigstore-python signs and verifies against it unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import jwt
import rfc8785
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

AUDIENCE = "sigstore"
"""The audience sigstore-python asks for and Fulcio requires in ID tokens."""

# Fulcio's certificate extensions (https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md).
OID_ISSUER_V1 = ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
OID_ISSUER_V2 = ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
OID_EMBEDDED_SCT = ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")

_TRUSTED_ROOT_MEDIA_TYPE = "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
_SIGNING_CONFIG_MEDIA_TYPE = "application/vnd.dev.sigstore.signingconfig.v0.2+json"
_CLIENT_TRUST_CONFIG_MEDIA_TYPE = "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json"
_OPERATOR = "portcullis-tests"


# --------------------------------------------------------------------------------------------
# Small encodings shared by the services
# --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 6962 key id: SHA-256 of the DER SubjectPublicKeyInfo (what Sigstore uses too)."""
    return hashlib.sha256(_spki_der(key)).digest()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_octet_string(data: bytes) -> bytes:
    return b"\x04" + _der_length(len(data)) + data


def _der_utf8_string(text: str) -> bytes:
    data = text.encode()
    return b"\x0c" + _der_length(len(data)) + data


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    # Whole seconds: X.509 validity, SCT and Rekor timestamps all compare at this precision.
    return datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj: object) -> _Response:
        return cls(status, json.dumps(obj).encode())


class _HttpError(Exception):
    """Ends a request with an error status and a Rekor/Fulcio-style ``{code, message}`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_App = Callable[[_Request], _Response]


class _LoopbackServer:
    """One threaded HTTP server on 127.0.0.1 and a free port, serving ``app``."""

    def __init__(self, app: _App) -> None:
        handler = _handler_for(app)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()


def _handler_for(app: _App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = _Request(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            try:
                response = app(request)
            except _HttpError as exc:
                response = _Response.json(exc.status, {"code": exc.status, "message": exc.message})
            except Exception as exc:  # noqa: BLE001 - a bug in the test service must answer, not hang the client
                response = _Response.json(500, {"code": 500, "message": repr(exc)})
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet; failures surface through the clients' errors."""

    return Handler


# A urllib opener that never goes through a proxy: every service here is on loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_json(url: str) -> Any:
    with _DIRECT.open(url, timeout=5) as resp:
        return json.load(resp)


# --------------------------------------------------------------------------------------------
# OIDC issuer
# --------------------------------------------------------------------------------------------


class OidcIssuer:
    """An OpenID Connect provider that issues ES256-signed ID tokens on request.

    Args:
        ambient_subject: the ``sub`` of tokens served on GitHub Actions' ambient endpoint.
        ambient_email: the ``email`` claim of those tokens (``None``: no e-mail claim).
    """

    def __init__(
        self,
        *,
        ambient_subject: str = "https://ci.portcullis.test/workflows/release.yml@refs/heads/main",
        ambient_email: str | None = None,
    ) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = _key_id(self._key.public_key()).hex()[:16]
        self._server = _LoopbackServer(self._handle)
        self.ambient_subject = ambient_subject
        self.ambient_email = ambient_email
        # What GitHub puts in ACTIONS_ID_TOKEN_REQUEST_TOKEN: proves the caller may ask.
        self.ambient_request_token = secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        """The issuer URL: the ``iss`` claim, and what certificates record as OIDC issuer."""
        return self._server.url

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        self._server.stop()

    def mint(
        self,
        subject: str,
        *,
        email: str | None = None,
        email_verified: bool = True,
        audience: str = AUDIENCE,
        lifetime: timedelta = timedelta(minutes=5),
        issued_at: datetime | None = None,
    ) -> str:
        """Issue a signed ID token (a JWT) for ``subject``.

        Args:
            subject: the ``sub`` claim.
            email: an ``email`` claim; Fulcio then certifies the e-mail address.
            email_verified: the ``email_verified`` claim that goes with ``email``.
            audience: the ``aud`` claim (sigstore requires ``"sigstore"``).
            lifetime: how long the token is valid.
            issued_at: ``iat``; defaults to now (set it in the past to mint an expired token).

        Returns:
            The compact JWS.
        """
        iat = issued_at or _now()
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": subject,
            "aud": audience,
            "iat": int(iat.timestamp()),
            "nbf": int(iat.timestamp()),
            "exp": int((iat + lifetime).timestamp()),
        }
        if email is not None:
            claims["email"] = email
            claims["email_verified"] = email_verified
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._kid})

    def github_actions_env(self) -> dict[str, str]:
        """Environment variables that make this issuer GitHub Actions' ambient credential."""
        return {
            "GITHUB_ACTIONS": "true",
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"{self.url}/_actions/id-token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.ambient_request_token,
        }

    def _jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self._kid, "use": "sig", "alg": "ES256"})
        return jwk

    def _handle(self, req: _Request) -> _Response:
        if req.method == "GET" and req.path == "/.well-known/openid-configuration":
            return _Response.json(
                200,
                {
                    "issuer": self.url,
                    "jwks_uri": f"{self.url}/jwks",
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256"],
                },
            )
        if req.method == "GET" and req.path == "/jwks":
            return _Response.json(200, {"keys": [self._jwk()]})
        if req.method == "GET" and req.path == "/_actions/id-token":
            expected = f"bearer {self.ambient_request_token}"
            if req.headers.get("authorization", "").lower() != expected.lower():
                raise _HttpError(401, "bad or missing ACTIONS_ID_TOKEN_REQUEST_TOKEN")
            audience = req.query.get("audience", [AUDIENCE])[0]
            token = self.mint(self.ambient_subject, email=self.ambient_email, audience=audience)
            return _Response.json(200, {"count": 1, "value": token})
        raise _HttpError(404, f"no route for {req.method} {req.path}")


# --------------------------------------------------------------------------------------------
# CT log key (signs SCTs that the CA embeds)
# --------------------------------------------------------------------------------------------


class CtLogKey:
    """The signing key of a certificate transparency log, used to produce RFC 6962 SCTs."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.created = _now()
        self.log_id = _key_id(self.key.public_key())

    def sct_for_precertificate(self, issuer_key_hash: bytes, tbs: bytes) -> bytes:
        """Sign a precertificate SCT and return its TLS encoding (RFC 6962 section 3.2).

        Args:
            issuer_key_hash: SHA-256 of the issuing CA's SubjectPublicKeyInfo.
            tbs: the TBSCertificate of the final certificate without the SCT extension.

        Returns:
            One serialized ``SignedCertificateTimestamp``.
        """
        # Whole seconds in milliseconds: sigstore-python rebuilds the signed timestamp through
        # a float (seconds * 1000), which can lose the last millisecond otherwise.
        timestamp_ms = int(time.time()) * 1000
        extensions = b""
        signed = (
            struct.pack("!BBQH", 0, 0, timestamp_ms, 1)  # v1, certificate_timestamp, precert
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + struct.pack("!H", len(extensions))
            + extensions
        )
        signature = self.key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return (
            struct.pack("!B32sQH", 0, self.log_id, timestamp_ms, len(extensions))
            + extensions
            + struct.pack("!BBH", 4, 3, len(signature))  # sha256, ecdsa
            + signature
        )


# --------------------------------------------------------------------------------------------
# Fulcio-style CA
# --------------------------------------------------------------------------------------------


@dataclass
class _CaKey:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


class FulcioCA:
    """A Fulcio-style certificate authority that turns an ID token into a signing certificate.

    Identity rule (as Fulcio's e-mail and URI issuer types): a token with an ``email`` claim
    (``email_verified`` true) is certified as that e-mail address (SAN rfc822Name); otherwise its
    ``sub`` must be a URI and is certified as a SAN URI. The OIDC issuer goes into Fulcio's
    issuer extensions (``1.3.6.1.4.1.57264.1.1`` and ``.1.8``).

    Args:
        ct_log: the CT log whose SCT each certificate carries.
        cert_lifetime: validity of issued certificates (Fulcio: 10 minutes).
    """

    def __init__(self, ct_log: CtLogKey, *, cert_lifetime: timedelta = timedelta(minutes=10)):
        self._ct_log = ct_log
        self._lifetime = cert_lifetime
        self._trusted_issuers: set[str] = set()
        self.created = _now() - timedelta(minutes=1)
        self.root = self._make_root()
        self.intermediate = self._make_intermediate()
        self._server = _LoopbackServer(self._handle)

    @property
    def url(self) -> str:
        """Base URL of the CA (the client appends ``/api/v2/signingCert``)."""
        return self._server.url

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        self._server.stop()

    def trust_issuer(self, issuer_url: str) -> None:
        """Accept ID tokens from ``issuer_url`` (verified against its published JWKS)."""
        self._trusted_issuers.add(issuer_url)

    @property
    def chain(self) -> list[x509.Certificate]:
        """The CA chain from intermediate to root, as a trusted root lists it."""
        return [self.intermediate.cert, self.root.cert]

    def _make_root(self) -> _CaKey:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "portcullis.test"),
                x509.NameAttribute(NameOID.COMMON_NAME, "portcullis-test-root"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.created)
            .not_valid_after(self.created + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA384())
        )
        return _CaKey(key, cert)

    def _make_intermediate(self) -> _CaKey:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "portcullis.test"),
                x509.NameAttribute(NameOID.COMMON_NAME, "portcullis-test-intermediate"),
            ]
        )
        root_pub = self.root.key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.root.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.created)
            .not_valid_after(self.created + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_pub), False)
            .sign(self.root.key, hashes.SHA384())
        )
        return _CaKey(key, cert)

    def _handle(self, req: _Request) -> _Response:
        if req.method == "POST" and req.path == "/api/v2/signingCert":
            return self._signing_cert(req)
        if req.method == "GET" and req.path == "/api/v2/trustBundle":
            pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain]
            return _Response.json(200, {"chains": [{"certificates": pems}]})
        raise _HttpError(404, f"no route for {req.method} {req.path}")

    def _signing_cert(self, req: _Request) -> _Response:
        auth = req.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise _HttpError(401, "missing bearer ID token")
        claims = self._verify_token(auth[len("bearer ") :].strip())
        try:
            body = json.loads(req.body)
            csr_pem = base64.b64decode(body["certificateSigningRequest"])
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, KeyError, TypeError) as exc:
            raise _HttpError(400, f"malformed certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise _HttpError(400, "CSR signature does not verify: no proof of key possession")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise _HttpError(400, "only ECDSA keys are certified here")
        leaf = self._issue(public_key, claims)
        pems = [c.public_bytes(serialization.Encoding.PEM).decode() for c in [leaf, *self.chain]]
        return _Response.json(
            201, {"signedCertificateEmbeddedSct": {"chain": {"certificates": pems}}}
        )

    def _verify_token(self, raw: str) -> dict[str, Any]:
        try:
            issuer = jwt.decode(raw, options={"verify_signature": False}).get("iss")
            if issuer not in self._trusted_issuers:
                raise _HttpError(401, f"OIDC issuer {issuer!r} is not trusted by this CA")
            discovery = _get_json(f"{issuer}/.well-known/openid-configuration")
            jwks = jwt.PyJWKSet.from_dict(_get_json(discovery["jwks_uri"]))
            kid = jwt.get_unverified_header(raw).get("kid")
            key = next((k for k in jwks.keys if k.key_id == kid), None)
            if key is None:
                raise _HttpError(401, f"ID token key id {kid!r} is not in the issuer's JWKS")
            claims: dict[str, Any] = jwt.decode(
                raw,
                key=key,
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=issuer,
                options={"require": ["iss", "sub", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise _HttpError(401, f"ID token rejected: {exc}") from None
        return claims

    def _identity_san(self, claims: Mapping[str, Any]) -> x509.GeneralName:
        email = claims.get("email")
        if email is not None:
            if claims.get("email_verified") is not True:
                raise _HttpError(401, "the token's e-mail address is not verified")
            return x509.RFC822Name(str(email))
        subject = str(claims["sub"])
        if "://" not in subject:
            raise _HttpError(400, f"subject {subject!r} is neither an e-mail nor a URI")
        return x509.UniformResourceIdentifier(subject)

    def _issue(
        self, public_key: ec.EllipticCurvePublicKey, claims: Mapping[str, Any]
    ) -> x509.Certificate:
        issuer_url = str(claims["iss"])
        now = _now()
        ca = self.intermediate
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + self._lifetime)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
            )
            # The subject is empty, so the SAN carries the identity and must be critical.
            .add_extension(x509.SubjectAlternativeName([self._identity_san(claims)]), True)
            .add_extension(x509.UnrecognizedExtension(OID_ISSUER_V1, issuer_url.encode()), False)
            .add_extension(
                x509.UnrecognizedExtension(OID_ISSUER_V2, _der_utf8_string(issuer_url)), False
            )
        )
        # The SCT signs the certificate as it is without the SCT extension (the RFC 6962
        # precertificate); the extension goes last so removing it restores exactly that TBS.
        precert = builder.sign(ca.key, hashes.SHA384())
        issuer_key_hash = _key_id(ca.key.public_key())
        sct = self._ct_log.sct_for_precertificate(issuer_key_hash, precert.tbs_certificate_bytes)
        sct_list = struct.pack("!HH", len(sct) + 2, len(sct)) + sct
        return builder.add_extension(
            x509.UnrecognizedExtension(OID_EMBEDDED_SCT, _der_octet_string(sct_list)), False
        ).sign(ca.key, hashes.SHA384())


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------------------------
# Rekor-style transparency log
# --------------------------------------------------------------------------------------------


def _leaf_hash(body: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + body).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (RFC 6962 section 2.1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _tree_hash(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node_hash(_tree_hash(leaves[:k]), _tree_hash(leaves[k:]))


def _inclusion_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(m, D[n]): sibling hashes from the leaf up to the root."""
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*_inclusion_path(index, leaves[:k]), _tree_hash(leaves[k:])]
    return [*_inclusion_path(index - k, leaves[k:]), _tree_hash(leaves[:k])]


@dataclass
class _LogState:
    leaves: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


class RekorLog:
    """A Rekor v1-style transparency log (``hashedrekord`` and ``dsse`` 0.0.1 entries).

    Every accepted entry has its signature checked against the certificate it names, as Rekor
    does, so a test cannot log an entry that does not verify.
    """

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.created = _now() - timedelta(minutes=1)
        self.log_id = _key_id(self.key.public_key())
        self.tree_id = secrets.randbelow(2**62)
        self._state = _LogState()
        self._lock = threading.Lock()
        self._server = _LoopbackServer(self._handle)

    @property
    def url(self) -> str:
        """Base URL (the client appends ``/api/v1/log/entries``)."""
        return self._server.url

    @property
    def origin(self) -> str:
        """The checkpoint origin line, in Rekor's ``<host> - <tree id>`` form."""
        return f"{urlsplit(self.url).netloc} - {self.tree_id}"

    @property
    def size(self) -> int:
        """How many entries the log holds."""
        with self._lock:
            return len(self._state.leaves)

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving and close the port."""
        self._server.stop()

    def _handle(self, req: _Request) -> _Response:
        if req.method == "POST" and req.path == "/api/v1/log/entries":
            return self._create_entry(req.body)
        if req.method == "GET" and req.path == "/api/v1/log":
            with self._lock:
                leaves = list(self._state.leaves)
            root = _tree_hash(leaves)
            return _Response.json(
                200,
                {
                    "rootHash": root.hex(),
                    "treeSize": len(leaves),
                    "signedTreeHead": self._checkpoint(len(leaves), root),
                    "treeID": str(self.tree_id),
                },
            )
        raise _HttpError(404, f"no route for {req.method} {req.path}")

    def _checkpoint(self, size: int, root: bytes) -> str:
        note = f"{self.origin}\n{size}\n{_b64(root)}\n"
        signature = self.key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        name = urlsplit(self.url).netloc
        return f"{note}\n\u2014 {name} {_b64(self.log_id[:4] + signature)}\n"

    def _create_entry(self, raw: bytes) -> _Response:
        try:
            proposed = json.loads(raw)
            kind, version = proposed["kind"], proposed["apiVersion"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _HttpError(400, f"malformed entry: {exc}") from None
        if (kind, version) == ("hashedrekord", "0.0.1"):
            body = _canonical_hashedrekord(proposed)
        elif (kind, version) == ("dsse", "0.0.1"):
            body = _canonical_dsse(proposed)
        else:
            raise _HttpError(400, f"unsupported entry type {kind}/{version}")

        leaf = _leaf_hash(body)
        integrated_time = int(time.time())
        with self._lock:
            if leaf in self._state.leaves:
                raise _HttpError(409, "an equivalent entry already exists in the log")
            self._state.leaves.append(leaf)
            self._state.bodies.append(body)
            index = len(self._state.leaves) - 1
            leaves = list(self._state.leaves)
        root = _tree_hash(leaves)
        body_b64 = _b64(body)
        set_payload = rfc8785.dumps(
            {
                "body": body_b64,
                "integratedTime": integrated_time,
                "logID": self.log_id.hex(),
                "logIndex": index,
            }
        )
        set_signature = self.key.sign(set_payload, ec.ECDSA(hashes.SHA256()))
        entry = {
            "body": body_b64,
            "integratedTime": integrated_time,
            "logID": self.log_id.hex(),
            "logIndex": index,
            "verification": {
                "inclusionProof": {
                    "logIndex": index,
                    "rootHash": root.hex(),
                    "treeSize": len(leaves),
                    "hashes": [h.hex() for h in _inclusion_path(index, leaves)],
                    "checkpoint": self._checkpoint(len(leaves), root),
                },
                "signedEntryTimestamp": _b64(set_signature),
            },
        }
        return _Response.json(201, {leaf.hex(): entry})


def _load_verifier(pem_b64: str) -> ec.EllipticCurvePublicKey:
    try:
        cert = x509.load_pem_x509_certificate(base64.b64decode(pem_b64))
    except ValueError as exc:
        raise _HttpError(400, f"verifier is not a PEM certificate: {exc}") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _HttpError(400, "only ECDSA verifiers are supported")
    return key


def _canonical_hashedrekord(proposed: Mapping[str, Any]) -> bytes:
    try:
        spec = proposed["spec"]
        signature = base64.b64decode(spec["signature"]["content"])
        verifier = spec["signature"]["publicKey"]["content"]
        algorithm = spec["data"]["hash"]["algorithm"]
        digest_hex = spec["data"]["hash"]["value"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _HttpError(400, f"malformed hashedrekord: {exc}") from None
    if algorithm != "sha256":
        raise _HttpError(400, f"unsupported hash algorithm {algorithm!r}")
    try:
        _load_verifier(verifier).verify(
            signature, bytes.fromhex(digest_hex), ec.ECDSA(Prehashed(hashes.SHA256()))
        )
    except (InvalidSignature, ValueError):
        raise _HttpError(400, "hashedrekord signature does not verify") from None
    return rfc8785.dumps(
        {
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": digest_hex}},
                "signature": {"content": _b64(signature), "publicKey": {"content": verifier}},
            },
        }
    )


def _pae(payload_type: str, payload: bytes) -> bytes:
    head = f"DSSEv1 {len(payload_type)} {payload_type} {len(payload)} ".encode()
    return head + payload


def _canonical_dsse(proposed: Mapping[str, Any]) -> bytes:
    """Rekor's dsse type: it stores hashes of the envelope and payload, and each signature."""
    try:
        content = proposed["spec"]["proposedContent"]
        envelope_text: str = content["envelope"]
        verifiers: list[str] = content["verifiers"]
        envelope = json.loads(envelope_text)
        payload = base64.b64decode(envelope["payload"])
        payload_type: str = envelope["payloadType"]
        signatures = [base64.b64decode(s["sig"]) for s in envelope["signatures"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise _HttpError(400, f"malformed dsse entry: {exc}") from None
    if not signatures or not verifiers:
        raise _HttpError(400, "dsse entry needs at least one signature and one verifier")
    pae = _pae(payload_type, payload)
    recorded = []
    for signature in signatures:
        for verifier in verifiers:
            try:
                _load_verifier(verifier).verify(signature, pae, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            recorded.append({"signature": _b64(signature), "verifier": verifier})
            break
        else:
            raise _HttpError(400, "a dsse signature does not verify with any given verifier")
    return rfc8785.dumps(
        {
            "apiVersion": "0.0.1",
            "kind": "dsse",
            "spec": {
                "envelopeHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(envelope_text.encode()).hexdigest(),
                },
                "payloadHash": {
                    "algorithm": "sha256",
                    "value": hashlib.sha256(payload).hexdigest(),
                },
                "signatures": recorded,
            },
        }
    )


# --------------------------------------------------------------------------------------------
# The whole instance
# --------------------------------------------------------------------------------------------


def _public_key_entry(
    key: ec.EllipticCurvePublicKey, base_url: str, start: datetime
) -> dict[str, Any]:
    return {
        "baseUrl": base_url,
        "hashAlgorithm": "SHA2_256",
        "publicKey": {
            "rawBytes": _b64(_spki_der(key)),
            "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": {"start": _rfc3339(start)},
        },
        "logId": {"keyId": _b64(_key_id(key))},
    }


def _service(url: str, start: datetime) -> dict[str, Any]:
    return {
        "url": url,
        "majorApiVersion": 1,
        "validFor": {"start": _rfc3339(start)},
        "operator": _OPERATOR,
    }


class SigstoreInstance:
    """OIDC issuer + Fulcio-style CA + CT log key + Rekor-style log, all on loopback.

    Use as a context manager (or :func:`running_sigstore`); the CA trusts :attr:`oidc` and any
    issuer added with :meth:`add_issuer`.
    """

    def __init__(self) -> None:
        self.oidc = OidcIssuer()
        self.ct_log = CtLogKey()
        self.fulcio = FulcioCA(self.ct_log)
        self.rekor = RekorLog()
        self._extra_issuers: list[OidcIssuer] = []
        self._started = False

    def start(self) -> None:
        """Start every service and make the CA trust the primary issuer."""
        self.oidc.start()
        self.fulcio.start()
        self.rekor.start()
        self.fulcio.trust_issuer(self.oidc.url)
        self._started = True

    def stop(self) -> None:
        """Stop every service (safe to call twice)."""
        services: list[OidcIssuer | FulcioCA | RekorLog] = [*self._extra_issuers, self.rekor]
        services += [self.fulcio, self.oidc]
        for service in services:
            service.stop()
        self._extra_issuers.clear()
        self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_issuer(self, *, trusted: bool = True) -> OidcIssuer:
        """Start another OIDC issuer; with ``trusted`` the CA accepts its tokens too."""
        issuer = OidcIssuer()
        issuer.start()
        self._extra_issuers.append(issuer)
        if trusted:
            self.fulcio.trust_issuer(issuer.url)
        return issuer

    def trusted_root(self) -> dict[str, Any]:
        """The ``trusted_root.json`` document (media type 0.1) for this instance."""
        ca_start = self.fulcio.created
        return {
            "mediaType": _TRUSTED_ROOT_MEDIA_TYPE,
            "tlogs": [
                _public_key_entry(self.rekor.key.public_key(), self.rekor.url, self.rekor.created)
            ],
            "certificateAuthorities": [
                {
                    "subject": {"organization": "portcullis.test", "commonName": "portcullis"},
                    "uri": self.fulcio.url,
                    "certChain": {
                        "certificates": [
                            {"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))}
                            for c in self.fulcio.chain
                        ]
                    },
                    "validFor": {"start": _rfc3339(ca_start)},
                }
            ],
            "ctlogs": [
                _public_key_entry(
                    self.ct_log.key.public_key(),
                    f"{self.fulcio.url}/ct",
                    self.ct_log.created - timedelta(minutes=1),
                )
            ],
            "timestampAuthorities": [],
        }

    def signing_config(self) -> dict[str, Any]:
        """The signing config (media type v0.2): where the CA, log and issuer answer."""
        start = self.fulcio.created
        return {
            "mediaType": _SIGNING_CONFIG_MEDIA_TYPE,
            "caUrls": [_service(self.fulcio.url, start)],
            "oidcUrls": [_service(self.oidc.url, start)],
            "rekorTlogUrls": [_service(self.rekor.url, start)],
            "tsaUrls": [],
            "rekorTlogConfig": {"selector": "ANY"},
            "tsaConfig": {"selector": "ANY"},
        }

    def client_trust_config_json(self) -> str:
        """The ``ClientTrustConfig`` JSON that ``sigstore.models.ClientTrustConfig`` reads."""
        return json.dumps(
            {
                "mediaType": _CLIENT_TRUST_CONFIG_MEDIA_TYPE,
                "trustedRoot": self.trusted_root(),
                "signingConfig": self.signing_config(),
            }
        )

    def write_trusted_root(self, path: Path) -> Path:
        """Write ``trusted_root.json`` to ``path`` and return it."""
        path.write_text(json.dumps(self.trusted_root(), indent=2))
        return path


@contextmanager
def running_sigstore() -> Iterator[SigstoreInstance]:
    """Start a :class:`SigstoreInstance` for the duration of a ``with`` block (or a fixture)."""
    instance = SigstoreInstance()
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
