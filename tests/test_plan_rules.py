"""The plan's approval rules, without an engine: who may approve, and whether the rule can be met."""

from __future__ import annotations

import pyotp

from portcullis.approval import ApprovalPolicy, Approver, ApproverDirectory
from portcullis.plan import Outcome, approval_gate, exclusion
from portcullis.policy import EnvironmentPolicy

AUTHOR = "Alice Author <alice@example.com>"


def person(name: str, *groups: str) -> Approver:
    return Approver(name=name, groups=groups, aliases=(f"{name}@example.com",),
                    totp_secret=pyotp.random_base32())  # type: ignore[arg-type]


DIRECTORY = ApproverDirectory(approvers=(person("alice", "security"), person("bob", "platform"),
                                         person("carol", "platform"), person("trent")))
PROD = ApprovalPolicy(environment="prod", required_approvals=2, required_groups=("security", "platform"))


def prod_policy() -> EnvironmentPolicy:
    return EnvironmentPolicy.model_validate({
        "environment": "prod", "allowed_branches": ["main"], "allowed_repositories": ["file://*"],
        "approval": PROD.model_dump(exclude={"environment"})})


def test_exclusions_follow_the_ledgers_rules_in_order() -> None:
    alice, bob, carol, trent = DIRECTORY.approvers
    assert exclusion(alice, PROD, author=AUTHOR, change_authors=(), requester=None) == "wrote the promoted commit"
    assert exclusion(bob, PROD, author=AUTHOR, change_authors=("Robert <bob@example.com>",),
                     requester=None) == "authored a commit in the change (as Robert <bob@example.com>)"
    assert exclusion(carol, PROD, author=AUTHOR, change_authors=(), requester="carol") == "requests this promotion"
    assert exclusion(trent, PROD, author=AUTHOR, change_authors=(), requester=None) == "not in platform, security"
    assert exclusion(carol, PROD, author=AUTHOR, change_authors=(), requester="trent") is None


def test_a_rule_that_only_the_author_could_meet_refuses() -> None:
    gate = approval_gate(prod_policy(), DIRECTORY, AUTHOR, (AUTHOR,), "trent")
    # alice is the only security approver and wrote the commit: nobody can cover security.
    assert gate.outcome is Outcome.REFUSE and gate.reason.startswith("cannot be met")
    assert "alice (wrote the promoted commit)" in gate.reason and "trent (requests this promotion)" in gate.reason

    other = "Dana <dana@example.com>"
    gate = approval_gate(prod_policy(), DIRECTORY, other, ("Dana <dana@example.com>",), "trent")
    assert gate.outcome is Outcome.PASS
    assert "may approve: alice [security], bob [platform], carol [platform]" in gate.reason

    # bob and carol are both platform: two platform people never satisfy security + platform
    gate = approval_gate(prod_policy(), DIRECTORY, other, ("Dana <dana@example.com>", "alice@example.com"), None)
    assert gate.outcome is Outcome.REFUSE

    unknown = approval_gate(prod_policy(), DIRECTORY, None, None, None)
    assert unknown.outcome is Outcome.REFUSE and "unknown" in unknown.reason
