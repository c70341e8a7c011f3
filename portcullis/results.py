"""What a promotion's stages hand on: the build side's evidence, the canary's report, and
everything a promotion decided. Immutable; the summary (:mod:`portcullis.summary`) and the
signed promotion record are made from them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from portcullis.canary.analysis import AnalysisPhase
from portcullis.change import WhatChanged
from portcullis.gitops import GitOpsCommit
from portcullis.models import BuildResult, Deployment, Frozen, ImageRef, ReusedBuild
from portcullis.scan import ScanVerdict
from portcullis.verification import CheckResult


class CanaryReport(Frozen):
    """What the canary analysis decided, step by step, and how fast it acted."""

    phase: AnalysisPhase
    reason: str
    steps: tuple[str, ...]
    decided_by: str = Field(default="analysis", description="'analysis' or a verified approver")
    seconds_to_stable: float | None = Field(
        default=None, description="from the start of the failing window to 100% on stable"
    )
    verdict_at: float | None = Field(
        default=None, exclude=True,
        description="time.monotonic() of a failing verdict, to time the way back to stable")

    @model_validator(mode="before")
    @classmethod
    def _without_retired_load(cls, data: Any) -> Any:
        # Reports written before the product stopped generating traffic carried the
        # generator's totals as "load". A run that suspended for an Inconclusive canary then
        # and resumes now reads its report back from the audit trail; the totals are not part
        # of the decision, so they are dropped rather than refused.
        if isinstance(data, dict) and "load" in data:
            return {k: v for k, v in data.items() if k != "load"}
        return data


class SupplyChainTimings(Frozen):
    """Wall time of the supply-chain stages against the sum of the tools' own times."""

    wall_seconds: float
    sign_seconds: float
    sbom_tool_seconds: float
    scan_tool_seconds: float
    attest_seconds: float

    @property
    def tools_sum(self) -> float:
        """What the stages would take one after another."""
        return self.sign_seconds + self.sbom_tool_seconds + self.scan_tool_seconds + self.attest_seconds


class BuiltEvidence(Frozen):
    """What the build side produced for a new digest."""

    build: BuildResult
    scan: ScanVerdict
    timings: SupplyChainTimings


class PromotionResult(Frozen):
    """Everything a promotion decided."""

    app: str
    environment: str
    image: ImageRef
    commit: str
    built: BuiltEvidence | None
    verification: tuple[CheckResult, ...]
    approved_by: tuple[str, ...]
    deployment: Deployment | None = Field(description="what runs, for Docker targets")
    gitops: GitOpsCommit | None = Field(default=None, description="the overlay commit, for GitOps targets")
    canary: CanaryReport | None = None
    policy_sha256: str
    reused: ReusedBuild | None = Field(default=None, description="set when no new build was needed")
    change: WhatChanged | None = Field(default=None, description="what changed since the running version")
