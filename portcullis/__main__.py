"""``python -m portcullis``: the command-line entry point.

It only turns arguments into calls; every user-facing error is caught here, printed, and
turned into a non-zero exit code. It is product only: promoting on the local stack (which it
brings up first) is ``python -m infra.demo promote``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from pathlib import Path

from portcullis.errors import PortcullisError


def _reauthorise(ticket: str, approver: str, code: str, reason: str) -> int:
    from datetime import UTC, datetime

    from portcullis.emergency import reauthorise_ticket
    from portcullis.settings import Settings

    use = reauthorise_ticket(Settings(), ticket, approver, code, reason, datetime.now(UTC))
    print(f"{use.ticket} may now open {use.allowed} emergency promotion(s); "
          f"it has opened {len(use.runs)}")
    return 0


def _status() -> int:
    from portcullis.board import render_text
    from tasks.board import current_board

    print(render_text(current_board()), end="")
    return 0


def _plan(app: str, environment: str, image: str, requested_by: str | None) -> int:
    from datetime import UTC, datetime

    from pydantic import ValidationError

    from blocks.credentials import DeployCredentials
    from portcullis.approval import ApproverDirectory, configured_directory
    from portcullis.catalog import catalog_freeze
    from portcullis.errors import ConfigurationError
    from portcullis.models import ImageRef
    from portcullis.plan import evaluate_plan
    from portcullis.policy import load_policy
    from portcullis.settings import Settings
    from portcullis.state import open_state
    from tasks.gates import freeze_checker, open_audit_log
    from tasks.promotion import passed_record
    from tasks.supply_chain import verification_policy

    settings = Settings()
    policy = load_policy(environment, settings.policy_dir)
    creds = DeployCredentials.resolve(None)
    directory: ApproverDirectory | None
    try:
        directory = configured_directory()
    except (ConfigurationError, ValidationError):
        directory = None  # the plan says that approvals cannot be shown eligible
    with creds.registry_client() as client:
        plan = evaluate_plan(
            app=app, image=ImageRef.parse(image), policy=policy, log=open_audit_log(settings),
            chain=lambda candidate, passed: passed_record(candidate, passed, app, creds),
            checks=verification_policy(policy).checks, evidence=creds.evidence_verifier(client),
            freeze=freeze_checker(catalog_freeze(policy, app), creds), directory=directory,
            sources=settings.home / "sources", requester=requested_by,
            pin=open_state(settings).pins.get(app, environment), at=datetime.now(UTC),
        )
    print(plan.render(), end="")
    return 3 if plan.refused else 0


def _code_of(person: str) -> str:
    """``person``'s current authenticator code, kept off the command line (ps, shell history):
    asked for on a terminal, else read from a pipe."""
    return getpass.getpass(f"{person}'s code: ") if sys.stdin.isatty() else sys.stdin.readline().strip()


def _approve(args: argparse.Namespace) -> int:
    from tasks.answer import submit_answer, waiting_runs

    runs = waiting_runs(args.app, args.environment, wait=args.wait)
    if args.run:
        runs = [r for r in runs if str(r.id) == args.run or r.name == args.run]
    if not runs:
        raise PortcullisError(f"no promotion of {args.app} to {args.environment} waits for an answer",
                              hint="`python -m portcullis status` shows what waits where")
    run = runs[0]
    if len(runs) > 1:
        print(f"{len(runs)} runs wait; answering the newest, {run.name} (choose with --run)")
    print(f"{run.flow} run {run.name} ({run.id}) asks:\n")
    # The form is Markdown with escapes; a terminal shows the text.
    text = re.sub(r"\\(.)", r"\1", run.description)
    print("\n".join(f"    {line}" for line in text.splitlines()), "\n")
    code = args.code if args.code is not None else _code_of(args.approver)
    answer = {"approver": args.approver, "code": code, "digest_prefix": args.digest_prefix,
              "decision": args.decision, "comment": args.comment}
    print(submit_answer(run, answer))
    return 0


def _history(app: str, environment: str | None) -> int:
    from portcullis.audit import AuditRecord
    from portcullis.settings import Settings
    from tasks.board import verified_records

    shown = ("promotion.completed", "promotion.refused", "promotion.skipped", "rollback.completed",
             "canary.rolled-back", "environment.pinned", "environment.unpinned")
    records = [r for r in verified_records(Settings()) if r.app == app]
    requester = {r.run_id: r.actor for r in records if r.event == "promotion.started"}

    def line(r: AuditRecord) -> str:
        d = r.details
        approvers = d.get("approved_by")
        who = ", ".join(str(a) for a in approvers) if isinstance(approvers, list) else ""
        why = str(d.get("reason") or "")[:90]
        return (f"  {r.at.isoformat(timespec='seconds')}  {r.event:<20} {(r.digest or '-')[7:19]:<12} "
                f"{(r.commit or '-')[:8]:<8} by {requester.get(r.run_id, r.actor)}"
                + (f"; approved {who}" if who else "") + (f"; {why}" if why else ""))

    for env in ([environment] if environment else ["dev", "staging", "prod"]):
        mine = [line(r) for r in records if r.environment == env and r.event in shown]
        print(f"{app} in {env}:" + ("" if mine else " nothing yet"))
        for text in mine:
            print(text)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from flows.rollback import rollback

    code = _code_of(args.requested_by) if args.ask_code else ""
    result = rollback(app=args.app, environment=args.environment, reason=args.reason,
                      requested_by=args.requested_by, requester_code=code)
    print(f"{args.app} in {args.environment} now runs {getattr(result, 'image', None) or result}; "
          "pinned against schedules until `clear-pin`")
    return 0


def _dora(days: int, textfile: Path | None, publish: bool) -> int:
    from portcullis.dora import render_markdown, write_textfile
    from tasks.board import dora_now, publish_dora

    figures = dora_now(days=days)
    print(render_markdown(figures), end="")
    if textfile is not None:
        write_textfile(textfile, figures)
        print(f"wrote {len(figures)} series to {textfile} (node-exporter textfile collector)")
    if publish:
        publish_dora(figures)
    return 0


def _verify_promotion(args: argparse.Namespace) -> int:
    from blocks.credentials import DeployCredentials
    from portcullis.models import ImageRef
    from portcullis.promotion_record import verify_promotion
    from portcullis.signing.cosign_format import load_public_key_file

    creds = DeployCredentials.resolve(args.credentials_block)
    keys = ([load_public_key_file(k) for k in args.key] if args.key
            else creds.promotion_trust_root(args.environment))
    with creds.registry_client() as client:
        found = verify_promotion(client, ImageRef.parse(args.image), args.environment, keys,
                                 app=args.app, kinds=("promotion", "rollback"))
    print(f"VERIFIED: {found.predicate.app} in {args.environment}\n{found.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, map errors to exit codes."""
    parser = argparse.ArgumentParser(prog="python -m portcullis")
    sub = parser.add_subparsers(dest="command", required=True)
    reauth = sub.add_parser(
        "reauthorise-ticket",
        help="let an incident ticket open one more emergency promotion (an on-call approver, verified)")
    reauth.add_argument("ticket")
    reauth.add_argument("--approver", required=True, help="your approver id")
    reauth.add_argument("--code", required=True, help="your current authenticator code")
    reauth.add_argument("--reason", required=True, help="why this ticket needs another emergency promotion")
    sub.add_parser("status", help="the environments board: what runs where, what waits for whom")
    plan = sub.add_parser("plan", help="dry run: every gate for this digest and environment, now")
    plan.add_argument("--app", required=True)
    plan.add_argument("--environment", required=True, choices=["dev", "staging", "prod"])
    plan.add_argument("--image", required=True, help="registry/repository@sha256:...")
    plan.add_argument("--requested-by", default=None, help="who would request it (they could not approve)")
    approve = sub.add_parser("approve", help="answer a promotion that waits for you, as the UI does")
    approve.add_argument("--app", required=True)
    approve.add_argument("--environment", required=True, choices=["dev", "staging", "prod"])
    approve.add_argument("--approver", required=True, help="your approver id")
    approve.add_argument("--code", default=None,
                         help="your current authenticator code (default: asked for, or read from stdin)")
    approve.add_argument("--digest-prefix", required=True,
                         help="the first hex characters of the digest you decide on (see the request)")
    approve.add_argument("--decision", default="approve",
                         help="approve or reject (an Inconclusive canary: promote or rollback)")
    approve.add_argument("--comment", default="")
    approve.add_argument("--run", default=None, help="which waiting run (id or name), when several wait")
    approve.add_argument("--wait", type=float, default=0.0,
                         help="seconds to wait for such a promotion to ask (default: look once)")
    history = sub.add_parser("history", help="an app's promotions and rollbacks per environment")
    history.add_argument("--app", required=True)
    history.add_argument("--environment", default=None, choices=["dev", "staging", "prod"])
    back = sub.add_parser("rollback", help="return an environment to its previous digest and pin it")
    back.add_argument("--app", required=True)
    back.add_argument("--environment", required=True, choices=["dev", "staging", "prod"])
    back.add_argument("--reason", required=True)
    back.add_argument("--requested-by", default=os.environ.get("USER", "unknown"),
                      help="your directory id")
    back.add_argument("--ask-code", action="store_true",
                      help="prove --requested-by with your current authenticator code (asked for, "
                      "or read from stdin); required where the environment needs approvers")
    dora = sub.add_parser("dora", help="DORA metrics per app and environment from the audit trail")
    dora.add_argument("--days", type=int, default=30)
    dora.add_argument("--prometheus-textfile", type=Path, default=None,
                      help="also write them for node-exporter's textfile collector")
    dora.add_argument("--publish", action="store_true", help="also publish the Prefect artifact")
    record = sub.add_parser(
        "verify-promotion",
        help="verify the signed promotion record of a digest (registry and trust root only)")
    record.add_argument("image", help="registry/repository@sha256:...")
    record.add_argument("--environment", required=True, choices=["dev", "staging", "prod"])
    record.add_argument("--app", default=None, help="also require the record to name this app")
    record.add_argument("--key", type=Path, action="append", default=[],
                        help="cosign.pub of that environment's deploy side (repeatable); "
                        "default: the deploy credentials' promotion trust root")
    record.add_argument("--credentials-block", default=None,
                        help="saved deploy credentials; default PORTCULLIS_DEPLOY_*")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            return _status()
        if args.command == "plan":
            return _plan(args.app, args.environment, args.image, args.requested_by)
        if args.command == "approve":
            return _approve(args)
        if args.command == "history":
            return _history(args.app, args.environment)
        if args.command == "rollback":
            return _rollback(args)
        if args.command == "dora":
            return _dora(args.days, args.prometheus_textfile, args.publish)
        if args.command == "reauthorise-ticket":
            return _reauthorise(args.ticket, args.approver, args.code, args.reason)
        return _verify_promotion(args)
    except PortcullisError as exc:
        print(f"portcullis: refused: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
