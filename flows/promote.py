"""The promote flow: the promotion DAG as thin Prefect glue.

    freeze? ─ build ─┬─ sign + provenance ───────────────────────────┬─ verify ─ freeze? ─ approval
                     └─ export ─ SBOM ─┬─ attest SBOM                │      ─ [lock: freeze? ─ verify
                                       └─ scan ─ attest scan ─ gate ─┘         ─ deploy] ─ record

Environments with ``promote_from`` in their policy (staging, prod) never build: they take a
digest that completed a promotion to the previous environment, and run the same gates on it.
Each stage takes earlier stages' frozen results and returns its own. The environment's policy
comes from the deploy side's policy directory by name; no parameter can weaken it. Every
decision goes to the hash-chained audit log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import JsonValue

from blocks.credentials import BuildCredentials, DeployCredentials
from portcullis.approval import (
    ApprovalOutcome,
    ApprovalSubject,
    Requester,
    RequesterProof,
    configured_directory,
)
from portcullis.canary.metrics import PrometheusProvider
from portcullis.catalog import catalog_freeze, load_catalog
from portcullis.chain import running_in
from portcullis.change import WhatChanged, change_between, local_repository
from portcullis.errors import ConfigurationError, PolicyRefusal, PortcullisError, VerificationFailed
from portcullis.gitops import GitOpsCommit
from portcullis.incidents import Emergency
from portcullis.models import Deployment, ImageRef, ReusedBuild
from portcullis.policy import EnvironmentPolicy, load_policy
from portcullis.results import BuiltEvidence, CanaryReport, PromotionResult, SupplyChainTimings
from portcullis.settings import Settings
from portcullis.state import replay_store_for
from portcullis.summary import skipped_markdown, summary_markdown
from portcullis.targets import TrafficRouter, deploy_target
from portcullis.verification import VerifiedProvenance, verified_provenance
from tasks.approval import (
    canary_decision_policy,
    decide_inconclusive_canary,
    request_approvals,
    requester_for_current_run,
    subject_for_current_run,
    waits_durably,
)
from tasks.board import BoardPublishingLog, publish_board
from tasks.build import build_image, find_reusable_build
from tasks.canary import rollout_with_person, traffic_lease_seconds
from tasks.deploy import deploy
from tasks.gates import (
    DEFAULT_WINDOW_SECONDS,
    RunAudit,
    environment_lock,
    freeze_checker,
    freeze_gate,
    open_audit_log,
)
from tasks.gitops import commit_promotion
from tasks.progress import StageProgress
from tasks.promotion import complete_promotion, promoted_image
from tasks.scan import generate_sbom_task, scan_task
from tasks.supply_chain import (
    attest_sbom,
    attest_scan,
    compare_with_running,
    export_image_archive,
    sign_image_and_provenance,
    verify_and_record,
)

Environment = Literal["dev", "staging", "prod"]


def reuse_or_force(
    app: str, source_repo: str, commit: str, ref: str, context_path: str, audit: RunAudit,
    creds: BuildCredentials, force_rebuild: bool,
) -> ReusedBuild | None:
    """The digest this commit already has on the current base (recorded as ``build.reused``),
    or None when it must be built; ``force_rebuild`` always builds, and says so."""
    if force_rebuild:
        audit.record("build.forced", reason="force_rebuild: built even if this commit and base "
                     "were built before (e.g. for a patched base image)")
        return None
    reused = find_reusable_build(app, source_repo, commit, ref, context_path, audit.log, creds)
    if reused is not None:
        audit.about(reused.image.digest, reused.commit).record(
            "build.reused", image=str(reused.image), base_image=reused.base_image,
            build_record=reused.record_seq,
            reason=f"commit {reused.commit[:12]} on base {reused.base_image} was built "
            f"before as this digest (audit record {reused.record_seq}); the build is "
            "reproducible, so building again would give the same digest")
    return reused


def require_catalog_source(app: str, source_repo: str, context_path: str) -> None:
    """Refuse to build a catalog app from anywhere but its entry (see
    :meth:`portcullis.catalog.Catalog.source_refusal`); the catalog is this side's own file."""
    refusal = load_catalog().source_refusal(app, source_repo, context_path)
    if refusal is not None:
        raise PolicyRefusal(refusal, hint="promote the app from its catalog entry; moving it "
                            "means changing apps.toml, which is reviewed like code")


