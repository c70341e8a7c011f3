"""What a promotion changes, without any service: the commits (id, subject, author) of a real
git repository, scan findings that appear and disappear, and how the form shows them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from portcullis.approval import render_what_changed
from portcullis.change import WhatChanged, change_between, compare_findings
from portcullis.scan import Finding, Severity


def _commit(repo: Path, subject: str, author: str) -> str:
    name, email = author.split(" <")
    env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email.rstrip(">"),
           "GIT_COMMITTER_NAME": "CI", "GIT_COMMITTER_EMAIL": "ci@example.com", "PATH": "/usr/bin:/bin"}
    (repo / "f").write_text(subject)
    subprocess.run(["git", "-C", str(repo), "add", "f"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", subject], check=True, env=env)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def test_the_change_keeps_each_commit_newest_first(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main", str(tmp_path)], check=True)
    running = _commit(tmp_path, "v1", "Ada <ada@example.com>")
    second = _commit(tmp_path, "Fix the widget", "Bob <bob@example.com>")
    third = _commit(tmp_path, "Tune: timeouts", "Carol <carol@example.com>")
    change = change_between(tmp_path, third, running)
    assert change.commits == 2
    assert [(c.id, c.subject, c.author) for c in change.entries] == [
        (third, "Tune: timeouts", "Carol <carol@example.com>"),
        (second, "Fix the widget", "Bob <bob@example.com>"),
    ]
    assert "CI <ci@example.com>" in change.authors  # committers still count for the approval rule
    assert len(change_between(tmp_path, third, None).entries) == 3


def _finding(cve: str, package: str, severity: Severity = Severity.HIGH) -> Finding:
    return Finding(vulnerability_id=cve, package=package, installed_version="1.0", severity=severity)


def test_findings_that_appear_and_disappear() -> None:
    running = [_finding("CVE-1", "openssl"), _finding("CVE-2", "zlib")]
    candidate = [_finding("CVE-2", "zlib"), _finding("CVE-3", "libxml2", Severity.CRITICAL),
                 _finding("CVE-1", "curl")]  # the same CVE in another package is new
    new, gone, kept = compare_findings(running, candidate)
    assert [(f.vulnerability_id, f.package) for f in new] == [("CVE-1", "curl"), ("CVE-3", "libxml2")]
    assert [(f.vulnerability_id, f.package) for f in gone] == [("CVE-1", "openssl")]
    assert kept == 1


def test_first_deploy_and_unknown_scans_are_said_plainly() -> None:
    first = "\n".join(render_what_changed(WhatChanged(running_digest=None, change=None,
                                                      change_problem="repo gone")))
    assert "Nothing runs in this environment yet" in first and "unknown (repo gone)" in first
    assert "not compared" in first
    same = WhatChanged(running_digest="sha256:" + "1" * 64, change=None, base_before="b@x",
                       base_after="b@x", findings_kept=2, scan_compared=True)
    text = "\n".join(render_what_changed(same))
    assert "Base image unchanged" in text and "no change (2 in both versions)" in text
