"""The dry run: every gate a promotion of one digest to one environment would meet, now.

Nothing moves: no run is started, nothing is recorded, no code is burned. Each gate answers
PASS, REFUSE (with why) or INFO; the plan refuses when any gate would. The evidence checks are
the deploy side's own (signature, provenance, SBOM, and the scan judged by the *target*
environment's scan policy), run one by one so every failing check is named, not only the
first. Approval eligibility applies the ledger's rules to the directory: authors of any commit
in the change and the requester never approve, nor people outside the policy's groups.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from portcullis.approval import ApprovalPolicy, Approver, ApproverDirectory
from portcullis.audit import AuditTrail
from portcullis.chain import newest_passed
from portcullis.change import change_between, local_repository
from portcullis.errors import PolicyRefusal, PortcullisError
from portcullis.evidence import EvidenceVerifier
from portcullis.freeze import FreezeStatus
from portcullis.models import Frozen, ImageRef
from portcullis.pins import Pin
from portcullis.policy import EnvironmentPolicy
from portcullis.verification import Check, CheckResult, verified_provenance


class Outcome(enum.StrEnum):
    """What a gate would do."""

    PASS = "PASS"
    REFUSE = "REFUSE"
    INFO = "INFO"


class Gate(Frozen):
    """One gate's answer."""

    name: str
    outcome: Outcome
    reason: str


class Plan(Frozen):
    """Every gate for one digest and environment."""

    app: str
    environment: str
    image: str
    at: datetime
    gates: tuple[Gate, ...]

    @property
    def refused(self) -> tuple[Gate, ...]:
        """The gates that would refuse."""
        return tuple(g for g in self.gates if g.outcome is Outcome.REFUSE)

    def render(self) -> str:
        """The plan for a terminal."""
        width = max(len(g.name) for g in self.gates)
        head = (f"plan: {self.app} {self.image} -> {self.environment} "
                f"(at {self.at.isoformat(timespec='seconds')}; nothing is moved)")
        lines = [head]
        lines += [f"  {g.outcome.value:<6} {g.name:<{width}}  {g.reason}" for g in self.gates]
        refused = self.refused
        lines.append(f"would REFUSE at: {', '.join(g.name for g in refused)}" if refused
                     else "every gate would pass")
        return "\n".join(lines) + "\n"


def _chain(chain: Callable[[ImageRef, str], str], image: ImageRef,
           policy: EnvironmentPolicy) -> Gate:
    if policy.promote_from is None:
        return Gate(name="chain", outcome=Outcome.REFUSE,
                    reason=f"{policy.environment} builds from source; it does not take an image")
    try:
        found = chain(image, policy.promote_from)
    except PolicyRefusal as exc:
        return Gate(name="chain", outcome=Outcome.REFUSE, reason=exc.message)
    return Gate(name="chain", outcome=Outcome.PASS,
                reason=f"passed {policy.promote_from}: signed promotion record {found}")


def _freeze(status: FreezeStatus) -> Gate:
    if status.frozen:
        return Gate(name="freeze", outcome=Outcome.REFUSE, reason=status.summary())
    return Gate(name="freeze", outcome=Outcome.PASS, reason=status.summary())


def exclusion(approver: Approver, policy: ApprovalPolicy, *, author: str,
              change_authors: Sequence[str], requester: str | None) -> str | None:
    """Why ``approver`` may not approve this promotion, or None (the ledger's rules, in order)."""
    if approver.is_known_as(author):
        return "wrote the promoted commit"
    wrote = next((a for a in change_authors if approver.is_known_as(a)), None)
    if wrote is not None:
        return f"authored a commit in the change (as {wrote})"
    if requester and approver.is_known_as(requester):
        return "requests this promotion"
    if not policy.may_approve(approver):
        groups = sorted(set(policy.eligible_groups) | set(policy.required_groups))
        return f"not in {', '.join(groups)}"
    return None


def _groups_coverable(groups: Sequence[str], people: Sequence[Approver]) -> bool:
    """Whether each required group can get a distinct eligible member (bipartite matching)."""
    owner: dict[str, str] = {}

    def assign(group: str, seen: set[str]) -> bool:
        for person in people:
            if group in person.groups and person.name not in seen:
                seen.add(person.name)
                if person.name not in owner or assign(owner[person.name], seen):
                    owner[person.name] = group
                    return True
        return False

    return all(assign(group, set()) for group in groups)


def _label(approver: Approver) -> str:
    return f"{approver.name} [{', '.join(approver.groups)}]"