def build_with_evidence(
    app: str, source_repo: str, commit: str, ref: str, context_path: str,
    policy: EnvironmentPolicy, settings: Settings, audit: RunAudit, creds: BuildCredentials,
    force_rebuild: bool = False,
) -> BuiltEvidence | ReusedBuild:
    """Build, then sign + provenance in parallel with SBOM -> scan; attest everything.

    A commit already built on the current base image is not built again: its digest comes
    back as a :class:`ReusedBuild` (unless ``force_rebuild``).
    """
    require_catalog_source(app, source_repo, context_path)
    reused = reuse_or_force(app, source_repo, commit, ref, context_path, audit, creds, force_rebuild)
    if reused is not None:
        return reused
    build = build_image(app, source_repo, commit, ref, context_path, creds)
    audit = audit.about(build.image.digest, build.source.commit)
    audit.record("build.completed", image=str(build.image), ref=build.source.ref,
                 author=build.source.author, source=build.source.repo_url,
                 context=build.source.context_path, base_image=build.base_image,
                 forced=force_rebuild)

    started = time.monotonic()
    # Per run: builds are reproducible, so two runs of one commit share a digest and must not
    # write the same archive and SBOM at the same time.
    work = settings.scratch / f"{build.image.digest.removeprefix('sha256:')[:16]}-{audit.run_id[:8]}"
    sbom_path = work / "sbom.cdx.json"
    signed = sign_image_and_provenance.submit(build, creds, flow_run.get_flow_run_ui_url())
    archive = export_image_archive.submit(build, work, creds)
    # Prefect resolves futures passed as arguments; its stubs only know plain values.
    sbom = generate_sbom_task.submit(build.image, archive, sbom_path, settings.trivy_cache)  # type: ignore[call-overload]
    sbom_attested = attest_sbom.submit(build.image, sbom, creds)
    scanned = scan_task.submit(build.image, sbom_path, settings.trivy_cache, policy.scan,  # type: ignore[call-overload]
                               wait_for=[sbom])
    scan_attested = attest_scan.submit(build.image, scanned, creds)
    signature, provenance = signed.result()
    audit.record("signature.created", signature=signature.location, provenance=provenance.location)
    outcome = scanned.result()
    sbom_att, scan_att = sbom_attested.result(), scan_attested.result()
    audit.record("scan.verdict", passed=outcome.verdict.passed, summary=outcome.verdict.summary,
                 attestation=scan_att.location, sbom=sbom_att.location)
    timings = SupplyChainTimings(
        wall_seconds=time.monotonic() - started,
        sign_seconds=signature.seconds + provenance.seconds,
        sbom_tool_seconds=sbom.result().tool_seconds,
        scan_tool_seconds=outcome.report.tool_seconds,
        attest_seconds=sbom_att.seconds + scan_att.seconds,
    )
    # The failing verdict is already signed and attached: the refusal itself is evidence.
    outcome.verdict.require_pass()
    return BuiltEvidence(build=build, scan=outcome.verdict, timings=timings)


def establish_requester(
    policy: EnvironmentPolicy, requested_by: str, requester_code: str, audit: RunAudit,
) -> Requester:
    """Who asked for this promotion, proven before any work is done (see
    :func:`tasks.approval.requester_for_current_run`), and recorded."""
    if (earlier := audit.earlier("requester.established")) is not None:
        # Resumed after a wait: the requester was proven (and the code burned) before it.
        return Requester(name=str(earlier.details["requester"]),
                         proof=RequesterProof(str(earlier.details["proof"])))
    must_verify = policy.approval is not None
    directory = replay = None
    if must_verify or requester_code.strip():
        directory = configured_directory()
        replay = replay_store_for(audit.log)
    try:
        requester = requester_for_current_run(requested_by, requester_code, directory=directory,
                                              replay=replay, must_verify=must_verify)
    except PolicyRefusal as exc:
        audit.record("requester.refused", actor="unverified", claimed=requested_by, reason=str(exc))
        raise
    audit.record("requester.established", actor=requester.name if requester.verified else "unverified",
                 requester=requester.name, proof=requester.proof.value)
    return requester


