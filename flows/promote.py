"""The promote flow: the promotion DAG as thin Prefect glue.

    build ─┬─ sign + provenance ──────────────────────────┬─ verify ─ deploy
           └─ export ─ SBOM ─┬─ attest SBOM               │
                             └─ scan ─ attest scan ─ gate ┘

Each stage takes the previous stages' frozen results and returns its own. The environment's
policy is loaded from the deploy side's policy directory by name; no parameter can weaken it.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from portcullis.models import BuildResult, Deployment, Frozen
from portcullis.policy import load_policy
from portcullis.scan import ScanVerdict
from portcullis.settings import Settings
from portcullis.verification import CheckResult
from tasks.build import build_image
from tasks.deploy import deploy
from tasks.scan import generate_sbom_task, scan_task
from tasks.supply_chain import (
    attest_sbom,
    attest_scan,
    export_image_archive,
    sign_image_and_provenance,
    verify_evidence,
)

Environment = Literal["dev", "staging", "prod"]


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


class PromotionResult(Frozen):
    """Everything a promotion decided."""

    build: BuildResult
    deployment: Deployment
    verification: tuple[CheckResult, ...]
    scan: ScanVerdict
    timings: SupplyChainTimings
    policy_sha256: str


def summary_markdown(result: PromotionResult) -> str:
    """The promotion summary shown as a Prefect artifact."""
    build, deployment = result.build, result.deployment
    rows = [
        ("app", build.app),
        ("environment", deployment.environment),
        ("image", f"`{build.image}`"),
        ("commit", f"`{build.source.commit}` on `{build.source.ref}`"),
        ("author", build.source.author),
        ("scan", result.scan.summary),
        *[(f"verified: {c.check}", c.detail) for c in result.verification],
        ("running at", deployment.url),
        ("rollback target", f"`{deployment.previous_digest}`" if deployment.previous_digest else "none (first deploy)"),
        ("policy sha256", f"`{result.policy_sha256[:16]}`"),
        ("supply chain", f"{result.timings.wall_seconds:.2f}s wall vs {result.timings.tools_sum:.2f}s of tool time"),
        ("deployed at", deployment.deployed_at.isoformat()),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Promoted {build.app} to {deployment.environment}\n\n| | |\n|---|---|\n{table}\n"


@flow(name="promote", log_prints=True)
def promote(
    app: str = "hello",
    environment: Environment = "dev",
    source_repo: str = ".",
    commit: str = "HEAD",
    ref: str = "main",
    context_path: str = "examples/hello",
    build_credentials_block: str | None = None,
    deploy_credentials_block: str | None = None,
) -> PromotionResult:
    """Promote ``app`` at ``commit`` to ``environment`` through every gate.

    Args:
        app: application name (also the registry repository name).
        environment: dev, staging or prod; selects the policy file, nothing else.
        source_repo: git repository with the app's source.
        commit: commit-ish to build; pinned to a full id before anything else.
        ref: branch the commit must be on.
        context_path: directory holding the Dockerfile.
        build_credentials_block: saved build credentials; None reads PORTCULLIS_BUILD_*.
        deploy_credentials_block: saved deploy credentials; None reads PORTCULLIS_DEPLOY_*.

    Returns:
        The build, what was verified, where it runs and the rollback target.
    """
    settings = Settings()
    policy = load_policy(environment, settings.policy_dir)
    build = build_image(app, source_repo, commit, ref, context_path, build_credentials_block)

    started = time.monotonic()
    work = settings.scratch / build.image.digest.removeprefix("sha256:")[:16]
    sbom_path = work / "sbom.cdx.json"
    run_url = flow_run.get_flow_run_ui_url()
    signed = sign_image_and_provenance.submit(build, build_credentials_block, run_url)
    archive = export_image_archive.submit(build, work, build_credentials_block)
    sbom = generate_sbom_task.submit(build.image, archive, sbom_path, settings.trivy_cache)
    sbom_attested = attest_sbom.submit(build.image, sbom, build_credentials_block)
    scanned = scan_task.submit(build.image, sbom_path, settings.trivy_cache, policy.scan,
                               wait_for=[sbom])
    scan_attested = attest_scan.submit(build.image, scanned, build_credentials_block)
    signature, provenance = signed.result()
    outcome = scanned.result()
    sbom_att, scan_att = sbom_attested.result(), scan_attested.result()
    timings = SupplyChainTimings(
        wall_seconds=time.monotonic() - started,
        sign_seconds=signature.seconds + provenance.seconds,
        sbom_tool_seconds=sbom.result().tool_seconds,
        scan_tool_seconds=outcome.report.tool_seconds,
        attest_seconds=sbom_att.seconds + scan_att.seconds,
    )
    # The failing verdict is already signed and attached: the refusal itself is evidence.
    outcome.verdict.require_pass()

    checks = verify_evidence(build.image, policy, deploy_credentials_block)
    deployment = deploy(build.image, app, environment, build.source.commit, deploy_credentials_block)
    result = PromotionResult(
        build=build, deployment=deployment, verification=tuple(checks), scan=outcome.verdict,
        timings=timings, policy_sha256=policy.policy_sha256,
    )
    create_markdown_artifact(
        markdown=summary_markdown(result),
        key=f"promotion-{app}-{environment}",
        description=f"{app} {build.image.digest[:19]} promoted to {environment}",
    )
    print(f"{app} {build.image} runs in {environment} at {deployment.url}")
    return result
