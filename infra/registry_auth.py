"""A token service for distribution's ``auth: token`` mode: who may pull and who may push.

Distribution's htpasswd mode authenticates but does not authorize: every account may push to
every repository, so a deploy account could overwrite an image or plant a signature tag. In
token mode the registry lets a request through only when it carries a JWT, signed by a key
whose certificate is in its ``rootcertbundle``, whose ``access`` claim lists the repository and
the action (``pull``, ``push``). This module is the service that signs those tokens.

The exchange, as the Docker Registry v2 token authentication spec describes it:

1. a client sends a request; the registry answers 401 with
   ``WWW-Authenticate: Bearer realm="http://127.0.0.1:P/token",service="...",scope="..."``;
2. the client asks the realm ``GET /token?service=...&scope=repository:team/app:pull,push``
   with its basic credentials;
3. this service checks the password (bcrypt), intersects what was asked for with what the
   account's role allows, and signs a short-lived token carrying only that intersection. An
   account that may do nothing asked for still gets a token, with an empty ``access`` list
   (the spec: an authorization shortfall is not an error here); the registry then refuses
   the request itself. Wrong or missing credentials get 401 and no token.

Roles (:class:`Role`): ``push`` may pull and push, ``pull`` may only pull, ``promote`` may pull
the images under its prefix and push only to the promotion-record repositories under its
``records`` prefix (always below :data:`RECORDS_ROOT`), anything else may do nothing. A
:class:`Grant` limits a role to the repositories under a path prefix. Nobody is granted
``delete`` or the catalog.

Why a separate repository for promotion records: registry tokens are scoped to a repository,
never to a tag, so "may push only ``sha256-*.att`` tags of ``portcullis/hello``" cannot be said
in a token. A deploy side allowed to push to the image repository could push image tags and
overwrite the build's signatures. Records live under ``promotions/<environment>/<repository>``
instead (cosign's ``COSIGN_REPOSITORY`` layout), where the promoter may push and nothing is
ever deployed from.

Run it as its own process: ``python -m infra.registry_auth --config FILE``. It listens on
127.0.0.1 only and logs each decision (user, scopes asked, scopes granted), never a password
or a token. :func:`ensure_signing_material` makes the ES256 key and the self-signed
certificate the registry trusts; the token header names the key by its libtrust fingerprint
(``kid``), the form distribution 2.8 looks keys up by.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, assert_never
from urllib.parse import parse_qs, urlsplit

import bcrypt
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.errors import ConfigurationError
from portcullis.promotion_record import RECORDS_ROOT

log = logging.getLogger("portcullis.registry_auth")

LISTEN_HOST = "127.0.0.1"
TOKEN_PATH = "/token"
HEALTH_PATH = "/healthz"
#: The ``Server`` header the service answers with (how a probe tells it from other servers).
SERVER_NAME = "portcullis-registry-auth"
DEFAULT_ISSUER = "portcullis-registry-auth"
DEFAULT_SERVICE = "portcullis-registry"
DEFAULT_TOKEN_TTL = 300
# The spec: a token should never be returned with less than 60 seconds to live (older clients
# assume 60). The upper bound keeps "short-lived" true whatever a config file says.
MIN_TOKEN_TTL = 60
MAX_TOKEN_TTL = 3600
#: Seconds a successful password check is remembered (see :class:`TokenService`).
VERIFIED_CREDENTIALS_TTL = 60.0
# bcrypt cost for account hashes. The token service checks a password once per token (not once
# per registry request, as htpasswd mode did), so a standard cost is affordable here.
DEFAULT_BCRYPT_ROUNDS = 10

SIGNING_KEY_FILE = "token-signing.key"
SIGNING_CERT_FILE = "token-signing.crt"

_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)


@functools.cache
def _dummy_hash() -> str:
    """Checked against for unknown users, so that "no such user" costs as long as "wrong
    password" and response times do not tell which account names exist."""
    return bcrypt.hashpw(
        b"no account has this password", bcrypt.gensalt(DEFAULT_BCRYPT_ROUNDS)
    ).decode()


# -- roles and grants ------------------------------------------------------------------------


