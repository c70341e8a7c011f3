"""Manual rollback: return an environment to its previous good digest and pin it there.

The previous digest is the one recorded on the serving container when it replaced the
version before it. A Docker-target rollback attaches a signed rollback record to the digest
(what was rolled back to, from what, and why; see tasks/promotion.py). It is verified again (signature, provenance, SBOM, scan) before it runs:
a rollback never deploys what would not pass verification today. The pin stops scheduled
promotions from undoing the rollback until someone clears it with ``clear-pin``.

Who asks is proven like a promotion's requester (:func:`flows.promote.establish_requester`):
where the environment's promotions need approvers, a rollback or an unpin without a verified
requester code is refused before anything changes, because the pin and the signed rollback
record name that person. The flows here run in-process (CLI, tests); the deployments run
:mod:`flows.deployed`'s wrappers, which first check that they run on the deploy worker.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from blocks.credentials import DeployCredentials
from flows.promote import establish_requester, refusals_recorded, start_run
from portcullis.approval import Requester, RequesterProof
from portcullis.errors import PolicyRefusal
from portcullis.gitops import GitOpsCommit
from portcullis.models import Deployment, ImageRef
from portcullis.pins import Pin
from portcullis.policy import EnvironmentPolicy
from portcullis.settings import Settings
from portcullis.state import open_state
from portcullis.targets import deploy_target
from portcullis.verification import verified_provenance
from tasks.board import publish_board
from tasks.canary import switch_to
from tasks.deploy import LABEL_PREVIOUS, LABEL_REVISION, find_live
from tasks.gates import RunAudit, environment_lock
from tasks.gitops import revert_promotion
from tasks.promotion import complete_rollback
from tasks.supply_chain import verify_and_record

Environment = Literal["dev", "staging", "prod"]


@flow(name="rollback", log_prints=True)
def rollback(
    app: str, environment: Environment, reason: str, requested_by: str, requester_code: str = "",
) -> Deployment | GitOpsCommit:
    """In-process twin of the ``rollback`` deployment (CLI, tests): see
    :func:`flows.deployed.rollback_deployed`, which checks its worker first."""
    return roll_back(app, environment, reason, requested_by, requester_code)


def roll_back(app: str, environment: str, reason: str, requested_by: str,
              requester_code: str) -> Deployment | GitOpsCommit:
    """The body of the ``rollback`` flow (see :func:`rollback`), for either entrypoint."""
    if not reason.strip():
        raise PolicyRefusal("a rollback needs a reason")
    settings, policy, audit = start_run(app, environment, requested_by, rollback_reason=reason)
    with refusals_recorded(audit):
        requester = _person(policy, requested_by, requester_code, audit, "rollback")
        target = deploy_target(policy, settings)
        if target.kind == "gitops":
            return _rollback_gitops(app, environment, reason, requester.name, settings, audit)
        # The deploy worker's own credentials (its trust roots among them), never a block a
        # run names: a parameter is whatever the caller of the Prefect API typed.
        creds = DeployCredentials.resolve(None)
        client = creds.docker_client()
        try:
            live = find_live(client, app, environment)
        finally:
            client.close()
        if live is None:
            raise PolicyRefusal(f"nothing of {app} runs in {environment}: nothing to roll back")
        previous = live.container.labels.get(LABEL_PREVIOUS) or ""
        if not previous:
            raise PolicyRefusal(
                f"{app} in {environment} has no previous digest recorded: it is the first deploy",
            )
        current = ImageRef.parse(str(live.container.attrs["Config"]["Image"]))
        image = current.model_copy(update={"digest": previous})
        audit = audit.about(image.digest)
        with environment_lock(environment, audit):
            checks = verify_and_record(image, policy, audit, creds, "rollback")
            commit = verified_provenance(checks).commit
            audit = audit.about(image.digest, commit)
            router = target.router
            deployment = switch_to(
                image, app, environment, commit, creds,
                router=router if router is not None and router.running() else None,
                record=audit.record,
            )
            audit.record("rollback.completed", rolled_back_from=live.digest, url=deployment.url,
                         reason=reason, commit_before=live.container.labels.get(LABEL_REVISION))
            complete_rollback(audit, image, policy, checks, commit=commit,
                              rolled_back_from=live.digest, reason=reason,
                              requested_by=requester.name, deployed_to=deployment.url,
                              credentials=creds)
        open_state(settings).pins.pin(Pin(
            app=app, environment=environment, digest=image.digest, pinned_by=requester.name,
            reason=reason,
        ))
        audit.record("environment.pinned", actor=requester.name, reason=reason)
        publish_board()
        print(f"{app} in {environment} rolled back to {image.digest} and pinned")
        return deployment


def _person(policy: EnvironmentPolicy, requested_by: str, requester_code: str, audit: RunAudit,
            what: str) -> Requester:
    requester = establish_requester(policy, requested_by, requester_code, audit)
    if requester.proof is RequesterProof.SCHEDULE:
        # Anyone with the Prefect API can add a schedule to a deployment; a schedule is
        # trusted to promote what passed, never to roll back or unpin on nobody's word.
        raise PolicyRefusal(
            f"a {what} is a person's decision, but the Prefect scheduler created this run",
            hint=f"remove the schedule from the {what} deployment and start the run yourself "
                 "with requested_by and your requester_code")
    return requester


def _rollback_gitops(app: str, environment: str, reason: str, requested_by: str,
                     settings: Settings, audit: RunAudit) -> GitOpsCommit:
    # Pull-based: rolling back is a revert commit the controller applies.
    with environment_lock(environment, audit):
        commit = revert_promotion(environment, reason, flow_run.get_flow_run_ui_url())
        audit = audit.about(commit.digest)
        audit.record("rollback.completed", gitops_commit=commit.sha, reason=reason)
    open_state(settings).pins.pin(Pin(
        app=app, environment=environment, digest=commit.digest, pinned_by=requested_by,
        reason=reason,
    ))
    audit.record("environment.pinned", actor=requested_by, reason=reason)
    publish_board()
    return commit


@flow(name="clear-pin", log_prints=True)
def clear_pin(app: str, environment: Environment, requested_by: str, requester_code: str = "") -> str:
    """In-process twin of the ``clear-pin`` deployment (CLI, tests): see
    :func:`flows.deployed.clear_pin_deployed`, which checks its worker first."""
    return unpin(app, environment, requested_by, requester_code)


def unpin(app: str, environment: str, requested_by: str, requester_code: str) -> str:
    """The body of the ``clear-pin`` flow (see :func:`clear_pin`), for either entrypoint."""
    settings, policy, audit = start_run(app, environment, requested_by, clear_pin=True)
    with refusals_recorded(audit):
        requester = _person(policy, requested_by, requester_code, audit, "clear-pin")
        pin = open_state(settings).pins.clear(app, environment)
        audit.about(pin.digest).record("environment.unpinned", actor=requester.name, pinned_by=pin.pinned_by)
        publish_board()
        return pin.digest
