"""A writer for trivy's offline vulnerability database.

trivy normally downloads its database; on a machine without internet (this project's CI, a
laptop on a plane, the local demo stack) nothing can be downloaded, so the tests and the demo
write a small database themselves. It lives in ``infra/``: the product only reads a database
(:mod:`portcullis.trivy`), it never makes one. Two files make a database that ``trivy --skip-db-update``
accepts, both under ``CACHE/db/``:

* ``trivy.db``: a BoltDB (bbolt) file in trivy-db's schema 2, written here in pure Python;
* ``metadata.json``: schema version and timestamps.

The BoltDB writer builds a complete, read-only-correct file in one pass: two meta pages with
FNV-1a checksums, an empty freelist page, and one B+tree per bucket (leaf pages split to fit
a page, branch pages above them when a bucket spans more than one leaf). It never edits an
existing file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Union, assert_never

from pydantic import Field, model_validator

from portcullis.models import Frozen
from portcullis.scan import Severity
from portcullis.trivy import SCHEMA_VERSION

PAGE_SIZE = 4096

# bbolt's on-disk constants (bbolt/internal/common): page flags, the meta magic and version,
# and the flag that marks a leaf element whose value is a sub-bucket header.
_BRANCH_PAGE = 0x01
_LEAF_PAGE = 0x02
_META_PAGE = 0x04
_FREELIST_PAGE = 0x10
_BUCKET_LEAF_FLAG = 0x01
_MAGIC = 0xED0CDAED
_BOLT_VERSION = 2
_PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
_LEAF_ELEMENT = struct.Struct("<IIII")  # flags, pos, ksize, vsize
_BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, ksize, child page id
_BUCKET_HEADER = struct.Struct("<QQ")  # root page id, sequence
# magic, version, page size, flags, root bucket (root, sequence), freelist, high water, txid
_META_FIELDS = struct.Struct("<IIIIQQQQQ")

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash, the checksum bbolt keeps on each meta page."""
    value = _FNV64_OFFSET
    for byte in data:
        value ^= byte
        value = (value * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


BoltTree = Mapping[bytes, Union[bytes, "BoltTree"]]
"""A bucket's content: a value is either bytes or a nested bucket."""


@dataclass
class _PageWriter:
    """Hands out page ids in order and keeps the bytes of every page written so far."""

    pages: dict[int, bytes] = field(default_factory=dict)
    next_id: int = 0

    def write(self, flags: int, count: int, body: bytes) -> int:
        """Write one node (possibly spanning overflow pages) and return its first page id."""
        page_id = self.next_id
        size = _PAGE_HEADER.size + len(body)
        npages = max(1, -(-size // PAGE_SIZE))
        header = _PAGE_HEADER.pack(page_id, flags, count, npages - 1)
        self.pages[page_id] = (header + body).ljust(npages * PAGE_SIZE, b"\0")
        self.next_id += npages
        return page_id


def _leaf_body(items: Sequence[tuple[int, bytes, bytes]]) -> bytes:
    """Elements first, then each key immediately followed by its value; pos is relative."""
    elements = bytearray()
    data = bytearray()
    table_size = len(items) * _LEAF_ELEMENT.size
    for index, (flags, key, value) in enumerate(items):
        pos = table_size + len(data) - index * _LEAF_ELEMENT.size
        elements += _LEAF_ELEMENT.pack(flags, pos, len(key), len(value))
        data += key + value
    return bytes(elements + data)


def _branch_body(children: Sequence[tuple[bytes, int]]) -> bytes:
    elements = bytearray()
    data = bytearray()
    table_size = len(children) * _BRANCH_ELEMENT.size
    for index, (key, child) in enumerate(children):
        pos = table_size + len(data) - index * _BRANCH_ELEMENT.size
        elements += _BRANCH_ELEMENT.pack(pos, len(key), child)
        data += key
    return bytes(elements + data)


def _chunks(sizes: Sequence[int]) -> list[range]:
    """Split elements into runs that fit one page; an oversized element gets a run alone."""
    runs: list[range] = []
    start = 0
    used = _PAGE_HEADER.size
    for index, size in enumerate(sizes):
        if index > start and used + size > PAGE_SIZE:
            runs.append(range(start, index))
            start = index
            used = _PAGE_HEADER.size
        used += size
    if sizes:
        runs.append(range(start, len(sizes)))
    return runs


def _write_bucket(writer: _PageWriter, tree: BoltTree) -> int:
    """Write a bucket's B+tree (sub-buckets first) and return its root page id."""
    items: list[tuple[int, bytes, bytes]] = []
    for key in sorted(tree):
        if not key:
            raise ValueError("bbolt keys must not be empty")
        value = tree[key]
        if isinstance(value, bytes):
            items.append((0, key, value))
        else:
            root = _write_bucket(writer, value)
            items.append((_BUCKET_LEAF_FLAG, key, _BUCKET_HEADER.pack(root, 0)))

    if not items:  # an empty bucket is still a leaf page with no elements
        return writer.write(_LEAF_PAGE, 0, b"")

    sizes = [_LEAF_ELEMENT.size + len(k) + len(v) for _, k, v in items]
    level: list[tuple[bytes, int]] = []
    for run in _chunks(sizes):
        chunk = items[run.start : run.stop]
        level.append((chunk[0][1], writer.write(_LEAF_PAGE, len(chunk), _leaf_body(chunk))))
    while len(level) > 1:
        sizes = [_BRANCH_ELEMENT.size + len(k) for k, _ in level]
        upper: list[tuple[bytes, int]] = []
        for run in _chunks(sizes):
            children = level[run.start : run.stop]
            page = writer.write(_BRANCH_PAGE, len(children), _branch_body(children))
            upper.append((children[0][0], page))
        level = upper
    return level[0][1]


def _meta_page(page_id: int, root: int, freelist: int, high_water: int, txid: int) -> bytes:
    fields = _META_FIELDS.pack(
        _MAGIC, _BOLT_VERSION, PAGE_SIZE, 0, root, 0, freelist, high_water, txid
    )
    meta = fields + struct.pack("<Q", fnv1a64(fields))
    return (_PAGE_HEADER.pack(page_id, _META_PAGE, 0, 0) + meta).ljust(PAGE_SIZE, b"\0")


def encode_bolt(tree: BoltTree) -> bytes:
    """Encode a tree of buckets as the bytes of a complete bbolt database file.

    Args:
        tree: the root bucket's content. Top-level values must be buckets (bbolt keeps no
            plain keys in the root bucket).

    Returns:
        The file content, a whole number of 4096-byte pages.
    """
    for key, value in tree.items():
        if isinstance(value, bytes):
            raise TypeError(f"top-level key {key!r} must be a bucket, not a value")
    writer = _PageWriter(next_id=3)  # 0 and 1 are meta pages, 2 is the freelist
    root = _write_bucket(writer, tree)
    high_water = writer.next_id
    pages = [
        _meta_page(0, root, 2, high_water, txid=1),
        _meta_page(1, root, 2, high_water, txid=2),
        _PAGE_HEADER.pack(2, _FREELIST_PAGE, 0, 0).ljust(PAGE_SIZE, b"\0"),
    ]
    pages += [writer.pages[pid] for pid in sorted(writer.pages)]
    return b"".join(pages)


class Ecosystem(Enum):
    """Where an advisory applies: an OS package database or a language package manager."""

    ALPINE = "alpine"
    PIP = "pip"
    NPM = "npm"


_TRIVY_SEVERITY = {
    Severity.UNKNOWN: 0,
    Severity.LOW: 1,
    Severity.MEDIUM: 2,
    Severity.HIGH: 3,
    Severity.CRITICAL: 4,
}


class Advisory(Frozen):
    """One vulnerability affecting one package, as trivy's database records it.

    For Alpine, ``fixed_version`` is the first fixed apk version (``3.1.4-r5``) and the
    advisory is filed under ``os_version`` (major.minor, ``3.19``). For pip and npm,
    ``fixed_version`` is the first patched release and, unless ``vulnerable_versions`` says
    otherwise, every release below it is vulnerable. ``fixed_version=None`` means no fix
    exists yet: every version is vulnerable.
    """

    vulnerability_id: str = Field(description="e.g. CVE-2024-0001")
    ecosystem: Ecosystem
    package: str = Field(min_length=1, description="apk source package, pip or npm name")
    severity: Severity
    fixed_version: str | None = None
    os_version: str | None = Field(default=None, description="Alpine major.minor, e.g. 3.19")
    vulnerable_versions: tuple[str, ...] | None = Field(
        default=None, description="language ecosystems: explicit ranges such as '<2.31.0'"
    )
    title: str = ""
    description: str = ""

    @model_validator(mode="after")
    def _check_ecosystem_fields(self) -> Advisory:
        match self.ecosystem:
            case Ecosystem.ALPINE:
                if not self.os_version or self.os_version.count(".") != 1:
                    raise ValueError("an Alpine advisory needs os_version as major.minor")
                if self.vulnerable_versions is not None:
                    raise ValueError("Alpine advisories are matched by fixed_version only")
            case Ecosystem.PIP | Ecosystem.NPM:
                if self.os_version is not None:
                    raise ValueError("os_version applies to Alpine advisories only")
            case _:
                assert_never(self.ecosystem)
        return self


def _advisory_bucket(advisory: Advisory) -> tuple[str, dict[str, str]]:
    """The bucket an advisory lives in, and the data-source record describing that bucket."""
    match advisory.ecosystem:
        case Ecosystem.ALPINE:
            name = f"alpine {advisory.os_version}"
            return name, {"ID": "alpine", "Name": "Alpine Secdb", "URL": "local"}
        case Ecosystem.PIP | Ecosystem.NPM:
            eco = advisory.ecosystem.value
            name = f"{eco}::Portcullis local advisories {eco}"
            return name, {
                "ID": "ghsa",
                "Name": f"Portcullis local advisories {eco}",
                "URL": "local",
            }
        case _:
            assert_never(advisory.ecosystem)


def _package_key(advisory: Advisory) -> str:
    match advisory.ecosystem:
        case Ecosystem.PIP:
            # trivy looks pip packages up by their normalised name
            return advisory.package.lower().replace("_", "-").replace(".", "-")
        case Ecosystem.ALPINE | Ecosystem.NPM:
            return advisory.package
        case _:
            assert_never(advisory.ecosystem)


def _advisory_record(advisory: Advisory) -> dict[str, object]:
    match advisory.ecosystem:
        case Ecosystem.ALPINE:
            return {"FixedVersion": advisory.fixed_version} if advisory.fixed_version else {}
        case Ecosystem.PIP | Ecosystem.NPM:
            if advisory.vulnerable_versions is not None:
                vulnerable = list(advisory.vulnerable_versions)
            elif advisory.fixed_version:
                vulnerable = [f"<{advisory.fixed_version}"]
            else:
                vulnerable = [">=0"]
            record: dict[str, object] = {"VulnerableVersions": vulnerable}
            if advisory.fixed_version:
                record["PatchedVersions"] = [advisory.fixed_version]
            return record
        case _:
            assert_never(advisory.ecosystem)


def build_tree(advisories: Iterable[Advisory]) -> dict[bytes, BoltTree]:
    """Lay advisories out in trivy-db schema 2 buckets.

    ``<advisory bucket>`` -> ``<package>`` -> ``<vulnerability id>`` -> advisory JSON;
    ``data-source`` -> ``<advisory bucket>`` -> which vendor the bucket speaks for;
    ``vulnerability`` -> ``<vulnerability id>`` -> title, severity, vendor severities.
    """
    by_bucket: dict[str, dict[str, dict[str, bytes]]] = {}
    sources: dict[str, bytes] = {}
    severity: dict[str, Advisory] = {}
    vendor_severity: dict[str, dict[str, int]] = {}
    for advisory in advisories:
        bucket_name, source = _advisory_bucket(advisory)
        packages = by_bucket.setdefault(bucket_name, {})
        package = packages.setdefault(_package_key(advisory), {})
        package[advisory.vulnerability_id] = _json(_advisory_record(advisory))
        sources[bucket_name] = _json(source)
        first = severity.setdefault(advisory.vulnerability_id, advisory)
        if first.severity != advisory.severity:
            raise ValueError(
                f"{advisory.vulnerability_id} is given two severities "
                f"({first.severity.value}, {advisory.severity.value}); trivy keeps one"
            )
        vendor = str(source["ID"])
        vendor_severity.setdefault(advisory.vulnerability_id, {})[vendor] = _TRIVY_SEVERITY[
            advisory.severity
        ]

    tree: dict[bytes, BoltTree] = {
        name.encode(): {
            pkg.encode(): {vid.encode(): record for vid, record in vulns.items()}
            for pkg, vulns in packages.items()
        }
        for name, packages in by_bucket.items()
    }
    tree[b"data-source"] = {name.encode(): record for name, record in sources.items()}
    details: dict[bytes, bytes] = {}
    for vuln_id, advisory in severity.items():
        record: dict[str, object] = {
            "Description": advisory.description,
            "Severity": advisory.severity.value,
            "VendorSeverity": vendor_severity[vuln_id],
            "References": [],
        }
        if advisory.title:
            record["Title"] = advisory.title
        details[vuln_id.encode()] = _json(record)
    tree[b"vulnerability"] = details
    return tree


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def write_trivy_db(
    cache_dir: Path,
    advisories: Iterable[Advisory],
    *,
    updated_at: datetime | None = None,
    valid_for: timedelta = timedelta(days=3650),
) -> Path:
    """Write an offline trivy database under ``cache_dir/db`` and return that directory.

    Existing files are replaced atomically (written beside, then renamed), so a scan running
    at the same time sees either the old database or the new one, never half of one.

    Args:
        cache_dir: the directory later passed to trivy as ``--cache-dir``.
        advisories: what the database should know about.
        updated_at: when the data counts as fetched (default: now); policies may refuse a
            scan whose database is older than they allow.
        valid_for: how far after ``updated_at`` the database claims its next update is due.

    Returns:
        ``cache_dir/db``.
    """
    updated = updated_at or datetime.now(UTC)
    if updated.tzinfo is None:
        raise ValueError("updated_at must be timezone-aware")
    db_dir = cache_dir / "db"
    db_dir.mkdir(parents=True, exist_ok=True)
    tree = build_tree(advisories)
    stamp = updated.astimezone(UTC).isoformat().replace("+00:00", "Z")
    metadata = {
        "Version": SCHEMA_VERSION,
        "NextUpdate": (updated + valid_for).astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "UpdatedAt": stamp,
        "DownloadedAt": stamp,
    }
    _atomic_write(db_dir / "trivy.db", encode_bolt(tree))
    _atomic_write(db_dir / "metadata.json", json.dumps(metadata, indent=2).encode())
    return db_dir


def _atomic_write(path: Path, content: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
