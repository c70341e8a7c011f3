"""The promote and rollback flows with a GitOps target (pull-based), end to end.

Given an environment whose policy targets GitOps, when a digest is promoted, then the overlay
in the GitOps repository pins it by digest with the traceability annotations and the commit
names the flow run; when it is rolled back, a revert commit pins the previous digest and the
environment is pinned against schedules.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.promote import promote
from flows.rollback import rollback
from portcullis.settings import Settings
from portcullis.state import open_state
from tests.conftest import AppRepo, PipelineEnv

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def gitops_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline_env: PipelineEnv) -> Path:
    seed = tmp_path / "seed"
    shutil.copytree(REPO_ROOT / "examples" / "gitops", seed)
    shutil.copytree(seed / "overlays" / "prod", seed / "overlays" / "dev")
    _git("init", "-q", "-b", "main", cwd=seed)
    _git("add", "-A", cwd=seed)
    _git("-c", "user.name=seed", "-c", "user.email=seed@localhost", "commit", "-qm", "seed", cwd=seed)
    bare = tmp_path / "gitops.git"
    _git("clone", "-q", "--bare", str(seed), str(bare))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "dev.toml").write_text(
        'environment = "dev"\ntarget = "gitops"\nallowed_branches = ["main"]\n'
        'allowed_repositories = ["file://*"]\n[scan]\nthreshold = "CRITICAL"\n')
    monkeypatch.setenv("PORTCULLIS_POLICY_DIR", str(policies))
    monkeypatch.setenv("PORTCULLIS_GITOPS_REPO_URL", f"file://{bare}")
    monkeypatch.setenv("PORTCULLIS_GITOPS_WORKDIR", str(tmp_path / "gitops-work"))
    return bare


def _overlay(bare: Path, tmp: Path) -> dict:  # type: ignore[type-arg]
    out = tmp / f"check-{len(list(tmp.iterdir()))}"
    _git("clone", "-q", str(bare), str(out))
    return yaml.safe_load((out / "overlays" / "dev" / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def test_promotion_commits_the_digest_and_rollback_reverts_it(
    prefect_harness: None, pipeline_env: PipelineEnv, gitops_repo: Path, app_repo: AppRepo,
    app_name: str, tmp_path: Path,
) -> None:
    kw = {"app": app_name, "environment": "dev", "source_repo": str(app_repo.path),
          "commit": "HEAD", "ref": "main", "context_path": "."}
    first = promote(**kw)
    app_repo.commit_config("v2", MESSAGE='"v2"')
    second = promote(**kw)
    assert first.deployment is None and second.gitops is not None
    overlay = _overlay(gitops_repo, tmp_path)
    entry = next(i for i in overlay["images"] if i["name"] == app_name)
    assert entry["digest"] == second.image.digest and "newTag" not in entry
    assert overlay["commonAnnotations"]["portcullis.dev/commit"] == second.commit
    message = _git("log", "-1", "--format=%B", cwd=gitops_repo)
    assert second.image.digest in message and "Portcullis-Flow-Run:" in message

    reverted = rollback(app=app_name, environment="dev", reason="v2 misbehaves", requested_by="olga")
    assert reverted.digest == first.image.digest
    entry = next(i for i in _overlay(gitops_repo, tmp_path)["images"] if i["name"] == app_name)
    assert entry["digest"] == first.image.digest
    assert "This reverts commit" in _git("log", "-1", "--format=%B", cwd=gitops_repo)
    pin = open_state(Settings(home=pipeline_env.home)).pins.get(app_name, "dev")
    assert pin is not None and pin.digest == first.image.digest
