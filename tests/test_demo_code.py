"""``python -m infra.demo code NAME``: the local stack plays a demo approver's authenticator.

Given a fresh stack home, when the command runs as its own process, then it enrolls the demo
approvers (mode 600) and prints a code that the enrolled secret accepts; an unknown name is
refused with exit code 2, and the product CLI no longer offers the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pyotp

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PORTCULLIS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_code_prints_a_code_the_enrolled_secret_accepts(tmp_path: Path) -> None:
    done = _run("infra.demo", "code", "bob", home=tmp_path)
    assert done.returncode == 0, done.stderr
    approvers = tmp_path / "deploy-side" / "approvers.toml"
    assert approvers.stat().st_mode & 0o777 == 0o600
    secret = next(a["totp_secret"] for a in tomllib.loads(approvers.read_text())["approver"]
                  if a["name"] == "bob")
    code = done.stdout.strip()
    # One step either side: the process may have started in the previous 30-second step.
    assert pyotp.TOTP(secret).verify(code, valid_window=1), code


def test_unknown_approver_is_refused(tmp_path: Path) -> None:
    done = _run("infra.demo", "code", "mallory", home=tmp_path)
    assert done.returncode == 2
    assert "no approver 'mallory'" in done.stderr and done.stdout == ""


def test_the_product_cli_has_no_code_command(tmp_path: Path) -> None:
    done = _run("portcullis", "code", "bob", home=tmp_path)
    assert done.returncode == 2 and "invalid choice: 'code'" in done.stderr
    assert not (tmp_path / "deploy-side").exists()
