"""The flows behind ``deployments.yaml``: what people run from the Prefect UI, API and schedules.

* ``build-release`` runs on the **build** work pool (build credentials only): build, sign,
  SBOM, scan, attest.
* ``promote-dev`` / ``promote-staging`` / ``promote-prod`` run on the **deploy** pool (deploy
  credentials only). Each fixes its environment in code: no parameter names an environment.
  ``promote-dev`` hands the build to the build pool with ``run_deployment`` and waits for its
  result; staging and prod never build, they promote a digest that passed the environment
  before (the newest one when a schedule fires without an ``image``).
* ``emergency-promote`` (prod, API-triggered) needs an open P1/P2 incident ticket naming the
  app; it may bypass freeze windows and uses the shorter emergency approval rule, and opens a
  post-incident review due in 48 hours.
* ``post-incident-reviews`` (scheduled) publishes the review status and lists overdue ones.
* ``dora-report`` (scheduled) publishes the DORA figures as an artifact and, where the worker
  is configured with ``PORTCULLIS_DORA_TEXTFILE``, for node-exporter's textfile collector. The
  path comes from the worker, never from a parameter: a caller must not choose where the deploy
  worker writes.
* ``rollback`` / ``clear-pin`` (deploy pool) run :mod:`flows.rollback`'s bodies: a person,
  proven by their requester code where the environment needs approvers, rolls back or unpins.

Each flow checks at run time that it runs under its side's Portcullis worker configuration
(``portcullis.sides.require_worker_run``): the file the worker names, its side, and exactly its
PORTCULLIS_* variables.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from blocks.credentials import BuildCredentials, DeployCredentials
from blocks.incidents import IncidentSystemBlock
from flows.promote import (
    build_with_evidence,
    deploy_built,
    deploy_side,
    establish_requester,
    refusals_recorded,
    require_catalog_source,
    start_run,
)
from flows.rollback import Environment, roll_back, unpin
from portcullis.approval import RequesterProof
from portcullis.chain import newest_passed, running_in
from portcullis.dora import write_textfile
from portcullis.errors import PolicyRefusal, TransientError
from portcullis.gitops import GitOpsCommit
from portcullis.incidents import Emergency, Incident, check_emergency_ticket
from portcullis.models import Deployment, ReusedBuild
from portcullis.policy import emergency_policy, load_policy
from portcullis.results import BuiltEvidence, PromotionResult
from portcullis.reviews import REPORT_ARTIFACT_KEY, render_report
from portcullis.settings import Settings
from portcullis.sides import Side, require_worker_run
from portcullis.state import open_state
from portcullis.summary import skipped_markdown
from tasks.board import dora_now, publish_dora
from tasks.gates import RunAudit, freeze_checker, freeze_gate, open_audit_log
from tasks.promotion import promoted_image

BUILD_DEPLOYMENT = "build-release/build"
#: How often promote-dev asks whether the build run finished (Prefect's default is 5 s).
BUILD_POLL_SECONDS = 1


def _held_by_pin(app: str, environment: str, settings: Settings, audit: RunAudit) -> bool:
    """True (and recorded) when a schedule fired for an environment pinned by a rollback."""
    pin = open_state(settings).pins.get(app, environment)
    if pin is None:
        return False
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run.get_id())))
    if not run.auto_scheduled:
        return False  # a person started this run: promoting over a pin is their decision
    audit.record("promotion.skipped", reason=f"pinned at {pin.digest} by {pin.pinned_by}: {pin.reason}")
    print(f"{app} in {environment} is pinned at {pin.digest} ({pin.reason}); the schedule skips it")
    return True


def _skipped(app: str, environment: str, audit: RunAudit, reason: str) -> None:
    """Record and show that a scheduled run had nothing new to promote."""
    audit.record("promotion.skipped", reason=reason)
    create_markdown_artifact(markdown=skipped_markdown(app, environment, reason),
                             key=f"promotion-{app}-{environment}",
                             description=f"{app}: nothing new for {environment}")
    print(f"{app} in {environment}: nothing to promote: {reason}")


def _side(expected: Side, app: str | None = None, environment: str | None = None) -> None:
    require_worker_run(expected, run_id=str(flow_run.get_id()), app=app, environment=environment)


@flow(name="build-release", log_prints=True, persist_result=True)
def build_release(
    app: str, source_repo: str, commit: str = "HEAD", ref: str = "main",
    context_path: str = ".", environment: str = "dev", force_rebuild: bool = False,
) -> BuiltEvidence | ReusedBuild:
    """Build side: build one commit and attach signed evidence to its digest, unless the
    commit already has a digest on the current base image (then that digest is returned).

    Args:
        app: application name.
        source_repo: git repository with the app's source.
        commit: commit-ish to build.
        ref: branch the commit must be on.
        context_path: directory holding the Dockerfile.
        environment: whose scan policy judges the build (the deploy side judges it again).
        force_rebuild: build even if this commit and base were built before (recorded).

    Returns:
        The digest-pinned build with its scan verdict and timings, or the earlier build reused.
    """
    _side("build", app, environment)
    settings = Settings()
    policy = load_policy(environment, settings.policy_dir)
    audit = RunAudit(open_audit_log(settings), str(flow_run.get_id()), app, environment)
    with refusals_recorded(audit):
        return build_with_evidence(app, source_repo, commit, ref, context_path, policy,
                                   settings, audit, BuildCredentials.resolve(None), force_rebuild)


def _build_on_build_pool(app: str, source_repo: str, commit: str, ref: str, context_path: str,
                         force_rebuild: bool) -> BuiltEvidence | ReusedBuild:
    run = run_deployment(
        BUILD_DEPLOYMENT, timeout=1800, poll_interval=BUILD_POLL_SECONDS, as_subflow=True,
        parameters={"app": app, "source_repo": source_repo, "commit": commit, "ref": ref,
                    "context_path": context_path, "environment": "dev",
                    "force_rebuild": force_rebuild},
    )
    state = run.state  # type: ignore[union-attr]
    if state is None or not state.is_completed():
        message = state.message if state else "no state"
        raise PolicyRefusal(f"the build on the build pool did not complete: {message}")
    result = state.result()
    if not isinstance(result, BuiltEvidence | ReusedBuild):
        raise TransientError(f"the build run returned {type(result).__name__}, not a build")
    return result


@flow(name="promote-dev", log_prints=True)
def promote_dev(
    app: str = "hello", source_repo: str = ".", commit: str = "HEAD", ref: str = "main",
    context_path: str = "examples/hello", requested_by: str = "scheduler",
    requester_code: str = "", force_rebuild: bool = False,
) -> PromotionResult | None:
    """Deploy side: build on the build pool, then gate and deploy to dev.

    A commit that already has a digest on the current base image is not built again; when
    that digest already runs in dev, it is verified again and nothing is redeployed.

    Args:
        app: application name.
        source_repo: git repository (as the build worker sees it).
        commit: commit-ish to build.
        ref: branch the commit must be on.
        context_path: directory holding the Dockerfile.
        requested_by: who triggered it (their directory id); they can never approve it. A
            run the server's scheduler created is the scheduler's, whatever this says.
        requester_code: their current code, proving ``requested_by``.
        force_rebuild: build even if this commit and base were built before, e.g. for a
            patched base image (recorded).

    Returns:
        The promotion's result, or None when a rollback pin held the environment or the
        commit's digest already runs in dev.
    """
    _side("deploy", app, "dev")
    settings, policy, audit = start_run(app, "dev", requested_by, commit=commit,
                                        force_rebuild=force_rebuild)
    with refusals_recorded(audit):
        requester = establish_requester(policy, requested_by, requester_code, audit)
        # Here too, not only on the build side: refused before anything is handed over.
        require_catalog_source(app, source_repo, context_path)
        if _held_by_pin(app, "dev", settings, audit):
            return None
        creds = DeployCredentials.resolve(None)
        freeze_gate("run-start", freeze_checker(policy, creds), audit)
        built = _build_on_build_pool(app, source_repo, commit, ref, context_path, force_rebuild)
        if isinstance(built, ReusedBuild):
            audit.record("build.reused", image=str(built.image), build_record=built.record_seq,
                         base_image=built.base_image, reason="the build side found this commit "
                         "built before on the same base")
        else:
            audit.record("build.received", image=str(built.build.image), scan=built.scan.summary)
        return deploy_built(app, "dev", built, requester, creds, settings, policy, audit)


def _promote_passed(app: str, environment: str, image: str | None, requested_by: str,
                    requester_code: str) -> PromotionResult | None:
    _side("deploy", app, environment)
    settings, policy, audit = start_run(app, environment, requested_by, image=image)
    with refusals_recorded(audit):
        requester = establish_requester(policy, requested_by, requester_code, audit)
        if requester.proof is RequesterProof.SCHEDULE and image is not None:
            # A scheduled run's parameters can be edited through the API before it starts; the
            # schedule promotes the newest digest that passed, never one someone slipped in.
            raise PolicyRefusal(
                f"a scheduled {environment} run takes no image (it was given {image}); it "
                f"promotes the newest digest that passed {policy.promote_from}",
                hint="start a manual run with your requester code to promote a chosen digest",
            )
        if _held_by_pin(app, environment, settings, audit):
            return None
        creds = DeployCredentials.resolve(None)
        freeze_gate("run-start", freeze_checker(policy, creds), audit)
        if image is None:
            # A schedule fired: take the newest digest that passed the environment before.
            newest = newest_passed(audit.log, app, policy.promote_from or "")
            if newest is None or newest.digest is None:
                _skipped(app, environment, audit, f"nothing of {app} has passed {policy.promote_from} yet")
                return None
            # What runs now, rollbacks included: not merely the last digest promoted there.
            current = running_in(audit.log, app, environment)
            if current is not None and current.digest == newest.digest:
                _skipped(app, environment, audit,
                         f"{newest.digest}, the newest digest that passed "
                                f"{policy.promote_from} (audit record {newest.seq}), already runs in "
                         f"{environment} (audit record {current.seq})")
                return None
            image = str(newest.details.get("image") or "")
            if not image:
                raise PolicyRefusal(f"the {policy.promote_from} record of {newest.digest} names no image")
        target = promoted_image(policy, image, audit, creds)
        return deploy_side(app, environment, target, None, requester, creds, settings, policy, audit)


@flow(name="promote-staging", log_prints=True, persist_result=True)
def promote_staging(
    app: str = "hello", image: str | None = None, requested_by: str = "scheduler",
    requester_code: str = "",
) -> PromotionResult | None:
    """Deploy side: promote a digest that passed dev (default: the newest) to staging.

    Args:
        app: application name.
        image: digest-pinned image; None takes the newest that passed dev.
        requested_by: who triggered it (their directory id); they can never approve it.
        requester_code: their current code, proving ``requested_by`` (not needed when the
            server's scheduler created the run).

    Returns:
        The promotion's result, or None when there was nothing new to promote.
    """
    return _promote_passed(app, "staging", image, requested_by, requester_code)


@flow(name="promote-prod", log_prints=True, persist_result=True)
def promote_prod(
    app: str = "hello", image: str | None = None, requested_by: str = "scheduler",
    requester_code: str = "",
) -> PromotionResult | None:
    """Deploy side: promote a digest that passed staging (default: the newest) to prod.

    Args:
        app: application name.
        image: digest-pinned image; None takes the newest that passed staging.
        requested_by: who triggered it (their directory id); they can never approve it.
        requester_code: their current code, proving ``requested_by`` (not needed when the
            server's scheduler created the run).

    Returns:
        The promotion's result, or None when there was nothing new to promote.
    """
    return _promote_passed(app, "prod", image, requested_by, requester_code)


@flow(name="emergency-promote", log_prints=True, persist_result=True)
def emergency_promote(
    app: str, image: str, incident_ticket: str, justification: str, requested_by: str,
    requester_code: str = "",
) -> PromotionResult:
    """Deploy side, API-triggered: an emergency change to prod under an incident ticket.

    Expedited, never bypassed: the requester proves who they are and can never approve, so a
    second person (on call) must; the ticket serves this one promotion and is read again right
    before traffic moves; the digest must have passed dev; skipping staging is recorded in the
    post-incident review.

    Args:
        app: the service being fixed; the ticket must name it.
        image: digest-pinned image that passed dev, with full evidence (signature, provenance
            from an allowed branch, SBOM, scan without CRITICAL findings).
        incident_ticket: an open P1/P2 incident in the incident system.
        justification: why this cannot wait for the normal path.
        requested_by: who triggered it (their directory id); they can never approve it.
        requester_code: their current code, proving ``requested_by``.

    Returns:
        The promotion's result.
    """
    _side("deploy", app, "prod")
    if not justification.strip():
        raise PolicyRefusal("an emergency promotion needs a justification")
    settings, normal, audit = start_run(app, "prod", requested_by, image=image,
                                        ticket=incident_ticket, justification=justification)
    with refusals_recorded(audit):
        policy = emergency_policy(normal)
        requester = establish_requester(policy, requested_by, requester_code, audit)
        incidents = IncidentSystemBlock.resolve(None).get_client()

        def check_ticket(stage: str) -> Incident:
            incident = incidents.get(incident_ticket)
            try:
                check_emergency_ticket(incident, app, datetime.now(UTC),
                                       max_age=normal.emergency_ticket_max_age)
            except PolicyRefusal as exc:
                audit.record("emergency.ticket-refused", stage=stage, ticket=incident_ticket,
                             reason=str(exc))
                raise
            audit.record("emergency.ticket-verified", stage=stage, ticket=incident.number,
                         priority=incident.priority_label, state=incident.state_label)
            return incident

        incident = check_ticket("run-start")
        creds = DeployCredentials.resolve(None)
        target = promoted_image(policy, image, audit, creds)
        use = open_state(settings).tickets.claim(
            incident.number, str(flow_run.get_id()))
        audit.record("emergency.ticket-claimed", ticket=incident.number, runs=list(use.runs),
                     allowed=use.allowed)
        review = open_state(settings).reviews.open_review(
            ticket=incident.number, app=app, environment="prod", digest=target.digest,
            flow_run_id=str(flow_run.get_id()), skipped_environments=("staging",),
        )
        audit.record("emergency.review-opened", ticket=incident.number, due=review.due_at.isoformat(),
                     skipped=["staging"])
        emergency = Emergency(ticket=incident.number, justification=justification,
                              incident_summary=incident.short_description)

        def recheck_before_traffic() -> None:
            # The ticket may have been closed while the approval waited.
            check_ticket("before-traffic")

        return deploy_side(app, "prod", target, None, requester, creds, settings, policy, audit,
                           emergency=emergency, before_traffic=recheck_before_traffic)


@flow(name="post-incident-reviews", log_prints=True)
def post_incident_reviews() -> int:
    """Scheduled: publish the post-incident review status; returns how many are overdue."""
    _side("deploy")
    settings = Settings()
    store = open_state(settings).reviews
    now = datetime.now(UTC)
    overdue = store.overdue(now)
    create_markdown_artifact(key=REPORT_ARTIFACT_KEY, markdown=render_report(store.reviews(), now),
                             description=f"{len(overdue)} overdue post-incident review(s)")
    for review in overdue:
        print(f"OVERDUE: post-incident review of {review.ticket} ({review.app} {review.digest[:19]}) was due {review.due_at.isoformat()}")
    return len(overdue)


@flow(name="dora-report", log_prints=True)
def dora_report(days: int = 30) -> int:
    """Publish the DORA figures of the last ``days`` days; returns how many series.

    Args:
        days: the window, ending now.
    """
    _side("deploy")
    figures = dora_now(days=days)
    publish_dora(figures)
    textfile = os.environ.get("PORTCULLIS_DORA_TEXTFILE")
    if textfile:
        write_textfile(Path(textfile), figures)
        print(f"wrote {len(figures)} series to {textfile}")
    return len(figures)


@flow(name="rollback", log_prints=True)
def rollback_deployed(
    app: str, environment: Environment, reason: str, requested_by: str, requester_code: str = "",
) -> Deployment | GitOpsCommit:
    """Roll ``app`` in ``environment`` back to the digest it ran before, and pin it.

    Args:
        app: application name.
        environment: dev, staging or prod.
        reason: why (kept in the audit trail and on the pin).
        requested_by: who asks (their directory id); recorded as the pin's owner.
        requester_code: their current code, proving ``requested_by`` (required where the
            environment's promotions need approvers).

    Returns:
        What runs now (Docker targets), or the revert commit (GitOps targets).
    """
    _side("deploy", app, environment)
    return roll_back(app, environment, reason, requested_by, requester_code)


@flow(name="clear-pin", log_prints=True)
def clear_pin_deployed(
    app: str, environment: Environment, requested_by: str, requester_code: str = "",
) -> str:
    """Let scheduled promotions touch ``app`` in ``environment`` again.

    Args:
        app: application name.
        environment: dev, staging or prod.
        requested_by: who asks (their directory id).
        requester_code: their current code, proving ``requested_by`` (required where the
            environment's promotions need approvers).

    Returns:
        The digest the pin held.
    """
    _side("deploy", app, environment)
    return unpin(app, environment, requested_by, requester_code)
