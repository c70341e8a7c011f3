"""What is built is one commit reached from a branch, never the working tree."""

from __future__ import annotations

import io
import tarfile

import pytest

from portcullis.errors import PolicyRefusal
from tasks.source import archive_context, resolve_source
from tests.conftest import AppRepo


def test_resolves_head_to_the_full_commit_with_author(app_repo: AppRepo) -> None:
    source = resolve_source(app_repo.path, "HEAD", "main")
    assert source.commit == app_repo.git("rev-parse", "HEAD")
    assert source.author == "Ada Author <ada@example.com>"
    assert source.ref == "main"


def test_archive_holds_the_commit_not_the_working_tree(app_repo: AppRepo) -> None:
    source = resolve_source(app_repo.path, "HEAD", "main")
    (app_repo.path / "app.conf").write_text("FAIL_PERMILLE=1000\n")  # uncommitted edit
    with tarfile.open(fileobj=io.BytesIO(archive_context(app_repo.path, source))) as tar:
        member = tar.extractfile("app.conf")
        assert member is not None
        assert b"FAIL_PERMILLE=0" in member.read()


def test_unknown_commit_is_refused(app_repo: AppRepo) -> None:
    with pytest.raises(PolicyRefusal, match="does not exist"):
        resolve_source(app_repo.path, "0" * 40, "main")


def test_commit_not_on_the_claimed_branch_is_refused(app_repo: AppRepo) -> None:
    app_repo.git("checkout", "-q", "-b", "feature")
    sha = app_repo.commit_config("feature work", MESSAGE="feature")
    app_repo.git("checkout", "-q", "main")
    with pytest.raises(PolicyRefusal, match="is not on branch 'main'"):
        resolve_source(app_repo.path, sha, "main")
    assert resolve_source(app_repo.path, sha, "feature").commit == sha


def test_missing_branch_and_non_repository_are_refused(app_repo: AppRepo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyRefusal, match="branch 'nope' does not exist"):
        resolve_source(app_repo.path, "HEAD", "nope")
    with pytest.raises(PolicyRefusal, match="not a git repository"):
        resolve_source(tmp_path / "empty", "HEAD", "main")


def test_commit_without_dockerfile_is_refused(app_repo: AppRepo) -> None:
    with pytest.raises(PolicyRefusal, match="no Dockerfile"):
        resolve_source(app_repo.path, "HEAD", "main", context_path="www")
