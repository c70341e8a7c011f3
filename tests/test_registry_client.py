"""portcullis.oci and infra.registry against a real docker-registry (distribution 2.8)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from infra.registry import (
    RunningRegistry,
    free_port,
    registry_running,
    start_registry,
    stop_registry,
)
from portcullis.canonical import canonical_json
from portcullis.errors import PolicyRefusal, TransientError, VerificationFailed, is_retryable
from portcullis.oci import (
    MEDIA_OCI_MANIFEST,
    NotFoundInRegistry,
    RegistryAuthError,
    RegistryClient,
    digest_of,
    referrers_tag,
)
from tests.support.http import serving
from tests.support.registry_fixture import (  # noqa: F401 - fixtures register by name
    PUSHER,
    PUSHER_PASSWORD,
    blob_path,
    oci_registry_fixture,
    push_tiny_image,
    registry_client_fixture,
    repo_fixture,
)

pytestmark = pytest.mark.docker


class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, remembering each request's method and URL, and the status
    each method was answered with (a token registry answers some requests 401 first)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, httpx.URL]] = []
        self.answered: list[tuple[str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url))
        response = super().handle_request(request)
        self.answered.append((request.method, response.status_code))
        return response


def test_push_and_fetch_a_tiny_image(registry_client: RegistryClient, repo: str) -> None:
    image = push_tiny_image(registry_client, repo, "v1", b"layer-bytes")

    head = registry_client.head_manifest(repo, "v1")
    manifest = registry_client.get_manifest(repo, image.digest)

    assert head is not None and head.digest == image.digest
    assert manifest.digest == image.digest == digest_of(manifest.raw)
    assert manifest.media_type == MEDIA_OCI_MANIFEST
    [layer] = manifest.layers()
    assert registry_client.get_blob(repo, layer.digest) == b"layer-bytes"
    assert registry_client.list_tags(repo) == ["v1"]
    assert registry_client.head_manifest(repo, "missing") is None
    with pytest.raises(NotFoundInRegistry, match="not found"):
        registry_client.get_manifest(repo, "missing")


def test_chunked_upload_keeps_the_registry_upload_state(
    oci_registry: RunningRegistry, repo: str
) -> None:
    transport = RecordingTransport()
    data = bytes(range(256)) * 1000  # 256000 bytes: three chunks, the last one short
    with RegistryClient(
        oci_registry.address, username=PUSHER, password=PUSHER_PASSWORD, transport=transport
    ) as client:
        digest = client.upload_blob(repo, data, chunk_size=100_000)
        fetched = client.get_blob(repo, digest)

    assert digest == digest_of(data)
    assert fetched == data
    patches = [url for method, url in transport.seen if method == "PATCH"]
    assert len(patches) == 3
    [final] = [url for method, url in transport.seen if method == "PUT"]
    # distribution 2.8 needs its own _state parameter next to the digest on the closing PUT.
    assert final.params.get("digest") == digest
    assert final.params.get("_state")


def test_upload_skips_a_blob_the_repository_already_has(
    oci_registry: RunningRegistry, repo: str
) -> None:
    transport = RecordingTransport()
    with RegistryClient(
        oci_registry.address, username=PUSHER, password=PUSHER_PASSWORD, transport=transport
    ) as client:
        first = client.upload_blob(repo, b"same bytes")
        uploads_before = sum(1 for m, status in transport.answered if (m, status) == ("POST", 202))
        posts_before = sum(1 for m, _ in transport.seen if m == "POST")
        second = client.upload_blob(repo, b"same bytes")

    assert first == second
    # Exactly one upload was started (the registry may first answer 401 to ask for a token
    # with push scope), and the second call sent no POST at all.
    assert uploads_before == 1
    assert sum(1 for m, _ in transport.seen if m == "POST") == posts_before


def test_wrong_password_is_refused_with_a_clear_message(
    oci_registry: RunningRegistry, repo: str
) -> None:
    client = RegistryClient(oci_registry.address, username=PUSHER, password="not-it")
    with client, pytest.raises(RegistryAuthError) as refused:
        client.list_tags(repo)

    message = str(refused.value)
    assert f"registry refused credentials for {PUSHER} at {oci_registry.address}" in message
    assert "not-it" not in message
    assert isinstance(refused.value, PolicyRefusal) and not is_retryable(refused.value)


def test_anonymous_access_is_refused(oci_registry: RunningRegistry, repo: str) -> None:
    client = RegistryClient(oci_registry.address)
    with client, pytest.raises(RegistryAuthError, match="anonymous access"):
        client.get_manifest(repo, "v1")


def test_unreachable_registry_is_transient() -> None:
    client = RegistryClient(f"127.0.0.1:{free_port()}", timeout=2.0)
    with client, pytest.raises(TransientError, match="unreachable") as failed:
        client.ping()
    assert is_retryable(failed.value)


def test_registry_serving_other_manifest_bytes_is_caught(
    oci_registry: RunningRegistry, registry_client: RegistryClient, repo: str
) -> None:
    image = push_tiny_image(registry_client, repo, "v1", b"genuine")
    stored = blob_path(oci_registry, image.digest)
    original = stored.read_bytes()
    layer_digest = registry_client.get_manifest(repo, image.digest).layers()[0].digest
    # Same length, still valid JSON, another layer digest: what a compromised storage serves.
    flipped = "0" if layer_digest[-1] != "0" else "1"
    stored.write_bytes(
        original.replace(layer_digest.encode(), (layer_digest[:-1] + flipped).encode())
    )

    with pytest.raises(VerificationFailed, match="hash to") as by_digest:
        registry_client.get_manifest(repo, image.digest)
    with pytest.raises(VerificationFailed, match="hash to"):
        registry_client.get_manifest(repo, "v1")

    assert by_digest.value.check == "registry-content"
    assert by_digest.value.digest == image.digest


def test_registry_serving_other_blob_bytes_is_caught(
    oci_registry: RunningRegistry, registry_client: RegistryClient, repo: str
) -> None:
    image = push_tiny_image(registry_client, repo, "v1", b"genuine-layer")
    layer_digest = registry_client.get_manifest(repo, image.digest).layers()[0].digest
    blob_path(oci_registry, layer_digest).write_bytes(b"tampered-laye")  # same length

    with pytest.raises(VerificationFailed, match="corrupt or lying"):
        registry_client.get_blob(repo, layer_digest)


def test_a_manifest_is_never_pushed_under_a_digest_it_does_not_have(
    registry_client: RegistryClient, repo: str
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    other = canonical_json({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST})

    with pytest.raises(PolicyRefusal, match="hash to"):
        registry_client.put_manifest(repo, image.digest, other, MEDIA_OCI_MANIFEST)


def test_referrers_fall_back_to_the_digest_tag(registry_client: RegistryClient, repo: str) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    subject = registry_client.get_manifest(repo, image.digest).descriptor()
    sbom = registry_client.push_blob_descriptor(
        repo, b'{"spdxVersion":"SPDX-2.3"}', "application/spdx+json"
    )
    report = registry_client.push_blob_descriptor(repo, b'{"Results":[]}', "application/json")

    first = registry_client.attach_artifact(
        repo, subject, artifact_type="application/spdx+json", layers=[sbom]
    )
    second = registry_client.attach_artifact(
        repo,
        subject,
        artifact_type="application/vnd.portcullis.scan+json",
        layers=[report],
        annotations={"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    )
    again = registry_client.attach_artifact(
        repo, subject, artifact_type="application/spdx+json", layers=[sbom]
    )

    everything = registry_client.list_referrers(repo, image.digest)
    sboms = registry_client.list_referrers(
        repo, image.digest, artifact_type="application/spdx+json"
    )
    assert again.digest == first.digest
    assert [r.digest for r in everything] == [first.digest, second.digest]
    assert [r.digest for r in sboms] == [first.digest]
    assert everything[1].annotations == {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}
    assert referrers_tag(image.digest) in registry_client.list_tags(repo)
    pushed = registry_client.get_manifest(repo, first.digest).json()
    assert pushed["subject"]["digest"] == image.digest
    assert pushed["artifactType"] == "application/spdx+json"
    assert registry_client.list_referrers(repo, digest_of(b"nothing refers to this")) == []


class _TokenRegistryHandler(BaseHTTPRequestHandler):
    """A loopback stand-in for a token-authenticated registry's challenge and token service.

    distribution can only check tokens signed by a token service with an X.509 chain; this
    stand-in exercises the client's side of the exchange (challenge -> token -> retry).
    """

    issued: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict[str, object], headers: dict[str, str]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        host = self.headers.get("Host", "")
        auth = self.headers.get("Authorization", "")
        if self.path.startswith("/token?"):
            query = httpx.URL(self.path).params
            good = "Basic " + base64.b64encode(b"robot:s3cret").decode()
            if auth != good:
                self._send(401, {"details": "bad credentials"}, {})
                return
            token = f"token-for-{query['scope']}"
            type(self).issued.append(token)
            self._send(200, {"token": token}, {})
            return
        scope = "repository:team/app:pull"
        if auth == f"Bearer token-for-{scope}":
            self._send(200, {"name": "team/app", "tags": ["v1"]}, {})
            return
        challenge = f'Bearer realm="http://{host}/token",service="stand-in",scope="{scope}"'
        self._send(401, {"errors": [{"code": "UNAUTHORIZED"}]}, {"WWW-Authenticate": challenge})


@pytest.fixture(name="token_registry")
def token_registry_fixture() -> Iterator[str]:
    _TokenRegistryHandler.issued = []
    with serving(_TokenRegistryHandler) as port:
        yield f"127.0.0.1:{port}"


def test_bearer_challenge_gets_a_token_and_reuses_it(token_registry: str) -> None:
    with RegistryClient(token_registry, username="robot", password="s3cret") as client:
        first = client.list_tags("team/app")
        second = client.list_tags("team/app")

    assert first == second == ["v1"]
    assert _TokenRegistryHandler.issued == ["token-for-repository:team/app:pull"]


def test_bearer_token_service_refusing_credentials_is_a_clear_refusal(token_registry: str) -> None:
    client = RegistryClient(token_registry, username="robot", password="wrong")
    with (
        client,
        pytest.raises(RegistryAuthError, match=f"credentials for robot at {token_registry}"),
    ):
        client.list_tags("team/app")


def test_start_registry_is_idempotent_and_restarts_on_new_accounts(tmp_path: Path) -> None:
    first = start_registry(tmp_path / "reg", users={"alice": "one"})
    try:
        again = start_registry(tmp_path / "reg", users={"alice": "one"})
        changed = start_registry(tmp_path / "reg", users={"alice": "two"})
        with RegistryClient(changed.address, username="alice", password="two") as client:
            client.ping()
        old = RegistryClient(changed.address, username="alice", password="one")
        with old, pytest.raises(RegistryAuthError):
            old.ping()
    finally:
        stopped = stop_registry(tmp_path / "reg")

    assert again.pid == first.pid and again.url == first.url
    assert changed.pid != first.pid and changed.port == first.port
    assert changed.credentials is not None and changed.credentials.username == "alice"
    assert "two" not in repr(changed)
    assert changed.auth_pid != first.auth_pid  # the token service reads accounts at start
    # The token service's accounts (bcrypt hashes) and its signing key: owner-only.
    assert (tmp_path / "reg" / "registry-auth.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "reg" / "token-signing.key").stat().st_mode & 0o777 == 0o600
    assert stopped and not registry_running(tmp_path / "reg")
    assert not stop_registry(tmp_path / "reg")


def test_anonymous_client_asks_the_token_service_without_credentials(token_registry: str) -> None:
    client = RegistryClient(token_registry)
    with client, pytest.raises(RegistryAuthError, match="anonymous access"):
        client.list_tags("team/app")
    assert _TokenRegistryHandler.issued == []
