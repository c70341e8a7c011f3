"""``python -m portcullis``: the command-line entry point.

It only turns arguments into calls; every user-facing error is caught here, printed, and
turned into a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from portcullis.errors import PortcullisError


def _demo(args: argparse.Namespace) -> int:
    from infra.stack import StackConfig, up

    info = up(StackConfig.from_env())
    os.environ.update(info.env())
    print(f"stack: docker {info.docker_host}, registry {info.registry}, prefect {info.prefect_api_url}")
    from flows.promote import promote

    repo = Path(args.source_repo).resolve()
    result = promote(
        app=args.app, environment=args.environment, source_repo=str(repo), commit=args.commit,
        ref=args.ref, context_path=args.context_path, image=args.image,
        requested_by=args.requested_by, requester_code=args.requester_code,
        force_rebuild=args.force_rebuild,
    )
    if result is None:
        # The commit's digest already runs there; the audit trail and the artifact say which.
        print(f"\n{args.app} in {args.environment}: nothing new (this commit's digest already "
              "runs there and was verified again); pass --force-rebuild to build anyway")
        return 0
    deployment = result.deployment
    if deployment is None:
        print(f"\n{args.app} promoted to {args.environment} by GitOps commit {result.gitops}")
        return 0
    import httpx

    answer = httpx.get(deployment.url + "cgi-bin/hello", timeout=5)
    print(f"\n{args.app} is running in {args.environment}: {deployment.url}")
    print(f"  image   {deployment.image}")
    for check in result.verification:
        print(f"  verified {check.check}: {check.detail}")
    if result.canary is not None:
        print(f"  canary  {result.canary.phase.value}, decided by {result.canary.decided_by}")
        for step in result.canary.steps:
            print(f"          {step[:150]}")
        sent = sum(r.requests for r in result.canary.load)
        failed = sum(r.http_errors + r.socket_errors for r in result.canary.load)
        if sent:
            print(f"          synthetic load through the router: {sent} requests, {failed} failed")
    else:
        print("  canary  none (no canary in this environment's policy, or its first deploy)")
    if result.reused is not None:
        print(f"  build   reused: built before from this commit and base (audit record "
              f"{result.reused.record_seq})")
    if result.built is not None:
        t = result.built.timings
        print(f"  scan    {result.built.scan.summary}")
        print(f"  supply chain {t.wall_seconds:.2f}s wall; tools: sign {t.sign_seconds:.2f}s, "
              f"sbom {t.sbom_tool_seconds:.2f}s, scan {t.scan_tool_seconds:.2f}s, "
              f"attest {t.attest_seconds:.2f}s (sum {t.tools_sum:.2f}s)")
    print(f"  answer  {answer.status_code} {answer.text.strip()}")
    return 0


def _reauthorise(ticket: str, approver: str, code: str, reason: str) -> int:
    from datetime import UTC, datetime

    from portcullis.emergency import reauthorise_ticket
    from portcullis.settings import Settings

    use = reauthorise_ticket(Settings(), ticket, approver, code, reason, datetime.now(UTC))
    print(f"{use.ticket} may now open {use.allowed} emergency promotion(s); "
          f"it has opened {len(use.runs)}")
    return 0


def _code(name: str) -> int:
    import pyotp

    from infra.demo_data import ensure_approvers
    from infra.stack import StackConfig
    from portcullis.approval import ApproverDirectory

    directory = ApproverDirectory.load(ensure_approvers(StackConfig.from_env().state_dir))
    approver = directory.get(name)
    if approver is None:
        raise PortcullisError(f"no approver {name!r} is enrolled on the local stack")
    print(pyotp.TOTP(approver.totp_secret.get_secret_value()).now())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, map errors to exit codes."""
    parser = argparse.ArgumentParser(prog="python -m portcullis")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("promote", help="bring up the local stack and promote an app")
    demo.add_argument("--app", default="hello")
    demo.add_argument("--environment", default="dev", choices=["dev", "staging", "prod"])
    demo.add_argument("--source-repo", default=".")
    demo.add_argument("--commit", default="HEAD")
    demo.add_argument("--ref", default="main")
    demo.add_argument("--context-path", default="examples/hello")
    demo.add_argument("--image", default=None,
                      help="staging/prod: the digest-pinned image that passed the previous environment")
    demo.add_argument("--requested-by", default=os.environ.get("USER", "unknown"),
                      help="who asks for this promotion: your directory id (you can never approve it)")
    demo.add_argument("--requester-code", default="",
                      help="your current authenticator code, proving --requested-by (needed "
                      "where people approve: staging, prod)")
    demo.add_argument("--force-rebuild", action="store_true",
                      help="build even if this commit was built before on the same base image")
    reauth = sub.add_parser(
        "reauthorise-ticket",
        help="let an incident ticket open one more emergency promotion (an on-call approver, verified)")
    reauth.add_argument("ticket")
    reauth.add_argument("--approver", required=True, help="your approver id")
    reauth.add_argument("--code", required=True, help="your current authenticator code")
    reauth.add_argument("--reason", required=True, help="why this ticket needs another emergency promotion")
    code = sub.add_parser("code", help="print an approver's current code (plays their authenticator app on the local stack)")
    code.add_argument("approver")
    args = parser.parse_args(argv)
    try:
        if args.command == "code":
            return _code(args.approver)
        if args.command == "reauthorise-ticket":
            return _reauthorise(args.ticket, args.approver, args.code, args.reason)
        return _demo(args)
    except PortcullisError as exc:
        print(f"portcullis: refused: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
