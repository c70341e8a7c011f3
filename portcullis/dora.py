"""DORA metrics per app and environment, from the audit trail. Pure functions.

Definitions (over a window ``[since, until)``):

* **deployments**: ``promotion.completed`` records; **deployment frequency** is deployments
  per day of the window.
* **lead time for changes**: the median of (completed at - commit time) over those
  deployments. Commit times come from git (or provenance) through ``commit_times``; a commit
  without a known time is left out.
* **change failure rate**: failures over changes that reached traffic. A failure is a
  ``rollback.completed`` (someone rolled a version back) or a ``canary.rolled-back`` (the
  canary failed and traffic went back to stable); changes that reached traffic are the
  deployments plus the failed canaries (those never complete).
* **time to restore**: the median time from a failure starting to the environment being
  restored: for a rollback, from the completed promotion of the version rolled back to the
  rollback; for a failed canary, from the run taking the environment's lock (traffic starts
  moving right after) to traffic being back on stable.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from portcullis.audit import AuditRecord
from portcullis.chain import COMPLETED
from portcullis.models import Frozen

ROLLED_BACK = "rollback.completed"
CANARY_FAILED = "canary.rolled-back"
DORA_ARTIFACT_KEY = "dora-metrics"


class DoraFigures(Frozen):
    """The four keys for one app in one environment over one window."""

    app: str
    environment: str
    since: datetime
    until: datetime
    deployments: int
    deployment_frequency_per_day: float
    lead_time_seconds: float | None
    change_failures: int
    changes_reaching_traffic: int
    change_failure_rate: float | None
    time_to_restore_seconds: float | None
    deployments_per_week: tuple[tuple[str, int], ...] = ()


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def dora_figures(
    records: Sequence[AuditRecord], *, app: str, environment: str, since: datetime,
    until: datetime, commit_times: Mapping[str, datetime],
) -> DoraFigures:
    """The DORA figures of ``app`` in ``environment`` for ``[since, until)``.

    Args:
        records: the whole audit trail, oldest first (earlier records are needed to date
            the start of a failure that was restored in the window).
        app: the app.
        environment: the environment (DORA is usually read for prod).
        since: window start (aware).
        until: window end (aware).
        commit_times: when each commit (full id) was made.
    """
    mine = [r for r in records if r.app == app and r.environment == environment]

    def inside(r: AuditRecord) -> bool:
        return since <= r.at < until

    completed = [r for r in mine if r.event == COMPLETED and inside(r)]
    lead = [(r.at - commit_times[r.commit]).total_seconds() for r in completed
            if r.commit is not None and r.commit in commit_times]
    restores: list[float] = []
    failures = 0
    failed_canaries = 0
    for index, r in enumerate(mine):
        if not inside(r):
            continue
        if r.event == ROLLED_BACK:
            failures += 1
            bad = r.details.get("rolled_back_from")
            began = next((p for p in reversed(mine[:index]) if p.event == COMPLETED and
                          (bad is None or p.digest == bad)), None)
            if began is not None:
                restores.append((r.at - began.at).total_seconds())
        elif r.event == CANARY_FAILED:
            failures += 1
            failed_canaries += 1
            began = next((p for p in mine[:index] if p.run_id == r.run_id and p.event == "lock.acquired"), None)
            if began is not None:
                restores.append((r.at - began.at).total_seconds())
    reached = len(completed) + failed_canaries
    days = max((until - since) / timedelta(days=1), 1e-9)
    weeks: dict[str, int] = {}
    for r in completed:
        year, week, _ = r.at.isocalendar()
        label = f"{year}-W{week:02d}"
        weeks[label] = weeks.get(label, 0) + 1
    return DoraFigures(
        app=app, environment=environment, since=since, until=until,
        deployments=len(completed), deployment_frequency_per_day=len(completed) / days,
        lead_time_seconds=_median(lead), change_failures=failures,
        changes_reaching_traffic=reached,
        change_failure_rate=failures / reached if reached else None,
        time_to_restore_seconds=_median(restores),
        deployments_per_week=tuple(sorted(weeks.items())),
    )


def all_figures(
    records: Sequence[AuditRecord], *, since: datetime, until: datetime,
    commit_times: Mapping[str, datetime], apps: Iterable[str] = (),
    environments: Sequence[str] = ("dev", "staging", "prod"),
) -> list[DoraFigures]:
    """Figures for every app (the given ones first, then any in the trail) and environment."""
    names = dict.fromkeys(apps)
    names.update(dict.fromkeys(r.app for r in records if r.app))
    return [dora_figures(records, app=a, environment=e, since=since, until=until,
                         commit_times=commit_times) for a in names if a for e in environments]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def render_markdown(figures: Sequence[DoraFigures]) -> str:
    """A table of the four keys and an ASCII chart of deployments per week."""
    rows = ["| app | environment | deployments | per day | lead time | change failure rate | time to restore |",
            "|---|---|---|---|---|---|---|"]
    chart: list[str] = []
    for f in figures:
        cfr = f"{f.change_failure_rate:.0%} ({f.change_failures}/{f.changes_reaching_traffic})" \
            if f.change_failure_rate is not None else "-"
        rows.append(f"| {f.app} | {f.environment} | {f.deployments} | {f.deployment_frequency_per_day:.2f} | "
                    f"{_duration(f.lead_time_seconds)} | {cfr} | {_duration(f.time_to_restore_seconds)} |")
        for week, count in f.deployments_per_week:
            chart.append(f"{f.app:<12} {f.environment:<8} {week} {'#' * min(count, 60)} {count}")
    window = f"{figures[0].since.date()} to {figures[0].until.date()}" if figures else ""
    return "\n".join([f"# DORA metrics {window}", "", *rows, "", "Deployments per week:", "",
                      "```", *(chart or ["(no deployments)"]), "```"]) + "\n"


def prometheus_registry(figures: Sequence[DoraFigures]) -> CollectorRegistry:
    """The figures as Prometheus gauges labelled by app and environment (unknowns left out)."""
    registry = CollectorRegistry()
    labels = ["app", "environment"]
    gauges = {
        "deployments": Gauge("portcullis_dora_deployments", "Completed promotions in the window",
                             labels, registry=registry),
        "frequency": Gauge("portcullis_dora_deployment_frequency_per_day",
                           "Completed promotions per day of the window", labels, registry=registry),
        "lead": Gauge("portcullis_dora_lead_time_seconds",
                      "Median time from commit to running in the environment", labels, registry=registry),
        "cfr": Gauge("portcullis_dora_change_failure_rate",
                     "Rollbacks and failed canaries over changes that reached traffic", labels,
                     registry=registry),
        "restore": Gauge("portcullis_dora_time_to_restore_seconds",
                         "Median time from a failure starting to the environment restored", labels,
                         registry=registry),
        "window": Gauge("portcullis_dora_window_seconds", "Length of the window the figures cover",
                        labels, registry=registry),
    }
    for f in figures:
        key = (f.app, f.environment)
        gauges["deployments"].labels(*key).set(f.deployments)
        gauges["frequency"].labels(*key).set(f.deployment_frequency_per_day)
        gauges["window"].labels(*key).set((f.until - f.since).total_seconds())
        for name, value in (("lead", f.lead_time_seconds), ("cfr", f.change_failure_rate),
                            ("restore", f.time_to_restore_seconds)):
            if value is not None:
                gauges[name].labels(*key).set(value)
    return registry


def write_textfile(path: Path, figures: Sequence[DoraFigures]) -> None:
    """Write the figures for node-exporter's textfile collector (atomically, as it requires)."""
    write_to_textfile(str(path), prometheus_registry(figures))
