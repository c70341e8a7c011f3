"""Manual rollback: return an environment to its previous good digest and pin it there.

The previous digest is the one recorded on the serving container when it replaced the
version before it. A Docker-target rollback attaches a signed rollback record to the digest
(what was rolled back to, from what, and why; see tasks/promotion.py). It is verified again (signature, provenance, SBOM, scan) before it runs:
a rollback never deploys what would not pass verification today. The pin stops scheduled
promotions from undoing the rollback until someone clears it with ``clear-pin``.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from blocks.credentials import DeployCredentials
from flows.promote import refusals_recorded, start_run
from portcullis.errors import PolicyRefusal
from portcullis.gitops import GitOpsCommit
from portcullis.models import Deployment, ImageRef
from portcullis.pins import Pin
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
    app: str, environment: Environment, reason: str, requested_by: str,
) -> Deployment | GitOpsCommit:
    """Roll ``app`` in ``environment`` back to the digest it ran before, and pin it.

    Args:
        app: application name.
        environment: dev, staging or prod.
        reason: why (kept in the audit trail and on the pin).
        requested_by: who asked; recorded as the pin's owner.

    Returns:
        What runs now (Docker targets), or the revert commit (GitOps targets).
    """
    if not reason.strip():
        raise PolicyRefusal("a rollback needs a reason")
    settings, policy, audit = start_run(app, environment, requested_by, rollback_reason=reason)
    with refusals_recorded(audit):
        target = deploy_target(policy, settings)
        if target.kind == "gitops":
            return _rollback_gitops(app, environment, reason, requested_by, settings, audit)
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
                              requested_by=requested_by, deployed_to=deployment.url,
                              credentials=creds)
        open_state(settings).pins.pin(Pin(
            app=app, environment=environment, digest=image.digest, pinned_by=requested_by,
            reason=reason,
        ))
        audit.record("environment.pinned", actor=requested_by, reason=reason)
        publish_board()
        print(f"{app} in {environment} rolled back to {image.digest} and pinned")
        return deployment


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
def clear_pin(app: str, environment: Environment, requested_by: str) -> str:
    """Let scheduled promotions touch ``app`` in ``environment`` again.

    Returns:
        The digest the pin held.
    """
    settings, _, audit = start_run(app, environment, requested_by, clear_pin=True)
    with refusals_recorded(audit):
        pin = open_state(settings).pins.clear(app, environment)
        audit.about(pin.digest).record("environment.unpinned", actor=requested_by, pinned_by=pin.pinned_by)
        publish_board()
        return pin.digest
