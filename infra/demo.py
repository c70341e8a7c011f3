"""Demo commands for the local stack: ``python -m infra.demo promote|code``.

``promote`` brings the stack up (idempotently), points this process at it, runs the promote
flow and prints what runs where, with what the canary measured and what the stack's users
(``infra/loadgen.py``) saw of it. ``code NAME`` plays a demo approver's authenticator app.

On a real deploy worker each approver's TOTP secret lives in that person's authenticator app;
the local stack enrolls its demo approvers itself (:func:`infra.demo_data.ensure_approvers`),
so ``code`` prints the current code. None of this is part of the product: nothing in
``portcullis/`` can read an approver's secret for someone or start the local stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pyotp

from infra.demo_data import ensure_approvers
from infra.loadgen import LoadGenerator, front_door
from infra.stack import StackConfig, up
from portcullis.approval import ApproverDirectory
from portcullis.errors import PortcullisError


def current_code(name: str, state_dir: Path) -> str:
    """The current TOTP code of the demo approver ``name`` enrolled in ``state_dir``."""
    directory = ApproverDirectory.load(ensure_approvers(state_dir))
    approver = directory.get(name)
    if approver is None:
        raise PortcullisError(f"no approver {name!r} is enrolled on the local stack",
                              hint="see .stack/deploy-side/approvers.toml for who is")
    return pyotp.TOTP(approver.totp_secret.get_secret_value()).now()


def promote_on_stack(args: argparse.Namespace) -> int:
    """Bring the stack up, promote as ``args`` say, print where it runs and how it went."""
    info = up(StackConfig.from_env())
    os.environ.update(info.env())
    print(f"stack: docker {info.docker_host}, registry {info.registry}, prefect {info.prefect_api_url}")
    # Imported once the environment points at the stack: settings are read at import.
    import httpx

    from flows.promote import promote
    from portcullis.catalog import load_catalog, probe_paths, repository_location

    catalog = load_catalog()
    users = LoadGenerator(Path(info.load_status).parent)
    door = front_door(catalog, args.app, args.environment)
    before = users.counts(door)
    # A catalog app is built from its entry (anything else is refused); others from ".".
    entry = catalog.get(args.app)
    if args.source_repo or entry is None:
        repo = repository_location(args.source_repo or ".", Path.cwd())
    else:
        repo = entry.source_repo(catalog.base)
    context = args.context_path or (entry.context if entry else ".")
    result = promote(
        app=args.app, environment=args.environment, source_repo=repo, commit=args.commit,
        ref=args.ref, context_path=context, image=args.image,
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
    answer = httpx.get(deployment.url.rstrip("/") + probe_paths(args.app).load, timeout=5)
    print(f"\n{args.app} is running in {args.environment}: {deployment.url}")
    print(f"  image   {deployment.image}")
    for check in result.verification:
        print(f"  verified {check.check}: {check.detail}")
    if result.canary is not None:
        print(f"  canary  {result.canary.phase.value}, decided by {result.canary.decided_by}")
        for step in result.canary.steps:
            print(f"          {step[:150]}")
        seen = users.counts(door).since(before)
        if seen.requests:
            print(f"          the stack's users during the promotion: {seen.requests} requests "
                  f"through the front door, {seen.failed} failed")
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m infra.demo promote [...]`` and ``code NAME`` (the stack in
    ``PORTCULLIS_HOME``, default .stack)."""
    parser = argparse.ArgumentParser(prog="python -m infra.demo",
                                     description="Helpers for the local demo stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("promote", help="bring up the local stack and promote an app")
    demo.add_argument("--app", default="hello")
    demo.add_argument("--environment", default="dev", choices=["dev", "staging", "prod"])
    demo.add_argument("--source-repo", default=None,
                      help="default: the app's catalog entry (for an app outside it: .)")
    demo.add_argument("--commit", default="HEAD")
    demo.add_argument("--ref", default="main")
    demo.add_argument("--context-path", default=None,
                      help="default: the app's catalog entry (for an app outside it: .)")
    demo.add_argument("--image", default=None,
                      help="staging/prod: the digest-pinned image that passed the previous environment")
    demo.add_argument("--requested-by", default=os.environ.get("USER", "unknown"),
                      help="who asks for this promotion: your directory id (you can never approve it)")
    demo.add_argument("--requester-code", default="",
                      help="your current authenticator code, proving --requested-by (needed "
                      "where people approve: staging, prod)")
    demo.add_argument("--force-rebuild", action="store_true",
                      help="build even if this commit was built before on the same base image")
    code = sub.add_parser("code", help="print an approver's current code (plays their "
                          "authenticator app on the local stack)")
    code.add_argument("approver")
    args = parser.parse_args(argv)
    try:
        if args.command == "promote":
            return promote_on_stack(args)
        print(current_code(args.approver, StackConfig.from_env().state_dir))
    except PortcullisError as exc:
        print(f"infra.demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
