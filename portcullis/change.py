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
from pathlib import Path
from urllib.parse import unquote, urlsplit

from portcullis.errors import PolicyRefusal, ToolError
from portcullis.models import Frozen
from portcullis.toolrun import run_tool


class Change(Frozen):
    """The commits a promotion brings into an environment."""

    base: str | None
    commit: str
    commits: int
    authors: tuple[str, ...]


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
    """Every author and committer of the commits in ``base..commit``.

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
    log = _git(repo, "log", "--format=%an <%ae>%x00%cn <%ce>", *revs, "--")
    people: set[str] = set()
    count = 0
    for line in log.splitlines():
        if not line:
            continue
        count += 1
        people.update(p for p in line.split("\x00") if p.strip())
    return Change(base=base, commit=commit, commits=count, authors=tuple(sorted(people)))
