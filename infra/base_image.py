"""The base image every example app builds on.

No image can be pulled on an offline machine, so the stack makes its own: ``FROM scratch`` with
Debian's statically linked busybox, which gives a shell, ``httpd`` (with CGI) and ``wget`` for
health checks.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from portcullis.errors import PortcullisError
from portcullis.toolrun import run_tool

BASE_IMAGE = "portcullis/busybox:base"
_APPLETS = ("sh", "httpd", "wget", "cat", "echo", "sleep", "usleep", "date", "env", "ls", "mkdir", "nc")
# Recorded on the image so a changed applet list rebuilds it instead of reusing a stale one.
_CONTENT_LABEL = "dev.portcullis.base-applets"

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


def _context(busybox: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(_DOCKERFILE)
        tar.addfile(info, io.BytesIO(_DOCKERFILE))
        for d in ("rootfs", "rootfs/bin", "rootfs/tmp", "rootfs/www", "rootfs/etc"):
            dinfo = tarfile.TarInfo(d)
            dinfo.type = tarfile.DIRTYPE
            dinfo.mode = 0o1777 if d.endswith("tmp") else 0o755
            tar.addfile(dinfo)
        tar.add(str(busybox), arcname="rootfs/bin/busybox")
        for applet in _APPLETS:
            link = tarfile.TarInfo(f"rootfs/bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        pinfo = tarfile.TarInfo("rootfs/etc/passwd")
        pinfo.size = len(passwd)
        tar.addfile(pinfo, io.BytesIO(passwd))
    return buf.getvalue()


def ensure_base_image(client: docker.DockerClient) -> str:
    """Build :data:`BASE_IMAGE` in the engine if it is not there yet; return its image id."""
    try:
        existing = client.images.get(BASE_IMAGE)
        if existing.labels.get(_CONTENT_LABEL) == ",".join(_APPLETS):
            return str(existing.id)
    except ImageNotFound:
        pass
    image, _ = client.images.build(
        fileobj=io.BytesIO(_context(_busybox_path())), custom_context=True, tag=BASE_IMAGE,
        rm=True, forcerm=True, labels={"org.opencontainers.image.title": "portcullis busybox base",
                _CONTENT_LABEL: ",".join(_APPLETS)},
    )
    return str(image.id)