def _what_changed(app: str, environment: str, image: ImageRef, provenance: VerifiedProvenance,
                  settings: Settings, audit: RunAudit, creds: DeployCredentials,
                  *, required: bool) -> WhatChanged:
    """What this promotion changes against the version running in the environment: the
    commits and who wrote them, the base image, the scan findings that appear or disappear.

    With ``required`` (a person approves), unreadable commits refuse the promotion: the
    approvers' own commits could hide in them. Otherwise they are shown as unknown.
    """
    # A run resumed after a wait has listed its change already; it shows it again unchanged.
    listed_before = audit.earlier("change.listed") is not None
    running = running_in(audit.log, app, environment)
    running_image = (image.model_copy(update={"digest": running.digest})
                     if running is not None and running.digest else None)
    what = compare_with_running(image, running_image, creds)
    try:
        repo = local_repository(provenance.repository, settings.home / "sources")
        change = change_between(repo, provenance.commit, running.commit if running else None)
    except PolicyRefusal as exc:
        if required:
            raise
        audit.record("change.unknown", reason=str(exc))
        return what.model_copy(update={"change_problem": str(exc)})
    if not listed_before:
        audit.record("change.listed", base=change.base, commits=change.commits,
                     authors=list(change.authors), running=what.running_digest,
                     base_before=what.base_before, base_after=what.base_after,
                     findings_new=[f.vulnerability_id for f in what.findings_new],
                     findings_gone=[f.vulnerability_id for f in what.findings_gone])
    return what.model_copy(update={"change": change})


def deploy_built(
    app: str, environment: str, built: BuiltEvidence | ReusedBuild, requester: Requester,
    creds: DeployCredentials, settings: Settings, policy: EnvironmentPolicy, audit: RunAudit,
) -> PromotionResult | None:
    """Deploy side after a build or a reuse. A digest that already runs in the environment
    (a reused build, or a forced rebuild that reproduced it) is verified again and not
    redeployed: nothing new, nothing done (None)."""
    fresh: BuiltEvidence | None = None
    reused: ReusedBuild | None = None
    if isinstance(built, BuiltEvidence):
        fresh, image, commit = built, built.build.image, built.build.source.commit
    else:
        reused, image, commit = built, built.image, built.commit
    audit = audit.about(image.digest, commit)
    running = running_in(audit.log, app, environment)
    if running is None or running.digest != image.digest:
        return deploy_side(app, environment, image, fresh, requester, creds,
                           settings, policy, audit, reused=reused)
    checks = verify_and_record(image, policy, audit, creds, "already-running")
    how = "reused" if reused is not None else "rebuilt (forced) to the same digest"
    reason = (f"{image.digest} (commit {commit[:12]}, {how}) already runs in {environment} "
              f"(audit record {running.seq}); nothing new to deploy")
    audit.record("promotion.skipped", reason=reason)
    create_markdown_artifact(
        markdown=skipped_markdown(app, environment, reason, image=image, checks=checks,
                                  reused=reused),
        key=f"promotion-{app}-{environment}", description=f"{app}: nothing new for {environment}")
    print(f"{app}: {reason}")
    return None