class Role(StrEnum):
    """What an account may do with the repositories its grant covers."""

    PUSH = "push"  # the build side: pull and push (and so sign, which is a push)
    PULL = "pull"  # the deploy side: pull only
    PROMOTE = "promote"  # a deploy side's promoter: pull images, push only promotion records
    NONE = "none"  # nothing at all

    @classmethod
    def parse(cls, name: str) -> Role:
        """The role called ``name``; any name that is not a role grants nothing."""
        try:
            return cls(name)
        except ValueError:
            return cls.NONE

    @property
    def actions(self) -> frozenset[str]:
        """The repository actions this role allows."""
        match self:
            case Role.PUSH:
                return frozenset({"pull", "push"})
            case Role.PULL | Role.PROMOTE:
                # PROMOTE's push applies only to its records prefix: see Grant.allowed.
                return frozenset({"pull"})
            case Role.NONE:
                return frozenset()
            case _:
                assert_never(self)


@dataclass(frozen=True)
class Grant:
    """A role, limited to repositories under ``prefix`` ("" means every repository).

    ``prefix="portcullis"`` covers ``portcullis`` and ``portcullis/app`` but not
    ``portcullis-other/app``: a prefix is matched by whole path components.
    """

    role: Role
    prefix: str = ""
    records: str = ""  # PROMOTE only: where it may push, a path under RECORDS_ROOT

    def __post_init__(self) -> None:
        prefix = self.prefix.strip("/")
        if prefix and not _REPO_RE.fullmatch(prefix):
            raise ConfigurationError(
                f"grant prefix {self.prefix!r} is not a repository path",
                hint="use lowercase path components such as 'portcullis' or 'team/apps'",
            )
        object.__setattr__(self, "prefix", prefix)
        records = self.records.strip("/")
        if self.role is Role.PROMOTE:
            if not _REPO_RE.fullmatch(records) or not _under(records, RECORDS_ROOT):
                raise ConfigurationError(
                    f"a promote grant needs a records prefix under {RECORDS_ROOT!r}, "
                    f"not {self.records!r}",
                    hint=f"e.g. '{RECORDS_ROOT}' or '{RECORDS_ROOT}/prod'",
                )
        elif records:
            raise ConfigurationError(f"only a promote grant has a records prefix ({self.role.value})")
        object.__setattr__(self, "records", records)

    def covers(self, repository: str) -> bool:
        """Whether ``repository`` lies under this grant's prefix."""
        return not self.prefix or _under(repository, self.prefix)

    def allowed(self, repository: str) -> frozenset[str]:
        """The actions this grant allows on ``repository``."""
        if self.role is Role.PROMOTE and _under(repository, self.records):
            return frozenset({"pull", "push"})
        if self.role is Role.PROMOTE and _under(repository, RECORDS_ROOT):
            # Other environments' records: readable (the next environment verifies them),
            # never writable.
            return frozenset({"pull"})
        return self.role.actions if self.covers(repository) else frozenset()

    def describe(self) -> str:
        """``push on portcullis/*``-style text for logs and errors."""
        text = f"{self.role.value} on {self.prefix + '/*' if self.prefix else 'every repository'}"
        return text + (f", push on {self.records}/*" if self.records else "")


def _under(repository: str, prefix: str) -> bool:
    """``repository`` is ``prefix`` or below it, by whole path components."""
    return repository == prefix or repository.startswith(prefix + "/")


