"""The vulnerability gate: what a scan found, and whether the image may pass.

Plain typed rules, no I/O: :func:`parse_trivy_json` turns trivy's JSON report into a
:class:`ScanReport`; :func:`evaluate` decides a :class:`ScanVerdict` from a report, a
:class:`ScanPolicy` and the current time. What changed since the running version (findings
that appear or go) is :mod:`portcullis.change`'s.

How a finding at or above the policy's threshold is judged, in order:

1. a valid (not yet expired) :class:`ScanException` for its vulnerability (and package, when
   the exception names one) excepts it;
2. otherwise, when it has no fixed version and the policy ignores unfixed findings, it is
   ignored (and listed as such);
3. otherwise it blocks. An expired exception that would have matched is listed, so the
   approver sees why a finding that used to pass blocks now.

A scan made with a vulnerability database older than the policy allows blocks too: a stale
database passes images that a fresh one would stop.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from enum import Enum
from functools import total_ordering
from typing import Any, assert_never

from pydantic import Field, field_validator, model_validator

from portcullis.errors import PolicyRefusal
from portcullis.models import Digest, Frozen


@total_ordering
class Severity(Enum):
    """trivy's severity scale, ordered: UNKNOWN < LOW < MEDIUM < HIGH < CRITICAL."""

    UNKNOWN = "UNKNOWN"
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"

    @property
    def rank(self) -> int:
        """Position on the scale, 0 (UNKNOWN) to 4 (CRITICAL), as trivy's database numbers it."""
        match self:
            case Severity.UNKNOWN:
                return 0
            case Severity.LOW:
                return 1
            case Severity.MEDIUM:
                return 2
            case Severity.HIGH:
                return 3
            case Severity.CRITICAL:
                return 4
            case _:
                assert_never(self)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank


SEVERITIES_HIGH_FIRST: tuple[Severity, ...] = tuple(sorted(Severity, reverse=True))
"""Every severity, most severe first (the order reports list them in)."""


class Finding(Frozen):
    """One vulnerability trivy found in one installed package."""

    vulnerability_id: str = Field(description="CVE-..., GHSA-..., as trivy reports it")
    package: str
    installed_version: str
    fixed_version: str | None = Field(
        default=None, description="first fixed version(s); None when no fix exists"
    )
    severity: Severity
    title: str = ""
    target: str = Field(default="", description="where trivy found it, e.g. 'alpine 3.19.1'")
    package_type: str = Field(default="", description="trivy's type: alpine, python-pkg, ...")

    @property
    def fixable(self) -> bool:
        """True when a fixed version exists, i.e. upgrading would remove the finding."""
        return self.fixed_version is not None

    def describe(self) -> str:
        """One line for summaries: ``CVE-1 in openssl 3.1.4-r1 (CRITICAL, fixed in 3.1.4-r5)``."""
        fix = f"fixed in {self.fixed_version}" if self.fixed_version else "no fix yet"
        return (
            f"{self.vulnerability_id} in {self.package} {self.installed_version} "
            f"({self.severity.value}, {fix})"
        )


class ScanReport(Frozen):
    """Everything one scan of one image produced, with enough context to audit it later."""

    image_digest: Digest = Field(description="the manifest digest of the scanned image")
    findings: tuple[Finding, ...]
    package_count: int = Field(ge=0, description="packages trivy saw (0 can mean 'nothing known')")
    os: str | None = Field(default=None, description="detected OS, e.g. 'alpine 3.19.1'")
    trivy_version: str
    db_updated_at: datetime | None = Field(
        default=None, description="when the vulnerability database was last refreshed"
    )
    sbom_sha256: str | None = Field(default=None, description="sha256 of the SBOM that was scanned")
    started_at: datetime
    finished_at: datetime
    tool_seconds: float = Field(ge=0, description="trivy's own run time, without setup")

    def counts(self) -> SeverityCounts:
        """How many findings there are at each severity."""
        return SeverityCounts.of(self.findings)


