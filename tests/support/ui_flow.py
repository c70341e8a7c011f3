"""A small flow that waits for one approval, run as its own process by the UI test.

It must be a separate process, not a thread of the test: it talks to the test's Prefect
server through ``PREFECT_API_URL`` exactly as a worker-run flow would, and the browser
resumes it through that server's UI.

Usage::

    PREFECT_API_URL=http://127.0.0.1:PORT/api python -m tests.support.ui_flow \\
        --run-name NAME --audit AUDIT.jsonl --approvers APPROVERS.toml

Exits 0 when the approval was granted, printing the approvers as a JSON list; non-zero when
the promotion was refused or timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

from prefect import flow

from portcullis.approval import ApprovalPolicy, ApproverDirectory, Requester, RequesterProof
from portcullis.audit import AuditLog
from tasks.approval import request_approvals, subject_for_current_run

APP = "ui-demo"
ENVIRONMENT = "staging"
DIGEST = "sha256:" + "c0ffee42" * 8
COMMIT = "a1" * 20
AUTHOR = "Ada Author <ada@example.com>"
REQUESTED_BY = "trent"
POLL_INTERVAL = 2


@flow(name="ui-approval-gate", persist_result=False)
def ui_gate(audit_path: str, approvers_path: str, timeout_s: int) -> list[str]:
    """Ask for one staging approval the way the promotion flow does.

    Args:
        audit_path: the audit log file to write.
        approvers_path: the approver directory (TOML, mode 0600).
        timeout_s: seconds the approvers have.

    Returns:
        the ids of the approvers whose approval was accepted.
    """
    policy = ApprovalPolicy(
        environment=ENVIRONMENT,
        required_approvals=1,
        timeout=timedelta(seconds=timeout_s),
    )
    subject = subject_for_current_run(
        app=APP,
        environment=ENVIRONMENT,
        digest=DIGEST,
        commit=COMMIT,
        author=AUTHOR,
        requester=Requester(name=REQUESTED_BY, proof=RequesterProof.TOTP),
    )
    outcome = request_approvals(
        subject,
        policy,
        ApproverDirectory.load(Path(approvers_path)),
        AuditLog(Path(audit_path)),
        poll_interval=POLL_INTERVAL,
    )
    return [a.approver for a in outcome.approvals]


def main(argv: list[str] | None = None) -> int:
    """Run :func:`ui_gate` once under the given flow run name.

    Args:
        argv: command line arguments (default: ``sys.argv[1:]``).

    Returns:
        the process exit code: 0 granted, 1 not granted.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--audit", required=True)
    parser.add_argument("--approvers", required=True)
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args(argv)
    state = ui_gate.with_options(flow_run_name=args.run_name)(
        args.audit, args.approvers, args.timeout, return_state=True
    )
    if not state.is_completed():
        print(f"flow run ended {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
