"""Re-authorising an incident ticket for one more emergency promotion.

A ticket opens one emergency promotion (:class:`~portcullis.state.StoreTicketUseStore`). When
an incident really needs a second emergency change, a person eligible on the emergency path
(on call) says so with their verified code; the re-authorisation is kept with the ticket and in
the audit trail, so it shows in the post-incident review.
"""

from __future__ import annotations

from datetime import datetime

from portcullis.approval import (
    configured_directory,
    verify_requester,
)
from portcullis.audit import AuditEntry
from portcullis.errors import PolicyRefusal
from portcullis.incidents import TicketUse
from portcullis.policy import load_policy
from portcullis.settings import Settings
from portcullis.state import open_state


def reauthorise_ticket(
    settings: Settings, ticket: str, approver: str, code: str, reason: str, at: datetime
) -> TicketUse:
    """Verify ``approver`` (code burned, emergency-eligible in prod) and grant ``ticket`` one
    more emergency promotion.

    Raises:
        PolicyRefusal: unknown person, wrong or used code, not eligible on the emergency path.
    """
    policy = load_policy("prod", settings.policy_dir)
    if policy.emergency_approval is None:
        raise PolicyRefusal("prod has no emergency path in its policy")
    directory = configured_directory()
    state = open_state(settings)
    audit = state.audit_log()
    person = verify_requester(directory, approver, code, at, state.replay)
    enrolled = directory.get(person.name)
    if enrolled is None or not policy.emergency_approval.may_approve(enrolled):
        groups = ", ".join(policy.emergency_approval.eligible_groups) or "any"
        raise PolicyRefusal(f"{person.name} may not re-authorise emergency tickets "
                            f"(eligible groups: {groups})")
    use = state.tickets.reauthorise(
        ticket, person.name, reason, at)
    audit.append(AuditEntry(event="emergency.ticket-reauthorised", actor=person.name,
                            environment="prod", details={"ticket": use.ticket, "reason": reason,
                                                         "allowed": use.allowed}))
    return use
