"""The real trivy 0.76 binary, fully offline, against image archives and a database built here.

Each test writes its own vulnerability database (infra.trivydb) into a fresh cache dir
and its own image archive (tests.support.oci_archive), so nothing is shared or downloaded.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.trivydb import PAGE_SIZE, Advisory, Ecosystem, encode_bolt, fnv1a64, write_trivy_db
from portcullis.errors import ConfigurationError, PolicyRefusal, is_retryable
from portcullis.scan import (
    ScanException,
    ScanPolicy,
    ScanReport,
    Severity,
    evaluate,
    summarize_cyclonedx,
)
from portcullis.trivy import check_db, find_trivy, generate_sbom, scan_image_archive, scan_sbom
from tests.support.oci_archive import (
    ArchiveLayout,
    alpine_files,
    npm_package_files,
    python_dist_files,
    write_image_archive,
)

DIGEST = "sha256:" + "cd" * 32

OPENSSL_CRITICAL = Advisory(
    vulnerability_id="CVE-2099-0001",
    ecosystem=Ecosystem.ALPINE,
    os_version="3.19",
    package="openssl",
    severity=Severity.CRITICAL,
    fixed_version="3.1.4-r5",
    title="openssl: remote code execution in certificate parsing",
)
BUSYBOX_LOW_UNFIXED = Advisory(
    vulnerability_id="CVE-2099-0002",
    ecosystem=Ecosystem.ALPINE,
    os_version="3.19",
    package="busybox",
    severity=Severity.LOW,
)
REQUESTS_CRITICAL_UNFIXED = Advisory(
    vulnerability_id="CVE-2099-0003",
    ecosystem=Ecosystem.PIP,
    package="requests",
    severity=Severity.CRITICAL,
    title="requests: unfixed header injection",
)
LODASH_HIGH = Advisory(
    vulnerability_id="GHSA-xxxx-yyyy-zzzz",
    ecosystem=Ecosystem.NPM,
    package="lodash",
    severity=Severity.HIGH,
    fixed_version="4.17.21",
)


@pytest.fixture(scope="module", autouse=True)
def _trivy_installed() -> None:
    # A missing binary is an installation fault, not a reason to skip: fail loudly.
    find_trivy()


def image(
    tmp_path: Path,
    openssl: str = "3.1.4-r1",
    *,
    layout: ArchiveLayout = ArchiveLayout.OCI,
    python: bool = False,
    npm: bool = False,
) -> Path:
    files = alpine_files("3.19.1", [("openssl", openssl), ("busybox", "1.36.1-r15")])
    if python:
        files |= python_dist_files("requests", "2.25.0")
    if npm:
        files |= npm_package_files("lodash", "4.17.20")
    return write_image_archive(tmp_path / f"image-{layout.value}.tar", files, layout=layout).path


def db(tmp_path: Path, *advisories: Advisory) -> Path:
    cache = tmp_path / "trivy-cache"
    write_trivy_db(cache, advisories)
    return cache


def sbom_scan(tmp_path: Path, archive: Path, cache: Path) -> ScanReport:
    sbom = generate_sbom(archive, cache_dir=tmp_path / "sbom-cache")
    path = tmp_path / "sbom.cdx.json"
    path.write_bytes(sbom.content)
    return scan_sbom(path, image_digest=DIGEST, cache_dir=cache)


def now() -> datetime:
    return datetime.now(UTC)


def test_fnv1a64_known_vectors() -> None:
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def _walk_pages(data: bytes) -> dict[int, int]:
    """Follow the pages after the freelist in file order, using each header's id and overflow;
    return how many nodes of each page type were seen."""
    kinds: dict[int, int] = {}
    page = 3
    high_water = int.from_bytes(data[16 + 40 : 16 + 48], "little")
    while page < high_water:
        page_id, flags, _count, overflow = struct.unpack_from("<QHHI", data, page * PAGE_SIZE)
        assert page_id == page, f"page {page} claims to be page {page_id}"
        kinds[flags] = kinds.get(flags, 0) + 1
        page += 1 + overflow
    assert page == high_water == len(data) // PAGE_SIZE
    return kinds


def test_bolt_file_has_checksummed_meta_pages() -> None:
    data = encode_bolt({b"bucket": {b"key": b"value", b"big": b"v" * 10_000}})
    assert len(data) % PAGE_SIZE == 0
    for page in (0, 1):
        meta = data[page * PAGE_SIZE + 16 : page * PAGE_SIZE + 16 + 64]
        assert int.from_bytes(meta[:4], "little") == 0xED0CDAED
        assert int.from_bytes(meta[56:64], "little") == fnv1a64(meta[:56])
        assert int.from_bytes(meta[40:48], "little") == len(data) // PAGE_SIZE  # high water
    # root leaf; the bucket: the 10 kB value alone on a leaf with overflow, "key" on another
    # leaf, and a branch page over both
    assert _walk_pages(data) == {0x02: 3, 0x01: 1}


def test_critical_os_finding_blocks(tmp_path: Path) -> None:
    cache = db(tmp_path, OPENSSL_CRITICAL, BUSYBOX_LOW_UNFIXED)
    report = sbom_scan(tmp_path, image(tmp_path), cache)

    critical = [f for f in report.findings if f.vulnerability_id == "CVE-2099-0001"]
    assert len(critical) == 1
    assert critical[0].package == "openssl"
    assert critical[0].installed_version == "3.1.4-r1"
    assert critical[0].fixed_version == "3.1.4-r5"
    assert critical[0].severity is Severity.CRITICAL
    assert critical[0].title == OPENSSL_CRITICAL.title
    assert report.os == "alpine 3.19.1"
    assert report.trivy_version == "0.76.0"
    assert report.package_count == 2
    assert report.db_updated_at is not None and now() - report.db_updated_at < timedelta(minutes=5)
    assert report.sbom_sha256 is not None and report.tool_seconds > 0

    verdict = evaluate(report, ScanPolicy(), now())
    assert not verdict.passed
    assert [f.vulnerability_id for f in verdict.blocking] == ["CVE-2099-0001"]
    assert [f.vulnerability_id for f in verdict.below_threshold] == ["CVE-2099-0002"]
    with pytest.raises(PolicyRefusal, match="CVE-2099-0001"):
        verdict.require_pass()


def test_fixed_version_passes(tmp_path: Path) -> None:
    cache = db(tmp_path, OPENSSL_CRITICAL)
    report = sbom_scan(tmp_path, image(tmp_path, openssl="3.1.4-r5"), cache)
    assert report.findings == ()
    assert report.package_count == 2  # the packages were seen, they are just not vulnerable
    assert evaluate(report, ScanPolicy(), now()).passed


def test_expired_exception_blocks_again_while_valid_one_passes(tmp_path: Path) -> None:
    cache = db(tmp_path, OPENSSL_CRITICAL)
    report = sbom_scan(tmp_path, image(tmp_path), cache)
    today = now().date()

    def accepted_until(days: int) -> ScanPolicy:
        return ScanPolicy(
            exceptions=(
                ScanException(
                    vulnerability_id="CVE-2099-0001",
                    package="openssl",
                    justification="mitigated by the proxy in front; upgrade scheduled",
                    accepted_by="security-approver",
                    expires=today + timedelta(days=days),
                ),
            )
        )

    valid = evaluate(report, accepted_until(30), now())
    assert valid.passed
    assert [x.finding.vulnerability_id for x in valid.excepted] == ["CVE-2099-0001"]

    expired = evaluate(report, accepted_until(-1), now())
    assert not expired.passed
    assert [e.vulnerability_id for e in expired.expired_exceptions] == ["CVE-2099-0001"]


def test_ignore_unfixed_language_package(tmp_path: Path) -> None:
    cache = db(tmp_path, REQUESTS_CRITICAL_UNFIXED)
    report = sbom_scan(tmp_path, image(tmp_path, python=True), cache)
    [found] = report.findings
    assert (found.vulnerability_id, found.package, found.installed_version) == (
        "CVE-2099-0003",
        "requests",
        "2.25.0",
    )
    assert found.fixed_version is None
    assert found.package_type == "python-pkg"
    assert not evaluate(report, ScanPolicy(), now()).passed
    lenient = evaluate(report, ScanPolicy(ignore_unfixed=True), now())
    assert lenient.passed
    assert lenient.ignored_unfixed == (found,)


def test_npm_advisory_is_found(tmp_path: Path) -> None:
    cache = db(tmp_path, LODASH_HIGH)
    report = sbom_scan(tmp_path, image(tmp_path, npm=True), cache)
    assert [(f.vulnerability_id, f.fixed_version, f.severity) for f in report.findings] == [
        ("GHSA-xxxx-yyyy-zzzz", "4.17.21", Severity.HIGH)
    ]


@pytest.mark.parametrize("layout", list(ArchiveLayout), ids=lambda layout: layout.value)
def test_sbom_scan_finds_what_archive_scan_finds(tmp_path: Path, layout: ArchiveLayout) -> None:
    cache = db(
        tmp_path, OPENSSL_CRITICAL, BUSYBOX_LOW_UNFIXED, REQUESTS_CRITICAL_UNFIXED, LODASH_HIGH
    )
    archive = image(tmp_path, layout=layout, python=True, npm=True)

    def key(r: ScanReport) -> set[tuple[str, str, str, str | None, Severity]]:
        return {
            (f.vulnerability_id, f.package, f.installed_version, f.fixed_version, f.severity)
            for f in r.findings
        }

    via_sbom = sbom_scan(tmp_path, archive, cache)
    direct = scan_image_archive(archive, image_digest=DIGEST, cache_dir=cache)
    assert key(via_sbom) == key(direct)
    assert {f.vulnerability_id for f in via_sbom.findings} == {
        "CVE-2099-0001",
        "CVE-2099-0002",
        "CVE-2099-0003",
        "GHSA-xxxx-yyyy-zzzz",
    }
    assert via_sbom.package_count == direct.package_count == 4


def test_sbom_generation_needs_no_database_and_writes_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "no-db"
    sbom = generate_sbom(image(tmp_path, python=True), cache_dir=cache)
    assert not cache.exists()
    summary = summarize_cyclonedx(sbom.content)
    assert summary.sha256 == sbom.sha256
    assert summary.os == "alpine 3.19.1"
    assert summary.purl_types == {"apk": 2, "pypi": 1}
    assert summary.generator == "trivy 0.76.0"
    assert sbom.trivy_version == "0.76.0"
    assert sbom.tool_seconds > 0


def test_missing_database_is_a_clear_terminal_error(tmp_path: Path) -> None:
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(generate_sbom(image(tmp_path), cache_dir=tmp_path / "c").content)
    with pytest.raises(ConfigurationError) as missing:
        scan_sbom(sbom, image_digest=DIGEST, cache_dir=tmp_path / "empty")
    assert "vulnerability database is missing" in str(missing.value)
    assert "trivy.db" in str(missing.value)
    assert missing.value.hint is not None and "write_trivy_db" in missing.value.hint
    assert not is_retryable(missing.value)


def test_database_of_another_schema_is_refused(tmp_path: Path) -> None:
    cache = db(tmp_path, OPENSSL_CRITICAL)
    meta = cache / "db" / "metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "Version": 1}))
    with pytest.raises(ConfigurationError, match="schema 1"):
        check_db(cache)


def test_not_an_image_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tarball")
    with pytest.raises(PolicyRefusal, match="not a readable image tarball"):
        generate_sbom(junk, cache_dir=tmp_path / "c")
    with pytest.raises(PolicyRefusal, match="does not exist"):
        generate_sbom(tmp_path / "absent.tar", cache_dir=tmp_path / "c")


def test_large_database_with_branch_and_overflow_pages(tmp_path: Path) -> None:
    # Long package names make each leaf hold only a few keys, so the alpine bucket needs
    # several levels of branch pages; a long title needs overflow pages. trivy reading the
    # one real advisory through all of that shows the tree is laid out correctly.
    fillers = [
        Advisory(
            vulnerability_id=f"CVE-2098-{i:04d}",
            ecosystem=Ecosystem.ALPINE,
            os_version="3.19",
            package=f"{'m' if i % 2 else 'a'}-filler-{i:04d}-" + "x" * 900,
            severity=Severity.LOW,
            fixed_version="1.0-r0",
        )
        for i in range(150)
    ]
    long_title = "openssl: " + "very long advisory title " * 400
    target = OPENSSL_CRITICAL.model_copy(update={"title": long_title})
    cache = db(tmp_path, *fillers, target)
    kinds = _walk_pages((cache / "db" / "trivy.db").read_bytes())
    assert kinds[0x01] >= 5, kinds  # branch pages
    assert kinds[0x02] > 100, kinds  # leaf pages

    report = sbom_scan(tmp_path, image(tmp_path), cache)
    assert [(f.vulnerability_id, f.title) for f in report.findings] == [
        ("CVE-2099-0001", long_title)
    ]
