"""Resolve exactly what will be built: one commit of a git repository, reached from a branch."""

from __future__ import annotations

import re
from pathlib import Path

from portcullis.errors import PolicyRefusal, ToolError
from portcullis.models import SourceRef
from portcullis.reproducible import normalise_tar
from portcullis.toolrun import run_tool


def _git(repo: Path, *args: str, timeout: float = 60) -> str:
    return run_tool(["git", "-C", str(repo), *args], timeout=timeout).stdout.decode().strip()


def resolve_source(repo: str | Path, commit: str, ref: str, context_path: str = ".") -> SourceRef:
    """Pin ``commit`` to its full id and check that it is reachable from branch ``ref``.

    Args:
        repo: path of the git repository holding the app's source.
        commit: any commit-ish (a full id, a short id, ``HEAD``...).
        ref: the branch the commit claims to come from; provenance records it and environment
            policy (e.g. prod only from main) depends on it, so it is checked, not trusted.
        context_path: directory inside the repository holding the Dockerfile.

    Returns:
        A :class:`SourceRef` with the full commit id and its author.
    """
    repo_path = Path(repo).resolve()
    if not (repo_path / ".git").exists() and not (repo_path / "HEAD").exists():
        raise PolicyRefusal(f"source {repo_path} is not a git repository")
    try:
        sha = _git(repo_path, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except ToolError:
        raise PolicyRefusal(
            f"commit {commit!r} does not exist in {repo_path}",
            hint="push the commit or pass an existing commit id",
        ) from None
    try:
        _git(repo_path, "rev-parse", "--verify", "--quiet", f"refs/heads/{ref}")
    except ToolError:
        raise PolicyRefusal(f"branch {ref!r} does not exist in {repo_path}") from None
    try:
        _git(repo_path, "merge-base", "--is-ancestor", sha, f"refs/heads/{ref}")
    except ToolError:
        raise PolicyRefusal(
            f"commit {sha[:12]} is not on branch {ref!r}",
            hint="build from a commit that the branch contains",
        ) from None
    try:
        _git(repo_path, "cat-file", "-e", f"{sha}:{context_path.strip('/') or '.'}/Dockerfile"
             if context_path.strip("/") not in ("", ".") else f"{sha}:Dockerfile")
    except ToolError:
        raise PolicyRefusal(f"commit {sha[:12]} has no Dockerfile in {context_path!r}") from None
    author = _git(repo_path, "show", "-s", "--format=%an <%ae>", sha)
    try:
        url = _git(repo_path, "config", "--get", "remote.origin.url")
    except ToolError:
        url = str(repo_path)
    if "://" not in url and not re.match(r"^[\w.-]+@[\w.-]+:", url):
        # A local path (or a clone of one): record it as a URL so policies can match it.
        url = f"file://{(repo_path / url).resolve()}"
    return SourceRef(repo_url=url, commit=sha, ref=ref, author=author, context_path=context_path)


def commit_epoch(repo: str | Path, commit: str) -> int:
    """The commit's committer time in seconds: the build's ``SOURCE_DATE_EPOCH``."""
    return int(_git(Path(repo).resolve(), "show", "-s", "--format=%ct", commit))


def archive_context(repo: str | Path, source: SourceRef) -> bytes:
    """The build context as a tar of the committed tree: never the working tree.

    Deterministic for the commit: git stamps a sub-tree's archive (``commit:path``) with the
    current time, so every mtime is clamped to the commit time and the entries sorted.
    """
    path = source.context_path.strip("/")
    treeish = source.commit if path in ("", ".") else f"{source.commit}:{path}"
    archive = run_tool(
        ["git", "-C", str(Path(repo).resolve()), "archive", "--format=tar", treeish], timeout=120
    ).stdout
    return normalise_tar(archive, commit_epoch(repo, source.commit))