def deploy_side(
    app: str,
    environment: str,
    image: ImageRef,
    built: BuiltEvidence | None,
    requester: Requester,
    deploy_creds: DeployCredentials,
    settings: Settings,
    policy: EnvironmentPolicy,
    audit: RunAudit,
    *,
    emergency: Emergency | None = None,
    before_traffic: Callable[[], None] | None = None,
    reused: ReusedBuild | None = None,
) -> PromotionResult:
    """Everything after the build, on the deploy side: verify, freeze, approve, lock, deploy.

    Uses only the deploy side's credentials. With ``emergency`` the freeze windows are recorded as
    bypassed instead of enforced; every other gate runs. ``before_traffic`` is a last gate
    run under the lock right before anything changes (the emergency path re-reads its ticket).
    ``reused`` names the earlier build whose digest this is, for the summary.
    """
    checks = verify_and_record(image, policy, audit.about(image.digest), deploy_creds,
                               "before-approval", once=True)
    provenance = verified_provenance(checks)
    if audit.commit is not None and audit.commit != provenance.commit:
        raise VerificationFailed(
            "provenance", image.digest,
            f"its signed provenance names commit {provenance.commit}, but this run built or "
            f"reused it as commit {audit.commit}")
    # From here on every record names the digest and the commit its verified provenance gives.
    audit = audit.about(image.digest, provenance.commit)
    frozen = freeze_checker(policy, deploy_creds)

    def freeze(stage: str) -> None:
        if emergency is None:
            freeze_gate(stage, frozen, audit)
            return
        status = frozen(datetime.now(UTC))
        audit.record("freeze.bypassed", stage=stage, ticket=emergency.ticket,
                     frozen=status.frozen, summary=status.summary())

    # Listed before anyone is asked and before traffic moves: it is compared with what runs now.
    what = _what_changed(app, environment, image, provenance, settings, audit, deploy_creds,
                         required=policy.approval is not None)
    subject_cache: list[ApprovalSubject] = []

    def subject() -> ApprovalSubject:
        if not subject_cache:
            if what.change is None:
                # Only without an approval rule can the change be unknown; a person asked to
                # decide an Inconclusive canary must still not have authored any of it.
                raise PolicyRefusal(f"the change cannot be listed, so no person can be asked to "
                                    f"decide on it: {what.change_problem}")
            subject_cache.append(subject_for_current_run(
                app=app, environment=environment, digest=image.digest,
                commit=provenance.commit, author=provenance.author, requester=requester,
                change_authors=what.change.authors,
            ))
        return subject_cache[0]

    approved_by: tuple[str, ...] = ()
    if policy.approval is not None:
        freeze("before-approval")
        outcome: ApprovalOutcome = request_approvals(
            subject(), policy.approval, configured_directory(), BoardPublishingLog(audit.log),
            freeze=None if emergency else frozen, change=what,
            poll_interval=int(settings.approval_poll_seconds),
        )
        approved_by = tuple(a.approver for a in outcome.approvals)

    with environment_lock(environment, audit, window_seconds=_lock_window(policy)):
        # Re-check after the lock: time passed while waiting for approvals and the slot.
        freeze("before-traffic")
        checks = verify_and_record(image, policy, audit, deploy_creds, "after-lock")
        if before_traffic is not None:
            before_traffic()
        canary_report: CanaryReport | None = None
        gitops: GitOpsCommit | None = None
        deployment: Deployment | None = None
        target = deploy_target(policy, settings)
        if target.kind == "gitops":
            # Pull-based: the controller in the cluster applies what this commit pins.
            gitops = commit_promotion(app, environment, image, provenance.commit,
                                      flow_run.get_flow_run_ui_url() or str(flow_run.get_id()),
                                      approved_by, canary=policy.canary)
        elif target.router is None:
            deployment = deploy(image, app, environment, provenance.commit, deploy_creds,
                                approved_by=approved_by)
        else:
            deployment, canary_report = _canary(
                image, app, environment, provenance.commit, deploy_creds, policy, settings,
                audit, approved_by, subject, target.router)
        # Signs the promotion record the next environment trusts, then records COMPLETED.
        complete_promotion(audit, image, policy, checks, approved_by, commit=provenance.commit,
                           requested_by=requester.name, deployment=deployment, gitops=gitops,
                           canary=canary_report, ticket=emergency.ticket if emergency else None,
                           credentials=deploy_creds)

    result = PromotionResult(
        app=app, environment=environment, image=image, commit=provenance.commit,
        built=built, verification=tuple(checks), approved_by=approved_by,
        deployment=deployment, gitops=gitops, canary=canary_report,
        policy_sha256=policy.policy_sha256, reused=reused, change=what,
    )
    create_markdown_artifact(
        markdown=summary_markdown(result), key=f"promotion-{app}-{environment}",
        description=f"{app} {image.digest[:19]} promoted to {environment}",
    )
    publish_board()
    where = deployment.url if deployment else f"GitOps commit {gitops.sha[:12] if gitops else '?'}"
    print(f"{app} {image} promoted to {environment}: {where}")
    return result


def _lock_window(policy: EnvironmentPolicy) -> float:
    """The lock's heartbeat window: the canary's own window where there is a canary."""
    if policy.canary is None:
        return DEFAULT_WINDOW_SECONDS
    return traffic_lease_seconds(policy.canary)


def _canary(
    image: ImageRef, app: str, environment: str, commit: str, creds: DeployCredentials,
    policy: EnvironmentPolicy, settings: Settings, audit: RunAudit, approved_by: tuple[str, ...],
    subject: Callable[[], ApprovalSubject], router: TrafficRouter,
) -> tuple[Deployment, CanaryReport | None]:
    """Roll out behind the router with canary analysis; a person decides an Inconclusive."""
    assert policy.canary is not None
    if not settings.prometheus_url:
        raise ConfigurationError(
            f"{environment} requires a canary but no Prometheus is configured",
            hint="set PORTCULLIS_PROMETHEUS_URL (the local stack does)",
        )
    provider = PrometheusProvider(settings.prometheus_url)

    def person(analysis: str) -> tuple[Literal["promote", "rollback"], str]:
        return decide_inconclusive_canary(
            subject(), canary_decision_policy(environment, policy.approval, timedelta(hours=1)),
            configured_directory(), BoardPublishingLog(audit.log), analysis,
            poll_interval=int(settings.approval_poll_seconds),
        )

    progress = StageProgress(f"canary-{app}-{environment}", f"canary of {app} {image.digest[:19]} in {environment}",
                             len(policy.canary.steps))
    record = progress.tracking(audit.record, "canary.step",
                               lambda d: f"{d.get('weight')}% of traffic: {d.get('phase')}")
    try:
        return rollout_with_person(
            image, app, environment, commit, creds, policy=policy.canary, router=router,
            provider=provider, audit=audit, record=record, ask=person, durable=waits_durably(),
            approved_by=approved_by,
        )
    finally:
        provider.close()


