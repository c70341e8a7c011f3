"""The change a promotion carries: the commits between what runs and what is promoted.

The approval rule "nobody approves their own code" must cover every commit in the change, not
only the newest: a change is usually many commits, and an approver who wrote one of them under
another email would otherwise approve it. :func:`change_authors` lists every author and
committer of the commits reachable from the promoted commit and not from the commit running in
the environment (all of its history when nothing runs there yet, or when what runs is not an
ancestor: then nothing narrower can be proven, so the check fails closed).

The source repository is the one named in the *verified* provenance, read with git on the
deploy side. A repository the deploy side cannot read refuses the promotion: an unknown change
cannot be shown to be free of the approver's commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import Field

from portcullis.errors import PolicyRefusal, ToolError
from portcullis.models import Frozen
from portcullis.scan import Finding
from portcullis.toolrun import run_tool


class ChangeCommit(Frozen):
    """One commit of a change, as shown to the people who approve it."""

    id: str = Field(description="full commit id")
    subject: str = Field(description="first line of the message")
    author: str = Field(description="'Name <email>'")


class Change(Frozen):
    """The commits a promotion brings into an environment."""

    base: str | None
    commit: str
    commits: int
    authors: tuple[str, ...]
    entries: tuple[ChangeCommit, ...] = Field(
        default=(), description="the commits, newest first (at most MAX_LISTED of them)"
    )


#: Commits listed one by one; a longer change is counted, not listed.
MAX_LISTED = 50


def _git(repo: Path, *args: str) -> str:
    return run_tool(["git", "-C", str(repo), *args], timeout=120).stdout.decode("utf-8", "replace")


def local_repository(repo_url: str, cache_dir: Path) -> Path:
    """A local git directory holding ``repo_url``: the path itself for ``file://`` URLs, else a
    bare mirror in ``cache_dir`` fetched now.

    Raises:
        PolicyRefusal: the repository cannot be read or fetched.
    """
    parts = urlsplit(repo_url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if not path.exists():
            raise PolicyRefusal(
                f"the source repository {repo_url} named in the provenance is not readable on "
                "the deploy side; the change cannot be checked for the approvers' commits",
            )
        return path
    mirror = cache_dir / hashlib.sha256(repo_url.encode()).hexdigest()[:24]
    try:
        if not (mirror / "HEAD").exists():
            mirror.parent.mkdir(parents=True, exist_ok=True)
            run_tool(["git", "clone", "--quiet", "--mirror", "--", repo_url, str(mirror)], timeout=600)
        else:
            run_tool(["git", "-C", str(mirror), "fetch", "--quiet", "--prune", "origin"], timeout=600)
    except ToolError as exc:
        raise PolicyRefusal(
            f"cannot fetch the source repository {repo_url} to list the change's authors: {exc}",
            hint="give the deploy side read access to the repository (or a mirror)",
        ) from None
    return mirror


def change_between(repo: Path, commit: str, base: str | None) -> Change:
    """Every commit in ``base..commit`` (id, subject, author) and every author and committer.

    Args:
        repo: a local git directory (see :func:`local_repository`).
        commit: the promoted commit (full id).
        base: the commit running in the environment, or None when nothing runs there.

    Raises:
        PolicyRefusal: ``commit`` is not in the repository.
    """
    try:
        _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    except ToolError:
        raise PolicyRefusal(
            f"commit {commit[:12]} from the provenance is not in {repo}; the change cannot be "
            "checked for the approvers' commits",
        ) from None
    # Nothing running, the same commit, or an unrelated base: the whole history is the change.
    revs = [commit]
    if base is not None and base != commit:
        try:
            _git(repo, "merge-base", "--is-ancestor", base, commit)
            revs = [f"{base}..{commit}"]
        except ToolError:
            pass  # not an ancestor (a rollback, a rewritten branch): nothing narrower is proven
    log = _git(repo, "log", "--format=%H%x00%an <%ae>%x00%cn <%ce>%x00%s", *revs, "--")
    people: set[str] = set()
    entries: list[ChangeCommit] = []
    count = 0
    for line in log.splitlines():
        if not line:
            continue
        count += 1
        sha, author, committer, subject = (line.split("\x00") + ["", "", ""])[:4]
        people.update(p for p in (author, committer) if p.strip())
        if len(entries) < MAX_LISTED:
            entries.append(ChangeCommit(id=sha, subject=subject, author=author))
    return Change(base=base, commit=commit, commits=count, authors=tuple(sorted(people)),
                  entries=tuple(entries))


def finding_key(finding: Finding) -> tuple[str, str]:
    """What makes two findings "the same": the vulnerability in the same package."""
    return finding.vulnerability_id, finding.package


class WhatChanged(Frozen):
    """What a promotion changes compared with the version running in the environment now.

    Shown on the approval form and in the promotion's artifact: the commits, the base image,
    and the scan findings that appear or disappear.
    """

    running_digest: str | None = Field(description="what runs now; None when nothing does")
    change: Change | None = Field(description="the commits; None when they could not be read")
    change_problem: str | None = Field(default=None, description="why the commits are unknown")
    base_before: str | None = Field(default=None, description="base image of what runs now")
    base_after: str | None = Field(default=None, description="base image of the candidate")
    findings_new: tuple[Finding, ...] = ()
    findings_gone: tuple[Finding, ...] = ()
    findings_kept: int = Field(default=0, description="findings in both versions")
    scan_compared: bool = Field(default=False, description="both scans could be read")

    @property
    def base_changed(self) -> bool:
        """Whether the base image differs from the running version's."""
        return self.running_digest is not None and self.base_before != self.base_after


def compare_findings(
    running: Sequence[Finding], candidate: Sequence[Finding],
) -> tuple[tuple[Finding, ...], tuple[Finding, ...], int]:
    """Findings only in ``candidate`` (new), only in ``running`` (gone), and how many are in both."""
    before = {finding_key(f): f for f in running}
    after = {finding_key(f): f for f in candidate}
    new = tuple(after[k] for k in sorted(after.keys() - before.keys()))
    gone = tuple(before[k] for k in sorted(before.keys() - after.keys()))
    return new, gone, len(after.keys() & before.keys())
