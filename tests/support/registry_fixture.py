"""A real ``docker-registry`` for tests, and a way to push tiny images without Docker.

Import the fixtures into a test module (they register under their ``name=``)::

    from tests.support.registry_fixture import oci_registry_fixture  # noqa: F401

``oci_registry`` is one registry per test session (with accounts), in a temporary directory,
stopped at the end. Every test gets its own repository (``repo`` fixture) so tests stay
independent while sharing the process.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.registry import RunningRegistry, start_registry, stop_registry
from portcullis.canonical import canonical_json
from portcullis.models import ImageRef
from portcullis.oci import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_MANIFEST,
    RegistryClient,
)

PUSHER = "builder"
PUSHER_PASSWORD = "builder-test-password"
_counter = itertools.count()


@pytest.fixture(scope="session", name="oci_registry")
def oci_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A docker-registry on a free loopback port with one push account."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install -y docker-registry)")
    state = tmp_path_factory.mktemp("registry")
    reg = start_registry(state, users={PUSHER: PUSHER_PASSWORD})
    try:
        yield reg
    finally:
        stop_registry(state)


@pytest.fixture(name="registry_client")
def registry_client_fixture(oci_registry: RunningRegistry) -> Iterator[RegistryClient]:
    """A client logged in as the push account."""
    with RegistryClient(oci_registry.address, username=PUSHER, password=PUSHER_PASSWORD) as client:
        yield client


@pytest.fixture(name="repo")
def repo_fixture(request: pytest.FixtureRequest) -> str:
    """A repository name no other test uses."""
    words = re.findall(r"[a-z0-9]+", request.node.name.lower())
    return f"test/{'-'.join(words)[:60].strip('-')}-{next(_counter)}"


def push_tiny_image(
    client: RegistryClient, repository: str, tag: str, content: bytes = b"hello"
) -> ImageRef:
    """Push a one-layer OCI image (config + layer + manifest) and return it pinned by digest.

    The layer is not a real tar: registries store blobs without looking inside, and nothing
    here runs the image. Different ``content`` gives a different digest.
    """
    layer = client.push_blob_descriptor(repository, content, MEDIA_OCI_LAYER)
    config = client.push_blob_descriptor(
        repository,
        canonical_json(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
                "config": {},
            }
        ),
        MEDIA_OCI_CONFIG,
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    digest = client.put_manifest(repository, tag, canonical_json(manifest), MEDIA_OCI_MANIFEST)
    return ImageRef(registry=client.registry, repository=repository, digest=digest)


def blob_path(registry: RunningRegistry, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob (manifests are blobs too)."""
    hex_digest = digest.split(":", 1)[1]
    return (
        registry.state_dir
        / "data/docker/registry/v2/blobs/sha256"
        / hex_digest[:2]
        / hex_digest
        / "data"
    )


def copy_manifest(client: RegistryClient, repository: str, source_tag: str, target_tag: str) -> str:
    """Put the exact manifest bytes of ``source_tag`` under ``target_tag`` (what an attacker
    with push rights can do to move a signature or attestation onto another digest)."""
    manifest = client.get_manifest(repository, source_tag)
    return client.put_manifest(repository, target_tag, manifest.raw, manifest.media_type)
