"""The vulnerability gate's rules, without trivy: policy verdicts and parsing."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from portcullis.errors import PolicyRefusal
from portcullis.scan import (
    Finding,
    ScanException,
    ScanPolicy,
    ScanReport,
    Severity,
    evaluate,
    findings_table,
    parse_trivy_json,
    summarize_cyclonedx,
)

DIGEST = "sha256:" + "ab" * 32
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def finding(
    vuln: str,
    severity: Severity,
    *,
    package: str = "openssl",
    fixed: str | None = "3.1.4-r5",
) -> Finding:
    return Finding(
        vulnerability_id=vuln,
        package=package,
        installed_version="3.1.4-r1",
        fixed_version=fixed,
        severity=severity,
        title=f"title of {vuln}",
        target="img (alpine 3.19.1)",
        package_type="alpine",
    )


def report(*findings: Finding, db_age: timedelta | None = timedelta(hours=1)) -> ScanReport:
    return ScanReport(
        image_digest=DIGEST,
        findings=findings,
        package_count=12,
        os="alpine 3.19.1",
        trivy_version="0.76.0",
        db_updated_at=None if db_age is None else NOW - db_age,
        started_at=NOW,
        finished_at=NOW + timedelta(seconds=1),
        tool_seconds=0.05,
    )


def exception(vuln: str, expires: date, package: str | None = None) -> ScanException:
    return ScanException(
        vulnerability_id=vuln,
        package=package,
        justification="not reachable: the service never parses untrusted certificates",
        accepted_by="sec-approver@example.com",
        expires=expires,
    )


def test_severity_scale_is_ordered() -> None:
    order = [Severity.UNKNOWN, Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL]
    shuffled = [Severity.HIGH, Severity.UNKNOWN, Severity.CRITICAL, Severity.LOW, Severity.MEDIUM]
    assert sorted(shuffled) == order
    assert Severity.CRITICAL >= Severity.HIGH > Severity.MEDIUM
    assert not Severity.LOW >= Severity.MEDIUM


def test_critical_finding_blocks_and_refusal_names_it() -> None:
    verdict = evaluate(report(finding("CVE-2024-1", Severity.CRITICAL)), ScanPolicy(), NOW)
    assert not verdict.passed
    assert [f.vulnerability_id for f in verdict.blocking] == ["CVE-2024-1"]
    assert verdict.summary.startswith("BLOCKED")
    assert "CVE-2024-1 in openssl 3.1.4-r1 (CRITICAL, fixed in 3.1.4-r5)" in verdict.summary
    with pytest.raises(PolicyRefusal) as refused:
        verdict.require_pass()
    assert "CVE-2024-1" in str(refused.value)
    assert refused.value.hint is not None and "fixed versions" in refused.value.hint


def test_findings_below_threshold_pass_but_are_kept() -> None:
    low = finding("CVE-2024-2", Severity.MEDIUM)
    verdict = evaluate(report(low), ScanPolicy(threshold=Severity.HIGH), NOW)
    assert verdict.passed
    assert verdict.below_threshold == (low,)
    verdict.require_pass()


def test_threshold_is_inclusive() -> None:
    high = finding("CVE-2024-3", Severity.HIGH)
    assert not evaluate(report(high), ScanPolicy(threshold=Severity.HIGH), NOW).passed
    assert evaluate(report(high), ScanPolicy(threshold=Severity.CRITICAL), NOW).passed


def test_clean_report_passes() -> None:
    verdict = evaluate(report(), ScanPolicy(), NOW)
    assert verdict.passed
    assert verdict.summary.startswith("PASSED")


def test_valid_exception_lets_finding_pass_until_its_last_day() -> None:
    crit = finding("CVE-2024-4", Severity.CRITICAL)
    exc = exception("cve-2024-4", expires=NOW.date())  # ids are compared case-insensitively
    verdict = evaluate(report(crit), ScanPolicy(exceptions=(exc,)), NOW)
    assert verdict.passed
    assert verdict.excepted[0].finding == crit
    assert verdict.excepted[0].exception == exc
    assert "1 excepted (CVE-2024-4)" in verdict.summary


def test_expired_exception_no_longer_counts() -> None:
    crit = finding("CVE-2024-4", Severity.CRITICAL)
    exc = exception("CVE-2024-4", expires=NOW.date() - timedelta(days=1))
    verdict = evaluate(report(crit), ScanPolicy(exceptions=(exc,)), NOW)
    assert not verdict.passed
    assert verdict.blocking == (crit,)
    assert verdict.expired_exceptions == (exc,)
    assert "expired exception(s) no longer count: CVE-2024-4" in verdict.summary


def test_exception_expiry_is_judged_in_utc() -> None:
    exc = exception("CVE-2024-4", expires=date(2025, 3, 10))
    from zoneinfo import ZoneInfo

    # 01:00 on the 11th in Berlin is still the 10th in UTC: still valid.
    assert exc.is_valid_on(datetime(2025, 3, 11, 0, 30, tzinfo=ZoneInfo("Europe/Berlin")))
    assert not exc.is_valid_on(datetime(2025, 3, 11, 0, 30, tzinfo=UTC))
    with pytest.raises(ValueError):
        exc.is_valid_on(datetime(2025, 3, 10))


def test_exception_for_another_package_does_not_apply() -> None:
    crit = finding("CVE-2024-5", Severity.CRITICAL, package="openssl")
    exc = exception("CVE-2024-5", expires=NOW.date(), package="libcrypto3")
    verdict = evaluate(report(crit), ScanPolicy(exceptions=(exc,)), NOW)
    assert not verdict.passed
    assert verdict.expired_exceptions == ()


def test_exception_needs_justification_and_approver() -> None:
    with pytest.raises(ValidationError):
        ScanException(
            vulnerability_id="CVE-1", justification="  ", accepted_by="x", expires=NOW.date()
        )
    with pytest.raises(ValidationError):
        ScanException(
            vulnerability_id="CVE-1", justification="ok", accepted_by="", expires=NOW.date()
        )


def test_ignore_unfixed_lets_unfixed_pass_but_not_fixable() -> None:
    unfixed = finding("CVE-2024-6", Severity.CRITICAL, fixed=None)
    fixable = finding("CVE-2024-7", Severity.CRITICAL)
    strict = evaluate(report(unfixed), ScanPolicy(), NOW)
    assert not strict.passed
    lenient = evaluate(report(unfixed), ScanPolicy(ignore_unfixed=True), NOW)
    assert lenient.passed
    assert lenient.ignored_unfixed == (unfixed,)
    assert "1 unfixed ignored (CVE-2024-6)" in lenient.summary
    mixed = evaluate(report(unfixed, fixable), ScanPolicy(ignore_unfixed=True), NOW)
    assert not mixed.passed
    assert mixed.blocking == (fixable,)


def test_stale_database_blocks_even_without_findings() -> None:
    verdict = evaluate(report(db_age=timedelta(days=8)), ScanPolicy(), NOW)
    assert not verdict.passed
    assert verdict.db_problem is not None and "8.0 days old" in verdict.db_problem
    with pytest.raises(PolicyRefusal) as refused:
        verdict.require_pass()
    assert refused.value.hint is not None and "refresh" in refused.value.hint
    assert evaluate(report(db_age=timedelta(days=8)), ScanPolicy(max_db_age=None), NOW).passed


def test_unknown_database_age_blocks_when_age_is_limited() -> None:
    verdict = evaluate(report(db_age=None), ScanPolicy(), NOW)
    assert not verdict.passed
    assert verdict.db_problem == "the vulnerability database's age is unknown"


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        evaluate(report(), ScanPolicy(), datetime(2025, 3, 10))


def test_findings_table_states_each_decision() -> None:
    crit = finding("CVE-2024-1", Severity.CRITICAL)
    excepted = finding("CVE-2024-2", Severity.HIGH)
    low = finding("CVE-2024-3", Severity.LOW)
    verdict = evaluate(
        report(low, excepted, crit),
        ScanPolicy(exceptions=(exception("CVE-2024-2", NOW.date()),)),
        NOW,
    )
    rows = findings_table(verdict)
    assert [(r["vulnerability"], r["decision"]) for r in rows] == [
        ("CVE-2024-1", "BLOCKS"),
        ("CVE-2024-2", "excepted by sec-approver@example.com until 2025-03-10"),
        ("CVE-2024-3", "below threshold"),
    ]


_severities = st.sampled_from(list(Severity))


@given(
    st.lists(st.tuples(st.integers(0, 5), _severities, st.booleans()), max_size=12),
    _severities,
    st.booleans(),
    st.sets(st.integers(0, 5)),
    st.sets(st.integers(0, 5)),
)
def test_every_finding_is_accounted_for_once(
    specs: list[tuple[int, Severity, bool]],
    threshold: Severity,
    ignore_unfixed: bool,
    valid_ids: set[int],
    expired_ids: set[int],
) -> None:
    findings = [
        finding(f"CVE-2024-{n}", sev, package=f"pkg{i}", fixed="1.0" if fixed else None)
        for i, (n, sev, fixed) in enumerate(specs)
    ]
    exceptions = tuple(exception(f"CVE-2024-{n}", NOW.date()) for n in valid_ids) + tuple(
        exception(f"CVE-2024-{n}", NOW.date() - timedelta(days=1)) for n in expired_ids
    )
    policy = ScanPolicy(threshold=threshold, ignore_unfixed=ignore_unfixed, exceptions=exceptions)
    verdict = evaluate(report(*findings), policy, NOW)
    buckets = (
        list(verdict.blocking)
        + [x.finding for x in verdict.excepted]
        + list(verdict.ignored_unfixed)
        + list(verdict.below_threshold)
    )
    assert sorted(buckets, key=repr) == sorted(findings, key=repr)
    assert verdict.passed == (not verdict.blocking)
    for f in verdict.blocking:
        assert f.severity >= threshold
        assert int(f.vulnerability_id.rsplit("-", 1)[1]) not in valid_ids
        assert f.fixable or not ignore_unfixed


def _trivy_doc(vulns: list[dict[str, object]], schema: int = 2) -> bytes:
    return json.dumps(
        {
            "SchemaVersion": schema,
            "Trivy": {"Version": "0.76.0"},
            "ArtifactName": "sbom.cdx.json",
            "Metadata": {"OS": {"Family": "alpine", "Name": "3.19.1"}},
            "Results": [
                {
                    "Target": "sbom.cdx.json (alpine 3.19.1)",
                    "Class": "os-pkgs",
                    "Type": "alpine",
                    "Packages": [{"Name": "openssl"}, {"Name": "busybox"}],
                    "Vulnerabilities": vulns,
                },
                {"Target": "Python", "Class": "lang-pkgs", "Type": "python-pkg"},
            ],
        }
    ).encode()


def _parse(raw: bytes) -> ScanReport:
    return parse_trivy_json(
        raw,
        image_digest=DIGEST,
        started_at=NOW,
        finished_at=NOW,
        tool_seconds=0.1,
        db_updated_at=NOW,
    )


def test_parse_trivy_json() -> None:
    parsed = _parse(
        _trivy_doc(
            [
                {
                    "VulnerabilityID": "CVE-2024-1",
                    "PkgName": "openssl",
                    "InstalledVersion": "3.1.4-r1",
                    "FixedVersion": "3.1.4-r5",
                    "Severity": "CRITICAL",
                    "Title": "bad",
                },
                {
                    "VulnerabilityID": "CVE-2024-2",
                    "PkgName": "busybox",
                    "InstalledVersion": "1.36.1-r15",
                    "FixedVersion": "",
                    "Severity": "LOW",
                },
            ]
        )
    )
    assert parsed.trivy_version == "0.76.0"
    assert parsed.os == "alpine 3.19.1"
    assert parsed.package_count == 2
    assert [(f.vulnerability_id, f.fixed_version, f.severity) for f in parsed.findings] == [
        ("CVE-2024-1", "3.1.4-r5", Severity.CRITICAL),
        ("CVE-2024-2", None, Severity.LOW),
    ]
    assert parsed.findings[0].target == "sbom.cdx.json (alpine 3.19.1)"
    assert parsed.counts().critical == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        _trivy_doc([], schema=1),
        _trivy_doc(
            [
                {
                    "VulnerabilityID": "CVE-1",
                    "PkgName": "x",
                    "InstalledVersion": "1",
                    "Severity": "APOCALYPTIC",
                }
            ]
        ),
        _trivy_doc([{"VulnerabilityID": "CVE-1", "InstalledVersion": "1", "Severity": "LOW"}]),
    ],
    ids=["not-json", "old-schema", "unknown-severity", "no-package"],
)
def test_unreadable_trivy_output_is_refused(raw: bytes) -> None:
    with pytest.raises(PolicyRefusal, match="could not be read"):
        _parse(raw)


def test_summarize_cyclonedx_refuses_other_documents() -> None:
    with pytest.raises(PolicyRefusal, match="not a CycloneDX"):
        summarize_cyclonedx(b'{"spdxVersion": "SPDX-2.3"}')
    summary = summarize_cyclonedx(
        json.dumps(
            {
                "bomFormat": "CycloneDX",
                "specVersion": "1.6",
                "components": [
                    {"type": "operating-system", "name": "alpine", "version": "3.19.1"},
                    {"type": "library", "name": "openssl", "purl": "pkg:apk/alpine/openssl@3"},
                    {"type": "library", "name": "requests", "purl": "pkg:pypi/requests@2"},
                ],
            }
        ).encode()
    )
    assert summary.component_count == 3
    assert summary.os == "alpine 3.19.1"
    assert summary.purl_types == {"apk": 1, "pypi": 1}
    assert summary.components_by_type == {"library": 2, "operating-system": 1}