class SeverityCounts(Frozen):
    """Number of findings per severity."""

    critical: int = 0
    high: int = 0
    medium: int = 0
    low: int = 0
    unknown: int = 0

    @classmethod
    def of(cls, findings: tuple[Finding, ...]) -> SeverityCounts:
        """Count ``findings`` by severity."""
        tally = Counter(f.severity for f in findings)
        return cls(**{sev.value.lower(): tally[sev] for sev in Severity})

    def get(self, severity: Severity) -> int:
        """The count for one severity."""
        match severity:
            case Severity.CRITICAL:
                return self.critical
            case Severity.HIGH:
                return self.high
            case Severity.MEDIUM:
                return self.medium
            case Severity.LOW:
                return self.low
            case Severity.UNKNOWN:
                return self.unknown
            case _:
                assert_never(severity)

    def __str__(self) -> str:
        return ", ".join(f"{sev.value} {self.get(sev)}" for sev in SEVERITIES_HIGH_FIRST)


class ScanException(Frozen):
    """A security approver's time-limited decision to accept one vulnerability.

    It is valid up to and including ``expires`` (a UTC calendar day); from the day after, it
    no longer counts and the finding blocks again.
    """

    vulnerability_id: str = Field(min_length=1, description="the CVE/GHSA id accepted")
    package: str | None = Field(
        default=None, description="only in this package; None accepts it in any package"
    )
    justification: str = Field(min_length=1, description="why the risk is acceptable")
    accepted_by: str = Field(min_length=1, description="who accepted it")
    expires: date = Field(description="last UTC day on which the exception counts")

    @field_validator("vulnerability_id")
    @classmethod
    def _normalise_id(cls, value: str) -> str:
        return value.strip().upper()

    @field_validator("justification", "accepted_by")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    def is_valid_on(self, now: datetime) -> bool:
        """True while ``now`` (timezone-aware) falls on or before the ``expires`` day in UTC."""
        return _utc(now).date() <= self.expires

    def matches(self, finding: Finding) -> bool:
        """True when this exception is about ``finding`` (ignoring whether it expired)."""
        if finding.vulnerability_id.upper() != self.vulnerability_id:
            return False
        return self.package is None or self.package == finding.package


class ScanPolicy(Frozen):
    """What the vulnerability gate lets through."""

    threshold: Severity = Field(
        default=Severity.HIGH, description="findings at or above this severity block"
    )
    ignore_unfixed: bool = Field(
        default=False, description="let findings with no fixed version pass (listed, not hidden)"
    )
    exceptions: tuple[ScanException, ...] = ()
    max_db_age: timedelta | None = Field(
        default=timedelta(days=7),
        description="refuse scans made with an older vulnerability database; None disables",
    )

    @model_validator(mode="after")
    def _check(self) -> ScanPolicy:
        if self.max_db_age is not None and self.max_db_age <= timedelta(0):
            raise ValueError("max_db_age must be positive (or None to disable the check)")
        return self


class ExceptedFinding(Frozen):
    """A finding that would block, let through by a valid exception."""

    finding: Finding
    exception: ScanException


class ScanVerdict(Frozen):
    """The gate's decision on one report, with every finding accounted for."""

    image_digest: Digest
    passed: bool
    threshold: Severity
    blocking: tuple[Finding, ...]
    excepted: tuple[ExceptedFinding, ...]
    expired_exceptions: tuple[ScanException, ...] = Field(
        description="exceptions that matched a finding here but have expired"
    )
    ignored_unfixed: tuple[Finding, ...]
    below_threshold: tuple[Finding, ...]
    db_problem: str | None = Field(description="why the database was not fit to decide, if so")
    summary: str

    def require_pass(self) -> None:
        """Raise :class:`PolicyRefusal` unless the gate passed."""
        if self.passed:
            return
        if self.db_problem is not None and not self.blocking:
            hint = "refresh trivy's vulnerability database, then scan again"
        else:
            hint = (
                "upgrade the listed packages to their fixed versions and rebuild, or have a "
                "security approver add a time-limited exception with a justification"
            )
        raise PolicyRefusal(
            f"vulnerability gate refused {self.image_digest}: {self.summary}", hint=hint
        )


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return moment.astimezone(UTC)


