"""A small client for the OCI distribution API: manifests, blobs, tags and referrers.

Everything that comes back from a registry is checked against the digest it was asked for: a
registry (or a proxy, or a disk) that returns other bytes than the digest names is caught here
and reported as :class:`~portcullis.errors.VerificationFailed`, so no caller ever signs,
verifies or deploys content it did not ask for.

Failures map onto the error hierarchy:

* credentials refused (401 after authenticating, 403) -> :class:`RegistryAuthError`, terminal;
* connection errors, timeouts, 429 and 5xx -> :class:`~portcullis.errors.TransientError`;
* a request the registry rejects (invalid manifest, unknown blob) -> :class:`RegistryRejected`;
* a manifest or blob that does not exist -> :class:`NotFoundInRegistry`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from portcullis.canonical import canonical_json
from portcullis.errors import PolicyRefusal, TransientError, VerificationFailed

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (
    MEDIA_OCI_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_LIST,
)

#: The OCI "empty" blob: the config of an artifact that has no configuration.
EMPTY_JSON = b"{}"

# Manifests are small; refuse anything that would only make sense as an attack on memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024

_REPO_RE = re.compile(
    r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class RegistryAuthError(PolicyRefusal):
    """The registry refused the credentials (or the lack of them). Retrying cannot help."""

    def __init__(self, registry: str, username: str | None, detail: str = "") -> None:
        who = username or "anonymous access"
        super().__init__(
            f"registry refused credentials for {who} at {registry}"
            + (f": {detail}" if detail else ""),
            hint="check the registry user name and password in the credentials block, and that "
            "this account may access the repository",
        )


class RegistryRejected(PolicyRefusal):
    """The registry rejected a request as invalid (bad manifest, unknown blob, bad name)."""


class NotFoundInRegistry(PolicyRefusal):
    """A manifest, tag or blob that was asked for does not exist in the registry."""


def digest_of(data: bytes) -> str:
    """The OCI content digest of ``data``: ``sha256:<64 hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(reference: str) -> bool:
    """Whether ``reference`` is a sha256 digest rather than a tag."""
    return bool(_DIGEST_RE.fullmatch(reference))


def referrers_tag(digest: str) -> str:
    """The tag of the referrers-API fallback index for ``digest``: ``sha256-<hex>``."""
    _check_digest(digest)
    return digest.replace(":", "-")


def _check_digest(digest: str) -> None:
    if not _DIGEST_RE.fullmatch(digest):
        raise PolicyRefusal(f"{digest!r} is not a sha256 digest (sha256:<64 lowercase hex>)")


def _check_repo(repository: str) -> None:
    if len(repository) > 255 or not _REPO_RE.fullmatch(repository):
        raise PolicyRefusal(
            f"{repository!r} is not a valid repository name",
            hint="use lowercase path components such as team/app",
        )


def _check_reference(reference: str) -> None:
    if not (_DIGEST_RE.fullmatch(reference) or _TAG_RE.fullmatch(reference)):
        raise PolicyRefusal(f"{reference!r} is neither a tag nor a sha256 digest")


_TAG_LOCKS: dict[tuple[str, str, str], threading.Lock] = {}
_TAG_LOCKS_GUARD = threading.Lock()