def approval_gate(policy: EnvironmentPolicy, directory: ApproverDirectory | None,
                  author: str | None, change_authors: Sequence[str] | None,
                  requester: str | None) -> Gate:
    """Who may and may not approve, and whether the rule can be met by those who may.

    ``author`` (from the verified provenance) wrote the commit; ``change_authors`` every author
    of the change;
    either None means it is unknown, and then nobody can be shown eligible.
    """
    rule = policy.approval
    if rule is None:
        return Gate(name="approval", outcome=Outcome.PASS, reason=f"no approval required in {policy.environment}")
    need = f"{rule.required_approvals} approval(s)" + (
        f", one each from {', '.join(rule.required_groups)}" if rule.required_groups else "")
    timing = f"wait timer {rule.wait_timer}, timeout {rule.timeout}"
    if directory is None:
        return Gate(name="approval", outcome=Outcome.REFUSE, reason=f"needs {need}; no approver directory is configured")
    if author is None or change_authors is None:
        return Gate(name="approval", outcome=Outcome.REFUSE,
                    reason=f"needs {need}; who wrote the change is unknown (provenance did not verify "
                           "or the source could not be read), so nobody can be shown eligible")
    may, may_not = [], []
    for approver in directory.approvers:
        why = exclusion(approver, rule, author=author,
                        change_authors=change_authors, requester=requester)
        if why is None:
            may.append(approver)
        else:
            may_not.append(f"{approver.name} ({why})")
    text = (f"needs {need} ({timing}); may approve: "
            f"{', '.join(_label(a) for a in may) or 'nobody'}; "
            f"may not: {'; '.join(may_not) or 'nobody'}")
    if len(may) < rule.required_approvals or not _groups_coverable(rule.required_groups, may):
        return Gate(name="approval", outcome=Outcome.REFUSE, reason=f"cannot be met: {text}")
    return Gate(name="approval", outcome=Outcome.PASS, reason=text)


def _canary(policy: EnvironmentPolicy, log: AuditTrail, app: str) -> Gate:
    if policy.target == "gitops":
        return Gate(name="canary", outcome=Outcome.INFO,
                    reason="GitOps target: the digest is committed to the overlay; the cluster's controller rolls it out")
    if policy.canary is None:
        return Gate(name="canary", outcome=Outcome.INFO, reason="no canary: blue/green behind the health check")
    steps = ", ".join(f"{s.weight}% for {s.window_seconds:g}s" for s in policy.canary.steps)
    if newest_passed(log, app, policy.environment) is None:
        return Gate(name="canary", outcome=Outcome.INFO,
                    reason=f"first deploy of {app} here: no stable version to compare with, so no canary ({steps} later)")
    return Gate(name="canary", outcome=Outcome.INFO, reason=f"steps {steps}, each judged against stable")


def evaluate_plan(
    *, app: str, image: ImageRef, policy: EnvironmentPolicy, log: AuditTrail,
    chain: Callable[[ImageRef, str], str], checks: Sequence[Check], evidence: EvidenceVerifier, freeze: Callable[[datetime], FreezeStatus],
    directory: ApproverDirectory | None, sources: Path, requester: str | None, pin: Pin | None,
    at: datetime,
) -> Plan:
    """Evaluate every gate for promoting ``image`` of ``app`` to ``policy.environment`` at ``at``.

    Args:
        app: the app.
        image: the digest-pinned image.
        policy: the target environment's policy (deploy side).
        log: the audit trail (what runs and the canary history come from it, verified).
        chain: checks that the image passed an environment (its signed promotion record);
            returns a description, raises PolicyRefusal naming why not.
        checks: the deploy side's evidence checks for this policy.
        evidence: verifies signatures and attestations with the deploy side's trust roots.
        freeze: the environment's freeze answer (app windows included) for an instant.
        directory: the approver directory, or None when this machine has none.
        sources: where remote source repositories are mirrored to list the change's authors.
        requester: who would request it (excluded from approving), if known.
        pin: the environment's pin, if any.
        at: "now".
    """
    gates: list[Gate] = []
    results: dict[str, CheckResult] = {}
    for check in checks:
        try:
            for result in check.verify(image, evidence):
                results[result.check] = result
                gates.append(Gate(name=result.check, outcome=Outcome.PASS, reason=result.detail))
        except PortcullisError as exc:
            gates.append(Gate(name=check.name, outcome=Outcome.REFUSE, reason=str(exc)))
    gates.append(_chain(chain, image, policy))
    gates.append(_freeze(freeze(at)))
    provenance = verified_provenance([results["provenance"]]) if "provenance" in results else None
    change_authors: tuple[str, ...] | None = None
    if provenance is not None:
        try:
            running = newest_passed(log, app, policy.environment)
            repo = local_repository(provenance.repository, sources)
            change_authors = change_between(repo, provenance.commit, running.commit if running else None).authors
        except PortcullisError as exc:
            gates.append(Gate(name="change", outcome=Outcome.REFUSE, reason=str(exc)))
    gates.append(approval_gate(policy, directory, provenance.author if provenance else None,
                               change_authors, requester))
    gates.append(_canary(policy, log, app))
    if pin is not None:
        gates.append(Gate(name="pin", outcome=Outcome.INFO,
                          reason=f"pinned at {pin.digest[:19]} by {pin.pinned_by} ({pin.reason}): schedules "
                                 "skip it; a person's promotion goes ahead"))
    return Plan(app=app, environment=policy.environment, image=str(image), at=at, gates=tuple(gates))
