"""The Markdown a promotion leaves behind as its Prefect artifact: what was promoted, how it
was verified, who approved, where it runs; or why a run had nothing new to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from portcullis.approval import render_what_changed
from portcullis.models import ImageRef, ReusedBuild
from portcullis.results import PromotionResult
from portcullis.verification import CheckResult


def summary_markdown(result: PromotionResult) -> str:
    """The promotion summary shown as a Prefect artifact."""
    deployment = result.deployment
    gitops = result.gitops
    rows = [
        ("app", result.app),
        ("environment", result.environment),
        ("image", f"`{result.image}`"),
        ("commit", f"`{result.commit}`"),
        *[(f"verified: {c.check}", c.detail) for c in result.verification],
        ("approved by", ", ".join(result.approved_by) or "no approval required"),
        ("running at", deployment.url if deployment else f"GitOps: {gitops.pushed_to if gitops else '?'}"),
        ("rollback target", f"`{deployment.previous_digest}`" if deployment and deployment.previous_digest
         else ("revert of the overlay commit" if gitops else "none (first deploy)")),
        ("policy sha256", f"`{result.policy_sha256[:16]}`"),
        ("deployed at", deployment.deployed_at.isoformat() if deployment else "applied by the GitOps controller"),
    ]
    if result.canary is not None:
        rows.append(("canary", f"{result.canary.phase.value} (decided by {result.canary.decided_by})"))
        rows.extend((f"canary step {i}", step) for i, step in enumerate(result.canary.steps))
    if result.built is not None:
        t = result.built.timings
        rows.insert(4, ("scan", result.built.scan.summary))
        rows.append(("supply chain", f"{t.wall_seconds:.2f}s wall vs {t.tools_sum:.2f}s of tool time"))
    if result.reused is not None:
        rows.insert(4, ("build", _reused_text(result.reused)))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    change = "\n".join(render_what_changed(result.change)) + "\n" if result.change else ""
    return f"# Promoted {result.app} to {result.environment}\n\n| | |\n|---|---|\n{table}\n\n{change}"


def _reused_text(reused: ReusedBuild) -> str:
    return (f"reused, not rebuilt: commit `{reused.commit[:12]}` on base `{reused.base_image}` was "
            f"built as this digest at {reused.built_at.isoformat()} (audit record {reused.record_seq})")


def skipped_markdown(app: str, environment: str, reason: str, *, image: ImageRef | None = None,
                     checks: Sequence[CheckResult] = (), reused: ReusedBuild | None = None) -> str:
    """The artifact of a run that had nothing new to do: why, and what was re-verified."""
    rows = [("app", app), ("environment", environment), ("skipped because", reason)]
    if image is not None:
        rows.append(("image", f"`{image}`"))
    if reused is not None:
        rows.append(("build", _reused_text(reused)))
    rows += [(f"re-verified: {c.check}", c.detail) for c in checks]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Nothing to promote: {app} in {environment}\n\n| | |\n|---|---|\n{table}\n"
