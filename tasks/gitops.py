"""Prefect glue for the GitOps target: promotion is a commit, rollback is its revert.

What is written and how pushes race is in :mod:`portcullis.gitops`; these tasks only load the
block, call the target and log the result. Only transient failures (remote unreachable, the
branch kept moving) are retried; a missing overlay or a conflicting change never is.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from prefect import get_run_logger, task

from blocks.gitops import GitOpsTargetBlock
from portcullis.canary.analysis import CanaryPolicy
from portcullis.gitops import GitOpsCommit, TraceAnnotations
from portcullis.models import ImageRef
from tasks.retry import only_transient


@task(name="gitops-commit-promotion", retries=2, retry_delay_seconds=3,
      retry_condition_fn=only_transient)
def commit_promotion(
    app: str,
    environment: str,
    image: ImageRef,
    source_commit: str,
    flow_run_url: str,
    approved_by: Sequence[str],
    gitops_block: str | None = None,
    image_name: str | None = None,
    canary: CanaryPolicy | None = None,
) -> GitOpsCommit:
    """Pin ``image`` in the environment's overlay of the GitOps repository and push.

    Args:
        app: the application.
        environment: the overlay to change (``overlays/<environment>``).
        image: the digest-pinned image that passed every gate.
        source_commit: the full commit id the image was built from.
        flow_run_url: link to this flow run, written into the overlay and the commit.
        approved_by: approver ids accepted by the approval gate (empty if none was required).
        gitops_block: saved GitOpsTargetBlock name; None reads ``PORTCULLIS_GITOPS_*``.
        image_name: the image name used in the base manifests; default ``app``.
        canary: the environment's canary policy, rendered into the overlay as an Argo
            Rollouts Rollout with its AnalysisTemplate; None pins the digest only.

    Returns:
        The pushed commit (sha, digest, message, where it went).
    """
    target = GitOpsTargetBlock.resolve(gitops_block).get_target()
    trace = TraceAnnotations(
        commit=source_commit,
        flow_run_url=flow_run_url,
        approved_by=tuple(approved_by),
        deployed_at=datetime.now(UTC),
    )
    pushed = target.promote(app, environment, image, trace, image_name=image_name, canary=canary)
    get_run_logger().info(
        "committed %s for %s/%s to %s (%d push attempt(s))",
        pushed.sha[:12], app, environment, pushed.pushed_to, pushed.push_attempts,
    )
    return pushed


@task(name="gitops-revert-promotion", retries=2, retry_delay_seconds=3,
      retry_condition_fn=only_transient)
def revert_promotion(
    environment: str,
    reason: str,
    flow_run_url: str | None = None,
    gitops_block: str | None = None,
) -> GitOpsCommit:
    """Revert the newest not-yet-reverted Portcullis promotion of ``environment`` and push.

    Args:
        environment: the overlay to roll back.
        reason: why (one line, kept in the commit message).
        flow_run_url: link to the flow run that decided the rollback.
        gitops_block: saved GitOpsTargetBlock name; None reads ``PORTCULLIS_GITOPS_*``.

    Returns:
        The pushed revert commit; its ``digest`` is what the overlay pins now.
    """
    target = GitOpsTargetBlock.resolve(gitops_block).get_target()
    pushed = target.rollback(environment, reason=reason, flow_run_url=flow_run_url)
    get_run_logger().warning(
        "reverted the newest promotion of %s: %s now pins %s (%s)",
        environment, pushed.sha[:12], pushed.digest, reason,
    )
    return pushed