def _db_problem(report: ScanReport, policy: ScanPolicy, now: datetime) -> str | None:
    if policy.max_db_age is None:
        return None
    if report.db_updated_at is None:
        return "the vulnerability database's age is unknown"
    age = _utc(now) - _utc(report.db_updated_at)
    if age > policy.max_db_age:
        return (
            f"the vulnerability database is {_days(age)} old, older than the "
            f"{_days(policy.max_db_age)} the policy allows"
        )
    return None


def _days(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.0f} h"


def _ids(findings: tuple[Finding, ...], limit: int = 3) -> str:
    ids = sorted({f.vulnerability_id for f in findings})
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def evaluate(report: ScanReport, policy: ScanPolicy, now: datetime) -> ScanVerdict:
    """Decide whether the scanned image may pass the vulnerability gate.

    Args:
        report: the scan to judge.
        policy: threshold, unfixed handling, exceptions and database age limit.
        now: the time of the decision (timezone-aware); exceptions and database age are
            judged against it.

    Returns:
        A :class:`ScanVerdict`; ``passed`` is False when any finding blocks or the database
        is not fit to decide.
    """
    blocking: list[Finding] = []
    excepted: list[ExceptedFinding] = []
    expired: dict[ScanException, None] = {}  # ordered set
    ignored: list[Finding] = []
    below: list[Finding] = []
    for finding in sorted(report.findings, key=lambda f: (-f.severity.rank, f.vulnerability_id)):
        if finding.severity < policy.threshold:
            below.append(finding)
            continue
        matching = [e for e in policy.exceptions if e.matches(finding)]
        valid = [e for e in matching if e.is_valid_on(now)]
        if valid:
            excepted.append(ExceptedFinding(finding=finding, exception=valid[0]))
            continue
        expired.update(dict.fromkeys(matching))
        if policy.ignore_unfixed and not finding.fixable:
            ignored.append(finding)
        else:
            blocking.append(finding)
    db_problem = _db_problem(report, policy, now)
    passed = not blocking and db_problem is None

    parts: list[str] = []
    if blocking:
        shown = "; ".join(f.describe() for f in blocking[:3])
        more = f"; and {len(blocking) - 3} more" if len(blocking) > 3 else ""
        parts.append(
            f"{len(blocking)} finding(s) at or above {policy.threshold.value}: {shown}{more}"
        )
    else:
        parts.append(f"no finding at or above {policy.threshold.value} blocks")
    if db_problem:
        parts.append(db_problem)
    if expired:
        expired_ids = ", ".join(e.vulnerability_id for e in expired)
        parts.append(f"expired exception(s) no longer count: {expired_ids}")
    if excepted:
        parts.append(f"{len(excepted)} excepted ({_ids(tuple(x.finding for x in excepted))})")
    if ignored:
        parts.append(f"{len(ignored)} unfixed ignored ({_ids(tuple(ignored))})")
    parts.append(f"{len(below)} below threshold")
    summary = ("PASSED: " if passed else "BLOCKED: ") + "; ".join(parts)

    return ScanVerdict(
        image_digest=report.image_digest,
        passed=passed,
        threshold=policy.threshold,
        blocking=tuple(blocking),
        excepted=tuple(excepted),
        expired_exceptions=tuple(expired),
        ignored_unfixed=tuple(ignored),
        below_threshold=tuple(below),
        db_problem=db_problem,
        summary=summary,
    )


def _refuse_report(reason: str) -> PolicyRefusal:
    return PolicyRefusal(
        f"trivy's JSON report could not be read: {reason}; the gate refuses rather than guess",
        hint="check that the trivy binary is the pinned version (0.76) and run the scan again",
    )


