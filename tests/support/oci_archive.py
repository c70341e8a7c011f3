"""Build small container image archives in Python, for tests that need a real image file.

No Docker engine is needed: the archive is written byte for byte as an OCI image layout
tarball (``oci-layout``, ``index.json``, ``blobs/sha256/...``) or as a ``docker save``
tarball (``manifest.json`` plus the same blobs). The content is deterministic, so the same
files always give the same manifest digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import assert_never

_EPOCH = 1_700_000_000  # a fixed mtime so archives are reproducible


class ArchiveLayout(Enum):
    """Which tarball layout to write."""

    OCI = "oci"
    DOCKER_SAVE = "docker-save"


@dataclass(frozen=True)
class ImageArchive:
    """A written image archive and the digests that identify what is in it."""

    path: Path
    manifest_digest: str
    config_digest: str


def alpine_files(alpine_release: str, packages: Iterable[tuple[str, str]]) -> dict[str, bytes]:
    """Files that make trivy see an Alpine rootfs with the given apk packages installed.

    Args:
        alpine_release: content of ``etc/alpine-release``, e.g. ``3.19.1``.
        packages: (name, apk version) pairs; each package is its own source package.

    Returns:
        Paths inside the image mapped to file content.
    """
    records = "".join(
        f"P:{name}\nV:{version}\nA:x86_64\no:{name}\nL:\n\n" for name, version in packages
    )
    return {
        "etc/alpine-release": f"{alpine_release}\n".encode(),
        "lib/apk/db/installed": records.encode(),
    }


def python_dist_files(
    name: str, version: str, *, site_packages: str = "usr/lib/python3.11/site-packages"
) -> dict[str, bytes]:
    """Files that make trivy see one installed Python distribution (a ``.dist-info``)."""
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    return {f"{site_packages}/{name}-{version}.dist-info/METADATA": metadata.encode()}


def npm_package_files(name: str, version: str, *, root: str = "app") -> dict[str, bytes]:
    """Files that make trivy see one installed npm package under ``root/node_modules``."""
    manifest = json.dumps({"name": name, "version": version}).encode()
    return {f"{root}/node_modules/{name}/package.json": manifest}


def _layer_tar(files: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = _EPOCH
                    tar.addfile(info)
            info = tarfile.TarInfo(path.strip("/"))
            info.size = len(files[path])
            info.mode = 0o644
            info.mtime = _EPOCH
            tar.addfile(info, io.BytesIO(files[path]))
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def write_image_archive(
    path: Path,
    files: Mapping[str, bytes],
    *,
    layout: ArchiveLayout = ArchiveLayout.OCI,
    tag: str = "portcullis/test:latest",
) -> ImageArchive:
    """Write a single-layer linux/amd64 image holding ``files`` as an archive tarball.

    Args:
        path: where to write the ``.tar``.
        files: paths inside the image (relative, ``/`` separated) mapped to content.
        layout: OCI image layout or ``docker save`` layout.
        tag: the tag recorded in the archive (``repo:tag``).

    Returns:
        The archive's path and the digests of its manifest and config.
    """
    layer = _layer_tar(files)
    layer_digest = _digest(layer)
    config = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "tests/support/oci_archive.py"}],
        }
    )
    config_digest = _digest(config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    )
    manifest_digest = _digest(manifest)
    blobs = {
        f"blobs/sha256/{d.removeprefix('sha256:')}": data
        for d, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest))
    }
    entries: dict[str, bytes] = dict(blobs)
    match layout:
        case ArchiveLayout.OCI:
            entries["oci-layout"] = _canonical({"imageLayoutVersion": "1.0.0"})
            entries["index.json"] = _canonical(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": manifest_digest,
                            "size": len(manifest),
                            "annotations": {"org.opencontainers.image.ref.name": tag},
                        }
                    ],
                }
            )
        case ArchiveLayout.DOCKER_SAVE:
            entries["manifest.json"] = _canonical(
                [
                    {
                        "Config": f"blobs/sha256/{config_digest.removeprefix('sha256:')}",
                        "RepoTags": [tag],
                        "Layers": [f"blobs/sha256/{layer_digest.removeprefix('sha256:')}"],
                    }
                ]
            )
        case _:
            assert_never(layout)
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(entries[name])
            info.mode = 0o644
            info.mtime = _EPOCH
            tar.addfile(info, io.BytesIO(entries[name]))
    return ImageArchive(path=path, manifest_digest=manifest_digest, config_digest=config_digest)
