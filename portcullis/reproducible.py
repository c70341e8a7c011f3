"""Reproducible images: the same commit, base and recipe give the same digest on any worker.

The classic builder writes wall-clock time into what it produces: ``created`` in the image
config and in every history entry, the mtime of every directory and file a step creates, the
id of the build container (``container``, ``container_config``, ``config.Image``) and the
engine's version. Two builds of one commit therefore differ byte for byte. This module takes
the image the builder produced (a ``docker save`` archive) and rewrites it deterministically:

* every layer tar: entries sorted by name (hard links after the files they point at), mtimes
  clamped to ``SOURCE_DATE_EPOCH``, no atime/ctime/mtime PAX records, ownership and modes as
  built, uncompressed (a compressor's output is only as stable as its version);
* the config: ``created`` and every history ``created`` set to ``SOURCE_DATE_EPOCH``, the
  builder's per-run fields dropped, ``rootfs.diff_ids`` recomputed.

The result is an OCI manifest, config and layer blobs, ready to push by digest. Everything
here is a pure function of bytes; nothing talks to an engine or a registry.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from portcullis.canonical import canonical_json
from portcullis.errors import PolicyRefusal
from portcullis.oci import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_LAYER,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    digest_of,
)

#: PAX records that carry time; they would make a layer depend on when a file was touched.
_TIME_PAX = frozenset({"atime", "ctime", "mtime", "LIBARCHIVE.creationtime"})
#: Config fields the classic builder fills per run (container ids, engine version).
_BUILDER_FIELDS = ("container", "container_config", "docker_version", "parent", "id")
#: Fields of ``config`` that name the build container or the previous step's image id.
_RUN_CONFIG_FIELDS = ("Hostname", "Image")


def epoch_timestamp(epoch: int) -> str:
    """``SOURCE_DATE_EPOCH`` as the RFC 3339 UTC text used in image configs."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decompressed(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def normalise_tar(data: bytes, epoch: int) -> bytes:
    """Rewrite a tar stream deterministically (see the module docstring).

    Args:
        data: a tar stream (gzip-compressed or not).
        epoch: ``SOURCE_DATE_EPOCH``; later mtimes are clamped to it, earlier ones kept.

    Returns:
        An uncompressed tar whose bytes depend only on the entries' names, content, modes,
        ownership, link targets and clamped mtimes.
    """
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(fileobj=io.BytesIO(_decompressed(data)), mode="r:") as src:
        for info in src:
            content = None
            if info.isreg():
                extracted = src.extractfile(info)
                content = extracted.read() if extracted is not None else b""
            members.append((info, content))
    # A hard link must follow its target; putting all links after the rest (each group
    # sorted) keeps the order a function of the names alone.
    members.sort(key=lambda m: (m[0].islnk(), m[0].name))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for info, content in members:
            clean = copy.copy(info)
            clean.mtime = min(int(info.mtime), epoch)
            clean.pax_headers = {k: v for k, v in info.pax_headers.items() if k not in _TIME_PAX}
            dst.addfile(clean, io.BytesIO(content) if content is not None else None)
    return out.getvalue()


def normalise_config(config: Mapping[str, Any], diff_ids: Sequence[str], epoch: int) -> dict[str, Any]:
    """The image config with build-time facts replaced by ``epoch`` and the new layers.

    Args:
        config: the config the builder wrote.
        diff_ids: digests of the normalised (uncompressed) layers, in order.
        epoch: ``SOURCE_DATE_EPOCH``.

    Raises:
        PolicyRefusal: the config's layer list does not match ``diff_ids``.
    """
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in _BUILDER_FIELDS}
    created = epoch_timestamp(epoch)
    out["created"] = created
    run_config = dict(out.get("config") or {})
    for name in _RUN_CONFIG_FIELDS:
        run_config.pop(name, None)
    out["config"] = run_config
    out["history"] = [{**entry, "created": created} for entry in out.get("history") or []]
    rootfs = dict(out.get("rootfs") or {})
    if len(rootfs.get("diff_ids") or []) != len(diff_ids):
        raise PolicyRefusal(
            f"the built image config lists {len(rootfs.get('diff_ids') or [])} layers but the "
            f"archive holds {len(diff_ids)}; refusing to publish an inconsistent image"
        )
    rootfs["diff_ids"] = list(diff_ids)
    out["rootfs"] = rootfs
    return out


@dataclass(frozen=True)
class OciImage:
    """A normalised image: its manifest, config and layers as bytes, with their digests."""

    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def digest(self) -> str:
        """The manifest digest: what the image is pinned by."""
        return digest_of(self.manifest)

    @property
    def config_digest(self) -> str:
        """The config digest: the image id a Docker engine shows for it."""
        return digest_of(self.config)

    def labels(self) -> dict[str, str]:
        """The image's labels (``config.Labels``)."""
        labels = json.loads(self.config).get("config", {}).get("Labels") or {}
        return {str(k): str(v) for k, v in labels.items()}


def oci_image(config: Mapping[str, Any], layers: Sequence[bytes]) -> OciImage:
    """Assemble an OCI image manifest around ``config`` and uncompressed ``layers``."""
    config_raw = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": Descriptor(MEDIA_OCI_CONFIG, digest_of(config_raw), len(config_raw)).to_json(),
        "layers": [Descriptor(MEDIA_OCI_LAYER, digest_of(layer), len(layer)).to_json()
                   for layer in layers],
    }
    return OciImage(canonical_json(manifest), config_raw, tuple(layers))


def read_docker_archive(archive: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The config and the layer tars of the single image in a ``docker save`` archive.

    Both layouts are read: the legacy one (``<id>.json``, ``<layer>/layer.tar``) and the OCI
    layout newer engines write (``blobs/sha256/...``); ``manifest.json`` names the files in each.

    Raises:
        PolicyRefusal: the archive does not hold exactly one image.
    """
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            if member is None:
                raise PolicyRefusal(f"the image archive has no file {name!r}")
            return member.read()

        manifest = json.loads(read("manifest.json"))
        if not isinstance(manifest, list) or len(manifest) != 1:
            raise PolicyRefusal("the image archive does not hold exactly one image")
        config = json.loads(read(manifest[0]["Config"]))
        layers = [read(path) for path in manifest[0]["Layers"]]
    return config, layers


def normalise_archive(archive: bytes, epoch: int) -> OciImage:
    """A ``docker save`` archive of one image, rewritten reproducibly for ``epoch``."""
    config, layers = read_docker_archive(archive)
    clean_layers = [normalise_tar(layer, epoch) for layer in layers]
    clean_config = normalise_config(config, [digest_of(layer) for layer in clean_layers], epoch)
    return oci_image(clean_config, clean_layers)


def docker_archive(image: OciImage, tag: str) -> bytes:
    """``image`` as a legacy ``docker save`` archive tagged ``tag``, for ``docker load``.

    The engine's image id is then the config digest, so a base image loaded this way is
    identified by content, not by when it was made.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        config_name = image.config_digest.removeprefix("sha256:") + ".json"
        layer_names = [f"{digest_of(layer).removeprefix('sha256:')}/layer.tar" for layer in image.layers]
        add(config_name, image.config)
        for name, layer in zip(layer_names, image.layers, strict=True):
            add(name, layer)
        manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
        add("manifest.json", json.dumps(manifest).encode())
    return out.getvalue()
