"""The base image every example app builds on.

No image can be pulled on an offline machine, so the stack makes its own: ``FROM scratch`` with
Debian's statically linked busybox, which gives a shell, ``httpd`` (with CGI) and ``wget`` for
health checks.

It is made reproducibly (fixed mtimes, normalised with :mod:`portcullis.reproducible`, then
loaded into the engine): its image id depends only on its content, so remaking it on another
worker gives the same id, and the apps built on it the same digests. A changed busybox or
applet list gives a new id, which the app images record as their base.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

import docker
import docker.errors
from docker.errors import ImageNotFound

from portcullis.errors import PortcullisError
from portcullis.reproducible import docker_archive, normalise_archive
from portcullis.toolrun import run_tool

BASE_IMAGE = "portcullis/busybox:base"
_APPLETS = ("sh", "httpd", "wget", "cat", "echo", "sleep", "usleep", "date", "env", "ls", "mkdir", "nc")
# Recorded on the image so a changed applet list rebuilds it instead of reusing a stale one.
_CONTENT_LABEL = "dev.portcullis.base-applets"
# Every file of the base carries this mtime, and its history this time: a fixed instant, so
# the base's id is a function of its content alone.
_EPOCH = 1_700_000_000

_DOCKERFILE = b"""FROM scratch
COPY rootfs/ /
ENTRYPOINT []
CMD ["/bin/sh"]
"""


def _busybox_path() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists():
            out = run_tool(["file", "-b", str(path)], timeout=10, check=False).stdout.decode()
            if "statically linked" in out or not shutil.which("file"):
                return path
    raise PortcullisError(
        "a statically linked busybox is needed to make the base image",
        hint="apt-get install -y busybox-static",
    )


def _context(busybox: Path, extra_files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()

    def add(name: str, data: bytes | None = None, *, mode: int = 0o644,
            kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, _EPOCH, link
        info.size = len(data) if data is not None else 0
        tar.addfile(info, io.BytesIO(data) if data is not None else None)

    with tarfile.open(fileobj=buf, mode="w") as tar:
        add("Dockerfile", _DOCKERFILE)
        for d in ("rootfs", "rootfs/bin", "rootfs/tmp", "rootfs/www", "rootfs/etc"):
            add(d, mode=0o1777 if d.endswith("tmp") else 0o755, kind=tarfile.DIRTYPE)
        add("rootfs/bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in _APPLETS:
            add(f"rootfs/bin/{applet}", mode=0o777, kind=tarfile.SYMTYPE, link="busybox")
        add("rootfs/etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        for name, data in sorted(extra_files.items()):
            add(f"rootfs/{name.lstrip('/')}", data)
    return buf.getvalue()


def _content_key(extra_files: Mapping[str, bytes]) -> str:
    key = ",".join(_APPLETS) + ";reproducible-v1"
    if extra_files:
        files = hashlib.sha256(repr(sorted(extra_files.items())).encode()).hexdigest()[:16]
        key += f";files={files}"
    return key


def ensure_base_image(
    client: docker.DockerClient, *, tag: str = BASE_IMAGE, extra_files: Mapping[str, bytes] | None = None,
) -> str:
    """Make the base image in the engine if it is not there yet; return its image id.

    Args:
        client: the build engine.
        tag: the name apps build ``FROM``.
        extra_files: more files for the root file system (path -> content), e.g. a patched
            configuration; they change the image id.
    """
    extra = dict(extra_files or {})
    key = _content_key(extra)
    try:
        existing = client.images.get(tag)
        if existing.labels.get(_CONTENT_LABEL) == key:
            return str(existing.id)
    except ImageNotFound:
        pass
    built, _ = client.images.build(
        fileobj=io.BytesIO(_context(_busybox_path(), extra)), custom_context=True,
        rm=True, forcerm=True, labels={"org.opencontainers.image.title": "portcullis busybox base",
                                       _CONTENT_LABEL: key},
    )
    image = normalise_archive(b"".join(built.save(named=False)), _EPOCH)
    client.images.load(docker_archive(image, tag))
    if built.id != image.config_digest:
        try:
            client.images.remove(str(built.id))
        except docker.errors.APIError:
            pass  # only an untagged leftover of the builder; the loaded image is the base
    return image.config_digest