def _tag_lock(registry: str, repository: str, tag: str) -> threading.Lock:
    with _TAG_LOCKS_GUARD:
        return _TAG_LOCKS.setdefault((registry, repository, tag), threading.Lock())


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about a blob or another manifest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears inside a manifest or index."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: object) -> Descriptor:
        """Parse a descriptor object; :class:`RegistryRejected` if it is malformed."""
        if not isinstance(data, dict):
            raise RegistryRejected(f"descriptor is not an object: {data!r:.200}")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        annotations = data.get("annotations") or {}
        artifact_type = data.get("artifactType")
        if (
            not isinstance(media_type, str)
            or not isinstance(digest, str)
            or not _DIGEST_RE.fullmatch(digest)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or not isinstance(annotations, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())
            or not (artifact_type is None or isinstance(artifact_type, str))
        ):
            raise RegistryRejected(f"malformed descriptor: {json.dumps(data)[:300]}")
        return cls(media_type, digest, size, dict(annotations), artifact_type)


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as the registry served it, with its verified digest."""

    media_type: str
    digest: str
    raw: bytes

    def json(self) -> dict[str, Any]:
        """The parsed manifest; :class:`RegistryRejected` if it is not a JSON object."""
        try:
            data = json.loads(self.raw)
        except ValueError:
            raise RegistryRejected(f"manifest {self.digest} is not JSON") from None
        if not isinstance(data, dict):
            raise RegistryRejected(f"manifest {self.digest} is not a JSON object")
        return data

    def layers(self) -> list[Descriptor]:
        """The ``layers`` of an image manifest (empty for an index)."""
        raw_layers = self.json().get("layers") or []
        if not isinstance(raw_layers, list):
            raise RegistryRejected(f"manifest {self.digest} has a malformed 'layers' list")
        return [Descriptor.from_json(layer) for layer in raw_layers]

    def descriptor(self) -> Descriptor:
        """A descriptor pointing at this manifest (for ``subject`` or an index entry)."""
        artifact_type = self.json().get("artifactType")
        return Descriptor(
            self.media_type,
            self.digest,
            len(self.raw),
            artifact_type=artifact_type if isinstance(artifact_type, str) else None,
        )


class _RegistryAuth(httpx.Auth):
    """Answers the registry's challenge: basic credentials, or a bearer token from its realm.

    The first request goes out without credentials; the challenge says which scheme the
    registry wants, and later requests use it straight away (tokens are kept per repository).
    """

    requires_response_body = True  # the token response is read inside the flow

    def __init__(self, registry: str, username: str | None, password: str | None) -> None:
        self._registry = registry
        self._username = username
        self._password = password
        self._basic = False
        self._tokens: dict[str, str] = {}

    def _basic_header(self) -> str:
        pair = f"{self._username}:{self._password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    @staticmethod
    def _repo_of(request: httpx.Request) -> str:
        # /v2/<name>/(manifests|blobs|tags|referrers)/...; the name may contain slashes.
        match = re.match(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)/", request.url.path)
        return match.group(1) if match else ""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        repo = self._repo_of(request)
        if repo in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[repo]}"
        elif self._basic and self._username is not None:
            request.headers["Authorization"] = self._basic_header()
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("www-authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
        if scheme == "basic":
            if self._username is None:
                return  # nothing to offer: the 401 reaches the caller, which reports it
            if "Authorization" in request.headers and self._basic:
                return  # these credentials were already refused
            self._basic = True
            request.headers["Authorization"] = self._basic_header()
            yield request
        elif scheme == "bearer" and "realm" in params:
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            # Without an account, ask for an anonymous token (public repositories allow pulls).
            headers = {} if self._username is None else {"Authorization": self._basic_header()}
            token_request = httpx.Request("GET", params["realm"], params=query, headers=headers)
            token_response = yield token_request
            if token_response.status_code in (401, 403):
                raise RegistryAuthError(self._registry, self._username, "the token service said no")
            if token_response.status_code != 200:
                raise TransientError(
                    f"token service of {self._registry} answered HTTP {token_response.status_code}"
                )
            try:
                body = token_response.json()
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token:
                raise TransientError(f"token service of {self._registry} returned no token")
            self._tokens[repo] = token
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


class RegistryClient:
    """Talks to one registry over HTTP(S). Use as a context manager, or call :meth:`close`.

    Args:
        registry: ``host[:port]`` as it appears in image references.
        username: account name, or None for anonymous access.
        password: the account's password or token; never logged or shown in ``repr``.
        insecure_http: use plain HTTP. None means: plain HTTP for loopback hosts only.
        timeout: seconds for each request.
        transport: an httpx transport to send requests through (None: the network).
    """

    def __init__(
        self,
        registry: str,
        *,
        username: str | None = None,
        password: str | None = None,
        insecure_http: bool | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if insecure_http is None:
            insecure_http = registry.rsplit(":", 1)[0] in _LOOPBACK or registry in _LOOPBACK
        self.registry = registry
        self.username = username
        scheme = "http" if insecure_http else "https"
        self._base = f"{scheme}://{registry}"
        self._http = httpx.Client(
            auth=_RegistryAuth(registry, username, password),
            timeout=timeout,
            transport=transport,
            follow_redirects=True,
            headers={"User-Agent": "portcullis-oci/1"},
        )

    def __repr__(self) -> str:
        return f"RegistryClient({self.registry!r}, username={self.username!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}{path}"

    def _request(
        self,
        method: str,
        url: str,
        *,
        ok: Iterable[int],
        missing_ok: bool = False,
        what: str,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request and map every failure onto the error hierarchy."""
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise TransientError(
                f"registry {self.registry} is unreachable while trying to {what}: "
                f"{type(exc).__name__}: {exc}",
                hint="check that the registry runs (python -m infra.stack up) and retry",
            ) from None
        status = response.status_code
        if status in set(ok):
            return response
        if status == 404 and missing_ok:
            return response
        if status in (401, 403):
            # A token registry answers 401 with error="insufficient_scope" when the token
            # service vouched for the account but did not grant the action: a 403 in effect.
            denied = status == 403 or 'error="insufficient_scope"' in response.headers.get(
                "www-authenticate", ""
            )
            detail = "not allowed to " + what if denied else f"while trying to {what}"
            raise RegistryAuthError(self.registry, self.username, detail)
        if status == 429 or status >= 500:
            raise TransientError(
                f"registry {self.registry} answered HTTP {status} while trying to {what}"
                + _error_summary(response)
            )
        if status == 404:
            raise NotFoundInRegistry(
                f"cannot {what}: not found in registry {self.registry}" + _error_summary(response)
            )
        raise RegistryRejected(
            f"registry {self.registry} refused to {what}: HTTP {status}" + _error_summary(response)
        )

    # -- API ----------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the registry answers the v2 API and accepts these credentials."""
        self._request("GET", self._url("/v2/"), ok=(200,), what="check the v2 API")

    def head_manifest(self, repository: str, reference: str) -> Descriptor | None:
        """What ``reference`` (tag or digest) points at, without fetching it; None if absent.

        The digest comes from the registry's header and is not verified here: fetch the
        manifest with :meth:`get_manifest` before trusting its content.
        """
        _check_repo(repository)
        _check_reference(reference)
        response = self._request(
            "HEAD",
            self._url(f"/v2/{repository}/manifests/{reference}"),
            ok=(200,),
            missing_ok=True,
            what=f"look up {repository}:{reference}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        )
        if response.status_code == 404:
            return None
        digest = response.headers.get("docker-content-digest", "")
        if not _DIGEST_RE.fullmatch(digest):
            raise RegistryRejected(
                f"registry {self.registry} gave no usable digest for {repository}:{reference}"
            )
        if is_digest(reference) and digest != reference:
            raise VerificationFailed(
                "registry-content", reference, f"the registry says it is {digest}"
            )
        return Descriptor(
            response.headers.get("content-type", "").split(";")[0],
            digest,
            int(response.headers.get("content-length", "0")),
        )

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """Fetch a manifest by tag or digest and verify that the bytes match their digest.

        Raises:
            NotFoundInRegistry: no such tag or digest.
            VerificationFailed: the bytes do not hash to the digest asked for (or, for a tag,
                to the digest the registry itself announced).
        """
        _check_repo(repository)
        _check_reference(reference)
        response = self._request(
            "GET",
            self._url(f"/v2/{repository}/manifests/{reference}"),
            ok=(200,),
            what=f"fetch manifest {repository}:{reference}",
            headers={"Accept": ", ".join(MANIFEST_MEDIA_TYPES)},
        )
        raw = response.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryRejected(f"manifest {repository}:{reference} is larger than 4 MiB")
        actual = digest_of(raw)
        announced = response.headers.get("docker-content-digest")
        expected = reference if is_digest(reference) else announced
        if expected is not None and actual != expected:
            raise VerificationFailed(
                "registry-content",
                expected,
                f"registry {self.registry} served manifest bytes for {repository}:{reference} "
                f"that hash to {actual}: the registry or its storage is corrupt or lying",
            )
        if is_digest(reference) and announced is not None and announced != actual:
            raise VerificationFailed(
                "registry-content",
                reference,
                f"registry {self.registry} announced digest {announced} for it",
            )
        manifest = Manifest(response.headers.get("content-type", "").split(";")[0], actual, raw)
        declared = manifest.json().get("mediaType")
        if isinstance(declared, str) and declared:
            manifest = Manifest(declared, actual, raw)
        return manifest

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """Push manifest bytes under a tag or their digest. Returns the manifest's digest.

        Raises:
            PolicyRefusal: ``reference`` is a digest that is not the digest of ``raw``.
            VerificationFailed: the registry announced another digest for what it stored.
        """
        digest, _ = self._put_manifest(repository, reference, raw, media_type)
        return digest

    def _put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> tuple[str, httpx.Headers]:
        _check_repo(repository)
        _check_reference(reference)
        digest = digest_of(raw)
        if is_digest(reference) and reference != digest:
            raise PolicyRefusal(
                f"refusing to push a manifest under digest {reference}: its bytes hash to {digest}"
            )
        response = self._request(
            "PUT",
            self._url(f"/v2/{repository}/manifests/{reference}"),
            ok=(201,),
            what=f"push manifest {repository}:{reference}",
            content=raw,
            headers={"Content-Type": media_type},
        )
        announced = response.headers.get("docker-content-digest")
        if announced is not None and announced != digest:
            raise VerificationFailed(
                "registry-content",
                digest,
                f"registry {self.registry} stored the manifest under digest {announced}",
            )
        return digest, response.headers

    def delete_manifest(self, repository: str, digest: str) -> None:
        """Delete a manifest by digest (tags pointing at it go with it)."""
        _check_repo(repository)
        _check_digest(digest)
        self._request(
            "DELETE",
            self._url(f"/v2/{repository}/manifests/{digest}"),
            ok=(202,),
            what=f"delete manifest {repository}@{digest}",
        )

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the repository holds the blob ``digest``."""
        _check_repo(repository)
        _check_digest(digest)
        response = self._request(
            "HEAD",
            self._url(f"/v2/{repository}/blobs/{digest}"),
            ok=(200,),
            missing_ok=True,
            what=f"look up blob {digest} in {repository}",
        )
        return response.status_code == 200

    def upload_blob(self, repository: str, data: bytes, *, chunk_size: int | None = None) -> str:
        """Upload ``data`` as a blob unless the repository already has it. Returns its digest.

        Args:
            repository: target repository.
            data: the blob's bytes.
            chunk_size: None for one monolithic PUT; otherwise PATCH chunks of this many bytes,
                then a closing PUT.
        """
        _check_repo(repository)
        digest = digest_of(data)
        if self.blob_exists(repository, digest):
            return digest
        what = f"upload blob {digest} to {repository}"
        response = self._request(
            "POST", self._url(f"/v2/{repository}/blobs/uploads/"), ok=(202,), what=what
        )
        location = self._location(response, what)
        if chunk_size is not None:
            if chunk_size <= 0:
                raise ValueError("chunk_size must be positive")
            offset = 0
            while offset < len(data):
                chunk = data[offset : offset + chunk_size]
                end = offset + len(chunk) - 1
                response = self._request(
                    "PATCH",
                    location,
                    ok=(202,),
                    what=what,
                    content=chunk,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{end}",
                    },
                )
                received = response.headers.get("range", "")
                if received != f"0-{end}":
                    raise TransientError(
                        f"registry {self.registry} acknowledged bytes {received!r} of an upload "
                        f"after {end + 1} were sent; the upload must start over"
                    )
                location = self._location(response, what)
                offset += len(chunk)
            body = b""
        else:
            body = data
        # The Location carries the registry's own upload state (e.g. _state=...) in its query:
        # merge the digest in rather than replacing the query.
        final = httpx.URL(location).copy_merge_params({"digest": digest})
        response = self._request(
            "PUT",
            str(final),
            ok=(201,),
            what=what,
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        announced = response.headers.get("docker-content-digest")
        if announced is not None and announced != digest:
            raise VerificationFailed(
                "registry-content", digest, f"registry {self.registry} stored it as {announced}"
            )
        return digest

    def _location(self, response: httpx.Response, what: str) -> str:
        location = response.headers.get("location")
        if not location:
            raise RegistryRejected(f"registry {self.registry} gave no upload location to {what}")
        return str(response.request.url.join(location))

    def get_blob(self, repository: str, digest: str) -> bytes:
        """Fetch a blob and verify that its bytes hash to ``digest``."""
        _check_repo(repository)
        _check_digest(digest)
        response = self._request(
            "GET",
            self._url(f"/v2/{repository}/blobs/{digest}"),
            ok=(200,),
            what=f"fetch blob {digest} from {repository}",
        )
        data = response.content
        actual = digest_of(data)
        if actual != digest:
            raise VerificationFailed(
                "registry-content",
                digest,
                f"registry {self.registry} served blob bytes that hash to {actual}: "
                "the registry or its storage is corrupt or lying",
            )
        return data

    def list_tags(self, repository: str) -> list[str]:
        """All tags of ``repository`` (following pagination); empty if it does not exist."""
        _check_repo(repository)
        tags: list[str] = []
        url: str | None = self._url(f"/v2/{repository}/tags/list?n=1000")
        while url is not None:
            response = self._request(
                "GET", url, ok=(200,), missing_ok=True, what=f"list tags of {repository}"
            )
            if response.status_code == 404:
                return []
            try:
                page = response.json().get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryRejected(
                    f"registry {self.registry} sent a malformed tag list"
                ) from None
            tags.extend(t for t in page if isinstance(t, str))
            next_link = response.links.get("next", {}).get("url")
            url = str(response.request.url.join(next_link)) if next_link else None
        return tags

    # -- artifacts and referrers ------------------------------------------------------------

    def push_blob_descriptor(
        self,
        repository: str,
        data: bytes,
        media_type: str,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Upload ``data`` and return the descriptor a manifest uses to point at it."""
        digest = self.upload_blob(repository, data)
        return Descriptor(media_type, digest, len(data), dict(annotations or {}))

    def attach_artifact(
        self,
        repository: str,
        subject: Descriptor,
        *,
        artifact_type: str,
        layers: Sequence[Descriptor],
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Push an artifact manifest that refers to ``subject`` and make it discoverable.

        The layers' blobs must already be uploaded (see :meth:`push_blob_descriptor`). When the
        registry does not answer with ``OCI-Subject`` (it has no referrers API, like
        distribution 2.8), the referrers fallback index under tag ``sha256-<hex>`` is updated.

        Returns:
            A descriptor of the pushed artifact manifest.
        """
        config = self.push_blob_descriptor(repository, EMPTY_JSON, MEDIA_OCI_EMPTY)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
            "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        raw = canonical_json(manifest)
        digest, headers = self._put_manifest(repository, digest_of(raw), raw, MEDIA_OCI_MANIFEST)
        pushed = Descriptor(
            MEDIA_OCI_MANIFEST, digest, len(raw), dict(annotations or {}), artifact_type
        )
        if "oci-subject" not in headers:
            self._add_to_referrers_index(repository, subject.digest, pushed)
        return pushed

    def _add_to_referrers_index(self, repository: str, subject: str, entry: Descriptor) -> None:
        tag = referrers_tag(subject)

        def write() -> None:
            entries = self._fallback_referrers(repository, subject)
            if any(e.digest == entry.digest for e in entries):
                return
            index = {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_INDEX,
                "manifests": [e.to_json() for e in [*entries, entry]],
            }
            self._put_manifest(repository, tag, canonical_json(index), MEDIA_OCI_INDEX)

        def present() -> bool:
            return any(e.digest == entry.digest for e in self._fallback_referrers(repository, subject))

        self.converge_tag(repository, tag, write, present)

    def converge_tag(
        self,
        repository: str,
        tag: str,
        write: Callable[[], None],
        present: Callable[[], bool],
        *,
        attempts: int = 8,
    ) -> None:
        """Read-modify-write of one tag that survives concurrent writers.

        The registry has no conditional PUT, so two writers appending to the same tag (the
        parallel SBOM, scan and provenance attestations of one digest) can each overwrite the
        other's entry. Writers in this process are serialised by a lock per tag; writers in
        other processes are caught by reading back after a short random pause and writing
        again until our entry is there.
        """
        with _tag_lock(self.registry, repository, tag):
            for _ in range(attempts):
                write()
                time.sleep(0.02 + random.random() * 0.08)
                if present():
                    return
        raise TransientError(
            f"could not update tag {tag} in {repository}: other writers kept replacing it"
        )

    def _fallback_referrers(self, repository: str, subject: str) -> list[Descriptor]:
        try:
            index = self.get_manifest(repository, referrers_tag(subject))
        except NotFoundInRegistry:
            return []
        if index.media_type != MEDIA_OCI_INDEX:
            raise RegistryRejected(
                f"tag {referrers_tag(subject)} in {repository} is a {index.media_type}, "
                "not a referrers index; something else uses the fallback tag"
            )
        return _index_entries(index)

    def list_referrers(
        self, repository: str, digest: str, *, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of the artifacts that name ``digest`` as their subject.

        Uses the referrers API when the registry has it, else the ``sha256-<hex>`` fallback
        tag. The entries are unsigned pointers: verify a referrer's own content (and that its
        ``subject`` is ``digest``) after fetching it, before trusting it.
        """
        _check_repo(repository)
        _check_digest(digest)
        response = self._request(
            "GET",
            self._url(f"/v2/{repository}/referrers/{digest}"),
            ok=(200,),
            missing_ok=True,
            what=f"list referrers of {repository}@{digest}",
            headers={"Accept": MEDIA_OCI_INDEX},
        )
        is_index = response.headers.get("content-type", "").startswith(MEDIA_OCI_INDEX)
        if response.status_code == 200 and is_index:
            raw = response.content
            entries = _index_entries(Manifest(MEDIA_OCI_INDEX, digest_of(raw), raw))
        else:
            # A registry with the API answers 200 with an (empty) index for any digest, so a
            # 404 means it lacks the API.
            entries = self._fallback_referrers(repository, digest)
        if artifact_type is not None:
            entries = [e for e in entries if e.artifact_type == artifact_type]
        return entries


def _index_entries(index: Manifest) -> list[Descriptor]:
    manifests = index.json().get("manifests") or []
    if not isinstance(manifests, list):
        raise RegistryRejected(f"index {index.digest} has a malformed 'manifests' list")
    return [Descriptor.from_json(m) for m in manifests]


def _error_summary(response: httpx.Response) -> str:
    """The registry's error codes and messages, shortened for an error message."""
    try:
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        parts = []
    return f" ({'; '.join(parts)[:500]})" if parts else ""