def start_run(app: str, environment: str, requested_by: str, **details: JsonValue) -> tuple[Settings, EnvironmentPolicy, RunAudit]:
    """Load settings and the environment's policy, open the audit trail, record the start."""
    settings = Settings()
    # The app's own catalog freeze windows add to the environment's (never remove any).
    policy = catalog_freeze(load_policy(environment, settings.policy_dir), app)
    audit = RunAudit(open_audit_log(settings), str(flow_run.get_id()), app, environment)
    # A run that waited without a process starts again from the top when it is resumed.
    event = "promotion.resumed" if audit.earlier("promotion.started") else "promotion.started"
    audit.record(event, actor=requested_by, policy_sha256=policy.policy_sha256, **details)
    return settings, policy, audit


@contextmanager
def refusals_recorded(audit: RunAudit) -> Iterator[None]:
    """Every refusal, whatever stage raised it, ends up in the audit trail."""
    try:
        yield
    except PortcullisError as exc:
        audit.as_far_as_recorded().record("promotion.refused", reason=str(exc),
                                          kind=type(exc).__name__)
        publish_board()
        raise


@flow(name="promote", log_prints=True)
def promote(
    app: str = "hello",
    environment: Environment = "dev",
    source_repo: str = ".",
    commit: str = "HEAD",
    ref: str = "main",
    context_path: str = "examples/hello",
    image: str | None = None,
    requested_by: str = "unknown",
    requester_code: str = "",
    build_credentials_block: str | None = None,
    deploy_credentials_block: str | None = None,
    force_rebuild: bool = False,
) -> PromotionResult | None:
    """Promote ``app`` to ``environment`` through every gate, both sides in this process.

    This is the local stack's flow (one machine holds both credential sets). The deployments
    in ``deployments.yaml`` split the same stages across a build and a deploy work pool.

    Args:
        app: application name (also the registry repository name).
        environment: dev, staging or prod; selects the policy file, nothing else.
        source_repo: git repository with the app's source (building environments only).
        commit: commit-ish to build; pinned to a full id before anything else.
        ref: branch the commit must be on.
        context_path: directory holding the Dockerfile.
        image: for environments that promote (staging, prod): the digest-pinned image that
            passed the previous environment. Building environments refuse it.
        requested_by: who asked for the promotion (their directory id); they can never
            approve it.
        requester_code: their current code, proving ``requested_by`` (required where a
            person must approve).
        build_credentials_block: saved build credentials; None reads PORTCULLIS_BUILD_*.
        deploy_credentials_block: saved deploy credentials; None reads PORTCULLIS_DEPLOY_*.
        force_rebuild: build even when this commit already has a digest on the current base
            image (recorded in the audit trail).

    Returns:
        What was built or promoted, what was verified, who approved, where it runs; None
        when the commit's digest already runs in the environment (nothing new to do).
    """
    settings, policy, audit = start_run(app, environment, requested_by, image=image,
                                        commit=commit if image is None else None,
                                        force_rebuild=force_rebuild)
    with refusals_recorded(audit):
        requester = establish_requester(policy, requested_by, requester_code, audit)
        # Each side's credentials are resolved once here and passed to the stages as objects.
        deploy_creds = DeployCredentials.resolve(deploy_credentials_block)
        freeze_gate("run-start", freeze_checker(policy, deploy_creds), audit)
        if policy.promote_from is None:
            if image is not None:
                raise PolicyRefusal(f"{environment} builds from source; it does not take an image")
            built = build_with_evidence(app, source_repo, commit, ref, context_path, policy,
                                        settings, audit,
                                        BuildCredentials.resolve(build_credentials_block),
                                        force_rebuild)
            return deploy_built(app, environment, built, requester, deploy_creds,
                                settings, policy, audit)
        target = promoted_image(policy, image, audit, deploy_creds)
        return deploy_side(app, environment, target, None, requester,
                           deploy_creds, settings, policy, audit)