def _severity(value: object) -> Severity:
    try:
        return Severity(str(value).upper())
    except ValueError:
        raise _refuse_report(f"unknown severity {value!r}") from None


def parse_trivy_json(
    raw: bytes,
    *,
    image_digest: str,
    started_at: datetime,
    finished_at: datetime,
    tool_seconds: float,
    db_updated_at: datetime | None,
    sbom_sha256: str | None = None,
) -> ScanReport:
    """Turn ``trivy ... --format json`` output (schema 2) into a :class:`ScanReport`.

    Args:
        raw: trivy's stdout.
        image_digest: the manifest digest of the image the scan belongs to (trivy only knows
            the config digest of an archive, so the caller says which image this is).
        started_at: when the scan started.
        finished_at: when it finished.
        tool_seconds: trivy's own run time.
        db_updated_at: when the database used was refreshed (from its metadata.json).
        sbom_sha256: sha256 of the SBOM scanned, when the scan was of an SBOM.

    Returns:
        The report. Raises :class:`PolicyRefusal` when the output is not a report trivy
        0.76 would write: a gate must not pass an image on output it cannot read.
    """
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise _refuse_report(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("SchemaVersion") != 2:
        raise _refuse_report("not a schema 2 report")
    results = doc.get("Results") or []
    if not isinstance(results, list):
        raise _refuse_report("'Results' is not a list")
    findings: list[Finding] = []
    packages = 0
    for result in results:
        target = str(result.get("Target", ""))
        package_type = str(result.get("Type", ""))
        packages += len(result.get("Packages") or [])
        for vuln in result.get("Vulnerabilities") or []:
            findings.append(_finding(vuln, target, package_type))
    metadata: dict[str, Any] = doc.get("Metadata") or {}
    os_info = metadata.get("OS") or {}
    os_name = f"{os_info['Family']} {os_info['Name']}" if os_info.get("Family") else None
    trivy: dict[str, Any] = doc.get("Trivy") or {}
    return ScanReport(
        image_digest=image_digest,
        findings=tuple(findings),
        package_count=packages,
        os=os_name,
        trivy_version=str(trivy.get("Version", "unknown")),
        db_updated_at=db_updated_at,
        sbom_sha256=sbom_sha256,
        started_at=started_at,
        finished_at=finished_at,
        tool_seconds=tool_seconds,
    )


def _finding(vuln: dict[str, Any], target: str, package_type: str) -> Finding:
    try:
        vuln_id = str(vuln["VulnerabilityID"])
        package = str(vuln["PkgName"])
        installed = str(vuln["InstalledVersion"])
    except KeyError as exc:
        raise _refuse_report(f"a vulnerability lacks {exc.args[0]}") from None
    fixed = str(vuln.get("FixedVersion") or "").strip() or None
    return Finding(
        vulnerability_id=vuln_id,
        package=package,
        installed_version=installed,
        fixed_version=fixed,
        severity=_severity(vuln.get("Severity", "UNKNOWN")),
        title=str(vuln.get("Title") or ""),
        target=target,
        package_type=package_type,
    )


class SbomSummary(Frozen):
    """What an SBOM says, in brief, for the approval form and the run's artifacts."""

    sha256: str
    size_bytes: int
    spec_version: str
    serial_number: str | None
    component_count: int
    components_by_type: dict[str, int]
    purl_types: dict[str, int] = Field(description="library components by purl type: apk, pypi...")
    os: str | None
    image_id: str | None = Field(description="the image config digest trivy recorded")
    generator: str | None


def summarize_cyclonedx(content: bytes) -> SbomSummary:
    """Summarise a CycloneDX JSON SBOM.

    Args:
        content: the SBOM's bytes.

    Returns:
        Counts and identifiers. Raises :class:`PolicyRefusal` when ``content`` is not a
        CycloneDX JSON document.
    """
    try:
        doc = json.loads(content)
    except ValueError as exc:
        raise PolicyRefusal(f"the SBOM is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("bomFormat") != "CycloneDX":
        raise PolicyRefusal("the SBOM is not a CycloneDX document (bomFormat is missing)")
    components: list[dict[str, Any]] = doc.get("components") or []
    by_type = Counter(str(c.get("type", "unknown")) for c in components)
    purl_types = Counter(
        str(c["purl"]).removeprefix("pkg:").split("/", 1)[0] for c in components if c.get("purl")
    )
    os_component = next((c for c in components if c.get("type") == "operating-system"), None)
    os_name = f"{os_component.get('name')} {os_component.get('version')}" if os_component else None
    metadata: dict[str, Any] = doc.get("metadata") or {}
    props = (metadata.get("component") or {}).get("properties") or []
    image_id = next(
        (str(p["value"]) for p in props if p.get("name") == "aquasecurity:trivy:ImageID"), None
    )
    tools = (metadata.get("tools") or {}).get("components") or []
    generator = f"{tools[0].get('name')} {tools[0].get('version')}" if tools else None
    return SbomSummary(
        sha256=hashlib.sha256(content).hexdigest(),
        size_bytes=len(content),
        spec_version=str(doc.get("specVersion", "")),
        serial_number=doc.get("serialNumber"),
        component_count=len(components),
        components_by_type=dict(sorted(by_type.items())),
        purl_types=dict(sorted(purl_types.items())),
        os=os_name,
        image_id=image_id,
        generator=generator,
    )


def sbom_markdown(summary: SbomSummary, image_digest: str) -> str:
    """Render an SBOM summary as Markdown for a Prefect artifact."""
    lines = [
        f"## SBOM for `{image_digest}`",
        "",
        (
            f"- format: CycloneDX {summary.spec_version}, {summary.size_bytes} bytes, "
            f"sha256 `{summary.sha256}`"
        ),
        f"- generator: {summary.generator or 'unknown'}",
        f"- operating system: {summary.os or 'none detected'}",
        f"- image config: `{summary.image_id or 'unknown'}`",
        f"- components: {summary.component_count}",
    ]
    lines += [f"  - {kind}: {n}" for kind, n in summary.components_by_type.items()]
    if summary.purl_types:
        lines.append(
            "- packages by ecosystem: "
            + ", ".join(f"{kind} {n}" for kind, n in summary.purl_types.items())
        )
    return "\n".join(lines) + "\n"


def findings_table(verdict: ScanVerdict) -> list[dict[str, str]]:
    """Rows for a Prefect table artifact: every finding at or above the threshold, then the
    rest, each with what the gate decided about it."""
    rows: list[dict[str, str]] = []

    def row(finding: Finding, decision: str) -> dict[str, str]:
        return {
            "decision": decision,
            "severity": finding.severity.value,
            "vulnerability": finding.vulnerability_id,
            "package": finding.package,
            "installed": finding.installed_version,
            "fixed": finding.fixed_version or "",
            "target": finding.target,
            "title": finding.title,
        }

    rows += [row(f, "BLOCKS") for f in verdict.blocking]
    rows += [
        row(x.finding, f"excepted by {x.exception.accepted_by} until {x.exception.expires}")
        for x in verdict.excepted
    ]
    rows += [row(f, "unfixed, ignored by policy") for f in verdict.ignored_unfixed]
    rows += [row(f, "below threshold") for f in verdict.below_threshold]
    return rows


class SbomRecord(Frozen):
    """Where the SBOM of an image was written, and what it holds."""

    image_digest: Digest
    path: str = Field(description="the SBOM file (CycloneDX JSON)")
    summary: SbomSummary
    trivy_version: str
    tool_seconds: float = Field(ge=0, description="trivy's own run time, without setup")


class ScanOutcome(Frozen):
    """The vulnerability stage's result: the scan and the gate's verdict."""

    report: ScanReport
    verdict: ScanVerdict