@dataclass(frozen=True)
class Scope:
    """One requested or granted resource scope: ``repository:team/app:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse ``type:name:actions``; None when the text is not of that form.

        The name may itself hold colons (a ``host:port/`` part), so the type ends at the first
        colon and the actions start after the last one.
        """
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and kind and name):
            return None
        wanted = tuple(dict.fromkeys(a for a in actions.split(",") if a))
        return cls(kind, name, wanted)

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    def claim(self) -> dict[str, Any]:
        """This scope as an entry of the token's ``access`` claim."""
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Scopes from ``scope`` query values (repeated, or space-separated in one value).

    Entries that do not parse are dropped: nothing can be granted on them. Actions asked for
    the same resource twice are merged.
    """
    merged: dict[tuple[str, str], list[str]] = {}
    for value in values:
        for part in value.split():
            scope = Scope.parse(part)
            if scope is None:
                continue
            actions = merged.setdefault((scope.type, scope.name), [])
            actions.extend(a for a in scope.actions if a not in actions)
    return [Scope(kind, name, tuple(actions)) for (kind, name), actions in merged.items()]


def decide(grant: Grant, requested: Sequence[Scope]) -> list[Scope]:
    """What a token for an account with ``grant`` carries when ``requested`` is asked for.

    The intersection of what was asked and what the grant allows, per repository; scopes of
    any other type (``registry:catalog:*``) and invalid repository names get nothing.
    Resources left with no action are dropped, so "nothing" is an empty list.
    """
    granted: list[Scope] = []
    for scope in requested:
        if scope.type != "repository" or not _REPO_RE.fullmatch(scope.name):
            continue
        allowed = grant.allowed(scope.name)
        actions = tuple(a for a in scope.actions if a in allowed)
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


# -- configuration ---------------------------------------------------------------------------


class AccountConfig(BaseModel):
    """One account as the token service's configuration file holds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    password_bcrypt: str = Field(repr=False, description="bcrypt hash of the password")
    role: str = Field(description="push, pull; any other name grants nothing")
    prefix: str = Field(default="", description="repositories the role covers; '' for all")
    records: str = Field(default="", description="promote role: where promotion records go")

    @field_validator("password_bcrypt")
    @classmethod
    def _is_bcrypt(cls, value: str) -> str:
        if not re.fullmatch(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", value):
            raise ValueError("is not a bcrypt hash")
        return value

    @property
    def grant(self) -> Grant:
        """The typed grant (an unknown role name becomes :attr:`Role.NONE`)."""
        return Grant(Role.parse(self.role), self.prefix, self.records)


class AuthServiceConfig(BaseModel):
    """Everything the token service process needs; written by :func:`write_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=1, le=65535, description="TCP port on 127.0.0.1")
    issuer: str = Field(default=DEFAULT_ISSUER, min_length=1)
    service: str = Field(default=DEFAULT_SERVICE, min_length=1)
    signing_key: Path = Field(description="PEM PKCS#8 ECDSA P-256 key that signs tokens")
    token_ttl_seconds: int = Field(default=DEFAULT_TOKEN_TTL, ge=MIN_TOKEN_TTL, le=MAX_TOKEN_TTL)
    accounts: dict[str, AccountConfig] = Field(default_factory=dict)

    @property
    def realm(self) -> str:
        """The token endpoint URL the registry sends clients to."""
        return f"http://{LISTEN_HOST}:{self.port}{TOKEN_PATH}"


def hash_password(password: str, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """A bcrypt hash of ``password`` for :class:`AccountConfig`."""
    if not password:
        raise ConfigurationError("an account password must not be empty")
    if len(password.encode()) > 72:
        # bcrypt ignores everything after 72 bytes; refuse rather than silently truncate.
        raise ConfigurationError("an account password must be at most 72 bytes (bcrypt)")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def password_matches(password: str, password_hash: str) -> bool:
    """Whether ``password`` matches the bcrypt ``password_hash`` (bcrypt compares in constant
    time)."""
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:  # a malformed hash, or a password bcrypt cannot take
        return False


def write_config(path: Path, config: AuthServiceConfig) -> None:
    """Write ``config`` to ``path``, readable by the owner only (it holds password hashes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(config.model_dump_json(indent=2) + "\n")
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def load_config(path: Path) -> AuthServiceConfig:
    """Read and validate a configuration file; :class:`ConfigurationError` if it is bad."""
    try:
        return AuthServiceConfig.model_validate_json(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read token service config {path}: {exc}") from None
    except ValueError as exc:
        raise ConfigurationError(f"token service config {path} is invalid: {exc}") from None


# -- signing material ------------------------------------------------------------------------


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The libtrust fingerprint distribution 2.8 uses as a key's ``kid``.

    SHA-256 of the DER SubjectPublicKeyInfo, cut to 240 bits, base32 without padding, in
    twelve groups of four joined by colons (``ABCD:EFGH:...``).
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class SigningMaterial:
    """The token signing key and the certificate the registry trusts it by."""

    key_path: Path
    cert_path: Path
    key_id: str


def _write_private_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the PEM signing key; :class:`ConfigurationError` unless it is ECDSA P-256."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot load the token signing key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigurationError(f"token signing key {path} is not an ECDSA P-256 key (ES256)")
    return key


def ensure_signing_material(
    directory: Path, *, common_name: str = DEFAULT_ISSUER
) -> SigningMaterial:
    """Make (once) the ES256 signing key and its self-signed certificate in ``directory``.

    An existing key is kept, so tokens issued before a restart stay valid; the certificate
    is remade when it is missing, does not match the key, or is about to expire.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / SIGNING_KEY_FILE, directory / SIGNING_CERT_FILE
    if key_path.exists():
        key = load_signing_key(key_path)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private_bytes(key_path, pem)
    public = key.public_key()
    now = dt.datetime.now(dt.UTC)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        current = cert.public_key() == public and cert.not_valid_after_utc > now + dt.timedelta(
            days=30
        )
    except (OSError, ValueError):
        current = False
    if not current:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return SigningMaterial(key_path, cert_path, libtrust_key_id(public))


# -- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    """A signed token and when it stops working. The token is kept out of ``repr``."""

    token: str = field(repr=False)
    subject: str
    access: tuple[Scope, ...]
    issued_at: int
    expires_at: int
    jwt_id: str

    def response(self) -> dict[str, Any]:
        """The token endpoint's JSON body (``token`` and its OAuth2 alias ``access_token``)."""
        return {
            "token": self.token,
            "access_token": self.token,
            "expires_in": self.expires_at - self.issued_at,
            "issued_at": dt.datetime.fromtimestamp(self.issued_at, dt.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }


class TokenSigner:
    """Signs registry tokens (ES256 JWTs with a libtrust ``kid``) for one issuer and service.

    Args:
        key: the ECDSA P-256 key whose certificate is in the registry's rootcertbundle.
        issuer: ``iss``; must equal the registry's ``auth.token.issuer``.
        service: ``aud``; must equal the registry's ``auth.token.service``.
        ttl_seconds: how long a token works.
        clock: seconds since the epoch (a test can pass a fixed one).
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        service: str,
        ttl_seconds: int = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._kid = libtrust_key_id(key.public_key())
        self.issuer = issuer
        self.service = service
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    @property
    def key_id(self) -> str:
        """The ``kid`` every token carries."""
        return self._kid

    def issue(self, subject: str, access: Sequence[Scope]) -> IssuedToken:
        """Sign a token for ``subject`` carrying exactly ``access``."""
        now = int(self._clock())
        jwt_id = secrets.token_urlsafe(16)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            # A string, not a list: distribution 2.8 reads "aud" into a Go string.
            "aud": self.service,
            "exp": now + self.ttl_seconds,
            "nbf": now,
            "iat": now,
            "jti": jwt_id,
            "access": [scope.claim() for scope in access],
        }
        token = jwt.encode(
            claims, self._key, algorithm="ES256", headers={"typ": "JWT", "kid": self._kid}
        )
        return IssuedToken(
            token=token,
            subject=subject,
            access=tuple(access),
            issued_at=now,
            expires_at=now + self.ttl_seconds,
            jwt_id=jwt_id,
        )


# -- the service -----------------------------------------------------------------------------


class Decision(StrEnum):
    """How a token request ended, as logged."""

    GRANT = "grant"  # a token with everything that was asked for
    PARTIAL = "partial"  # a token with less than was asked for (possibly nothing)
    DENY = "deny"  # no token: credentials missing or wrong


@dataclass(frozen=True)
class TokenResponse:
    """What the token endpoint answers: an HTTP status and a JSON body."""

    status: int
    body: dict[str, Any]
    decision: Decision
    token: IssuedToken | None = None


class TokenService:
    """The policy side of the token endpoint: credentials in, a signed token (or no) out.

    Kept apart from the HTTP server so its decisions can be tested without sockets.
    """

    def __init__(
        self,
        config: AuthServiceConfig,
        signer: TokenSigner,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._signer = signer
        self._clock = clock
        # Recently verified credentials, as a keyed hash (never the password itself): a push
        # asks for several tokens within a second, and bcrypt at a standard cost takes tens of
        # milliseconds each time. Only successes are remembered, so every wrong guess still
        # pays the full bcrypt cost.
        self._verified_key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._verified_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: AuthServiceConfig) -> TokenService:
        """A service signing with the key ``config`` names."""
        signer = TokenSigner(
            load_signing_key(config.signing_key),
            issuer=config.issuer,
            service=config.service,
            ttl_seconds=config.token_ttl_seconds,
        )
        return cls(config, signer)

    def _authenticate(self, authorization: str | None) -> str | None:
        """The user name if the basic credentials are right, else None."""
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        if not sep:
            return None
        account = self._config.accounts.get(username)
        fingerprint = hmac.new(
            self._verified_key, f"{username}\0{password}".encode(), hashlib.sha256
        ).digest()
        now = self._clock()
        with self._verified_lock:
            remembered = self._verified.get(username)
        if (
            account is not None
            and remembered is not None
            and remembered[1] > now
            and hmac.compare_digest(remembered[0], fingerprint)
        ):
            return username
        ok = password_matches(password, account.password_bcrypt if account else _dummy_hash())
        if not ok or account is None:
            return None
        with self._verified_lock:
            self._verified[username] = (fingerprint, now + VERIFIED_CREDENTIALS_TTL)
        return username

    def handle(
        self,
        authorization: str | None,
        service: str | None,
        scopes: Sequence[str],
        client: str = "-",
    ) -> TokenResponse:
        """Answer one token request and log the decision.

        Args:
            authorization: the request's ``Authorization`` header, if any.
            service: the ``service`` query parameter, if any.
            scopes: every ``scope`` query value.
            client: who asked (an address), for the log.

        Returns:
            200 with a token (holding what the account may have of what it asked for), 401
            when the credentials are missing or wrong, 400 for another service's token.
        """
        requested = parse_scopes(scopes)
        asked = " ".join(str(s) for s in requested) or "-"
        if service is not None and service != self._config.service:
            log.warning(
                "decision=deny reason=unknown-service service=%r client=%s requested=%r",
                service,
                client,
                asked,
            )
            return TokenResponse(
                400,
                _error(
                    "UNSUPPORTED",
                    f"this token service issues tokens for "
                    f"{self._config.service!r}, not {service!r}",
                ),
                Decision.DENY,
            )
        username = self._authenticate(authorization)
        if username is None:
            log.warning(
                "decision=deny reason=%s client=%s requested=%r",
                "no-credentials" if not authorization else "bad-credentials",
                client,
                asked,
            )
            return TokenResponse(
                401,
                _error("UNAUTHORIZED", "user name or password not accepted"),
                Decision.DENY,
            )
        grant = self._config.accounts[username].grant
        granted = decide(grant, requested)
        issued = self._signer.issue(username, granted)
        complete = sum(len(s.actions) for s in granted) == sum(len(s.actions) for s in requested)
        decision = Decision.GRANT if complete else Decision.PARTIAL
        log.info(
            "decision=%s user=%s role=%r client=%s requested=%r granted=%r jti=%s ttl=%ds",
            decision.value,
            username,
            grant.describe(),
            client,
            asked,
            " ".join(str(s) for s in granted) or "-",
            issued.jwt_id,
            issued.expires_at - issued.issued_at,
        )
        return TokenResponse(200, issued.response(), decision, issued)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"errors": [{"code": code, "message": message}]}


class _Handler(BaseHTTPRequestHandler):
    """HTTP front of :class:`TokenService`: ``GET /token`` and ``GET /healthz``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, a keep-alive
    # client's delayed ACK adds ~40 ms to every token.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return SERVER_NAME

    service: TokenService  # set on the subclass made by :func:`make_server`

    def log_message(self, format: str, *args: Any) -> None:
        # Decisions are logged by TokenService; the default access line adds nothing (and
        # would carry the query string).
        return

    def _send(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Cache-Control", "no-store")  # tokens must not be cached by proxies
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == HEALTH_PATH:
            self._send(200, {"status": "ok"})
            return
        if url.path != TOKEN_PATH:
            self._send(404, _error("NOT_FOUND", f"no such endpoint {url.path}"))
            return
        query = parse_qs(url.query)
        services = query.get("service")
        answer = self.service.handle(
            self.headers.get("Authorization"),
            services[0] if services else None,
            query.get("scope", []),
            client=self.client_address[0],
        )
        headers = {}
        if answer.status == 401:
            headers["WWW-Authenticate"] = f'Basic realm="{DEFAULT_ISSUER}"'
        self._send(answer.status, answer.body, headers)

    def do_POST(self) -> None:
        # The OAuth2 form (grant_type=password / refresh_token) is not offered: clients fall
        # back to GET with basic credentials, which every registry client supports.
        self._send(405, _error("UNSUPPORTED", "use GET with basic credentials"), {"Allow": "GET"})


def make_server(config: AuthServiceConfig) -> ThreadingHTTPServer:
    """A token server for ``config`` bound to 127.0.0.1 (not yet serving)."""
    service = TokenService.from_config(config)
    handler = type("TokenHandler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((LISTEN_HOST, config.port), handler)
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m infra.registry_auth --config FILE``; serves until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.registry_auth",
        description="Token service for a distribution registry in auth: token mode.",
    )
    parser.add_argument("--config", type=Path, required=True, help="JSON configuration file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        config = load_config(args.config)
        for name, account in config.accounts.items():
            if Role.parse(account.role) is Role.NONE and account.role != Role.NONE.value:
                log.warning(
                    "account %s has unknown role %r: it is granted nothing", name, account.role
                )
        server = make_server(config)
    except (ConfigurationError, OSError) as exc:
        print(f"registry token service cannot start: {exc}", file=sys.stderr)
        return 2
    log.info(
        "serving realm=%s issuer=%s service=%s accounts=%s ttl=%ds",
        config.realm,
        config.issuer,
        config.service,
        ",".join(f"{n}({a.grant.describe()})" for n, a in sorted(config.accounts.items())) or "-",
        config.token_ttl_seconds,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
