"""Demo helpers for the local stack: ``python -m infra.demo code NAME``.

On a real deploy worker each approver's TOTP secret lives in that person's authenticator app;
the local stack enrolls its demo approvers itself (:func:`infra.demo_data.ensure_approvers`),
so this command plays their app and prints the current code. It is not part of the product:
nothing in ``portcullis/`` can read an approver's secret for someone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pyotp

from infra.demo_data import ensure_approvers
from infra.stack import StackConfig
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m infra.demo code NAME`` (the stack in ``PORTCULLIS_HOME``, default .stack)."""
    parser = argparse.ArgumentParser(prog="python -m infra.demo",
                                     description="Helpers for the local demo stack.")
    sub = parser.add_subparsers(dest="command", required=True)
    code = sub.add_parser("code", help="print an approver's current code (plays their "
                          "authenticator app on the local stack)")
    code.add_argument("approver")
    args = parser.parse_args(argv)
    try:
        print(current_code(args.approver, StackConfig.from_env().state_dir))
    except PortcullisError as exc:
        print(f"infra.demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
