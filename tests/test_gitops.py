"""The GitOps target, against real git and bare repositories the tests create.

Given a bare repository seeded from ``examples/gitops``, when Portcullis promotes or rolls
back, then what lands on the remote branch is checked with git itself (and kustomize where
it is installed).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydantic import SecretStr, ValidationError

from blocks.gitops import GitOpsTargetBlock
from infra.prometheus import start_prometheus
from portcullis.errors import ConfigurationError, PolicyRefusal
from portcullis.gitops import (
    GitOpsCommit,
    GitOpsTarget,
    RolloutMetrics,
    TraceAnnotations,
    parse_kustomization,
    render_canary,
    render_overlay,
)
from portcullis.models import ImageRef
from portcullis.policy import load_policy
from tests.support.http import serving

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "gitops"
FLOW_RUN = "http://127.0.0.1:4200/runs/flow-run/0b6c1f9e-1111-4222-8333-444455556666"
SOURCE_COMMIT = "a" * 40


def digest(n: int) -> str:
    """A distinct, well-formed digest per number."""
    return "sha256:" + f"{n:x}".rjust(64, "0")


def image(n: int) -> ImageRef:
    """The example app's image at digest ``n``."""
    return ImageRef(registry="127.0.0.1:5000", repository="portcullis/hello", digest=digest(n))


def trace(*approvers: str, commit: str = SOURCE_COMMIT) -> TraceAnnotations:
    """Annotations for a promotion approved by ``approvers``."""
    return TraceAnnotations(
        commit=commit,
        flow_run_url=FLOW_RUN,
        approved_by=approvers,
        deployed_at=datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC),
    )


def git(*args: str, cwd: Path | None = None, strip: bool = True) -> str:
    """Run git (as a person, not as Portcullis) and return stdout."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "Olga Other", "GIT_AUTHOR_EMAIL": "olga@example.com",
           "GIT_COMMITTER_NAME": "Olga Other", "GIT_COMMITTER_EMAIL": "olga@example.com",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                         text=True).stdout
    return out.strip() if strip else out


@dataclass
class Remote:
    """A bare repository holding the example GitOps tree on ``main``."""

    bare: Path
    root: Path

    @property
    def url(self) -> str:
        """What a target is configured with: the bare repository's path."""
        return str(self.bare)

    def head(self) -> str:
        """The commit ``main`` points at."""
        return git("--git-dir", str(self.bare), "rev-parse", "main")

    def show(self, path: str, rev: str = "main") -> str:
        """A file's content at ``rev``."""
        return git("--git-dir", str(self.bare), "show", f"{rev}:{path}", strip=False)

    def overlay(self, env: str = "prod", rev: str = "main") -> dict[str, Any]:
        """The parsed overlay of ``env`` at ``rev``."""
        loaded: dict[str, Any] = yaml.safe_load(self.show(f"overlays/{env}/kustomization.yaml", rev))
        return loaded

    def log(self, fmt: str, rev: str = "main") -> list[str]:
        """``git log --format=fmt`` lines, newest first."""
        return git("--git-dir", str(self.bare), "log", f"--format={fmt}", rev).splitlines()

    def person_commits(self, message: str, files: dict[str, str]) -> str:
        """Someone else clones, writes ``files``, commits and pushes; returns their commit."""
        clone = self.root / f"person-{secrets.token_hex(3)}"
        git("clone", "-q", str(self.bare), str(clone))
        for rel, text in files.items():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_text(text)
        git("add", "-A", cwd=clone)
        git("commit", "-q", "-m", message, cwd=clone)
        git("push", "-q", "origin", "main", cwd=clone)
        return git("rev-parse", "HEAD", cwd=clone)


@pytest.fixture()
def remote(tmp_path: Path) -> Remote:
    """A fresh bare repository seeded with examples/gitops' base and overlays."""
    bare = tmp_path / "gitops.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    seed = tmp_path / "seed"
    seed.mkdir()
    shutil.copytree(EXAMPLE / "base", seed / "base")
    shutil.copytree(EXAMPLE / "overlays", seed / "overlays")
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "seed the GitOps repository", cwd=seed)
    git("push", "-q", str(bare), "main", cwd=seed)
    return Remote(bare=bare, root=tmp_path)


@pytest.fixture()
def target(remote: Remote, tmp_path: Path) -> GitOpsTarget:
    """Portcullis's target on that repository, with its own workdir."""
    return GitOpsTarget(remote.url, tmp_path / "work")


# --- promotion ------------------------------------------------------------------------------


def test_promotion_commits_the_digest_annotations_message_and_trailers(
    remote: Remote, target: GitOpsTarget
) -> None:
    seeded_staging = remote.show("overlays/staging/kustomization.yaml")
    started = time.monotonic()
    pushed = target.promote("hello", "prod", image(1), trace("alice", "bob"))
    seconds = time.monotonic() - started

    assert pushed.sha == remote.head()
    assert pushed.digest == digest(1)
    assert pushed.push_attempts == 1
    assert pushed.pushed_to == f"{remote.url} main"
    overlay = remote.overlay()
    assert overlay["images"] == [{
        "name": "hello", "newName": "127.0.0.1:5000/portcullis/hello", "digest": digest(1),
    }]
    assert overlay["commonAnnotations"] == {
        "portcullis.dev/commit": SOURCE_COMMIT,
        "portcullis.dev/flow-run-url": FLOW_RUN,
        "portcullis.dev/approved-by": "alice,bob",
        "portcullis.dev/deployed-at": "2025-03-04T05:06:07Z",
        "portcullis.dev/digest": digest(1),
    }
    assert overlay["resources"] == ["../../base"] and overlay["namespace"] == "hello-prod"
    text = remote.show("overlays/prod/kustomization.yaml")
    assert text.startswith("# The prod overlay.")  # the header comment survives the rewrite
    assert "newTag" not in text

    assert remote.log("%an <%ae>")[0] == "Portcullis <portcullis@localhost>"
    assert remote.log("%cn <%ce>")[0] == "Portcullis <portcullis@localhost>"
    subject = remote.log("%s")[0]
    body = git("--git-dir", str(remote.bare), "log", "-1", "--format=%B", "main")
    assert subject == f"promote hello to prod: {digest(1)}"
    assert FLOW_RUN in body and "Approved by: alice, bob" in body and SOURCE_COMMIT in body
    assert body == pushed.message.strip()
    trailers = git("--git-dir", str(remote.bare), "log", "-1",
                   "--format=%(trailers:only,unfold)", "main").splitlines()
    assert trailers == [
        "Portcullis-Action: promote",
        "Portcullis-App: hello",
        "Portcullis-Environment: prod",
        "Portcullis-Image-Name: hello",
        f"Portcullis-Digest: {digest(1)}",
        f"Portcullis-Source-Commit: {SOURCE_COMMIT}",
        f"Portcullis-Flow-Run: {FLOW_RUN}",
        "Approved-by: alice",
        "Approved-by: bob",
    ]
    changed = git("--git-dir", str(remote.bare), "show", "--format=", "--name-only", "main")
    assert changed == "overlays/prod/kustomization.yaml"
    assert remote.show("overlays/staging/kustomization.yaml") == seeded_staging
    print(f"\nfirst promotion (clone + commit + push): {seconds * 1000:.0f} ms")


def test_a_second_promotion_updates_the_pin_in_place(remote: Remote, target: GitOpsTarget) -> None:
    first = target.promote("hello", "prod", image(1), trace("alice"))
    started = time.monotonic()
    second = target.promote("hello", "prod", image(2), trace("carol", commit="b" * 40))
    seconds = time.monotonic() - started

    assert remote.log("%H")[:2] == [second.sha, first.sha]
    overlay = remote.overlay()
    assert [e["digest"] for e in overlay["images"]] == [digest(2)]
    assert overlay["commonAnnotations"]["portcullis.dev/approved-by"] == "carol"
    assert overlay["commonAnnotations"]["portcullis.dev/commit"] == "b" * 40
    assert target.current_digest("prod", "hello") == digest(2)
    assert target.current_digest("staging", "hello") is None
    diff = git("--git-dir", str(remote.bare), "diff", "--numstat", first.sha, second.sha)
    assert diff.split() == ["4", "4", "overlays/prod/kustomization.yaml"]  # digest x2, commit, approvers
    print(f"\nsecond promotion (fetch + commit + push): {seconds * 1000:.0f} ms")


def test_an_approverless_promotion_says_so(remote: Remote, target: GitOpsTarget) -> None:
    target.promote("hello", "staging", image(1), trace())
    assert remote.overlay("staging")["commonAnnotations"]["portcullis.dev/approved-by"] == ""
    body = git("--git-dir", str(remote.bare), "log", "-1", "--format=%B", "main")
    assert "Approved by: nobody (no approval required)" in body
    assert "Approved-by:" not in body


# --- rollback -------------------------------------------------------------------------------


def test_rollback_is_a_revert_commit_restoring_the_previous_digest(
    remote: Remote, target: GitOpsTarget
) -> None:
    first = target.promote("hello", "prod", image(1), trace("alice"))
    after_first = remote.show("overlays/prod/kustomization.yaml")
    second = target.promote("hello", "prod", image(2), trace("bob"))

    started = time.monotonic()
    rolled = target.rollback("prod", reason="canary error rate 12% > 5%", flow_run_url=FLOW_RUN)
    seconds = time.monotonic() - started

    assert rolled.digest == digest(1)
    assert rolled.sha == remote.head()
    assert remote.log("%P")[0] == second.sha  # a new commit on top: history is kept
    assert remote.show("overlays/prod/kustomization.yaml") == after_first  # annotations too
    body = git("--git-dir", str(remote.bare), "log", "-1", "--format=%B", "main")
    assert f"This reverts commit {second.sha}." in body
    assert "canary error rate 12% > 5%" in body
    assert f"Portcullis-Reverts: {second.sha}" in body
    assert f"Portcullis-Digest: {digest(1)}" in body
    assert remote.log("%an")[0] == "Portcullis"
    assert target.current_digest("prod", "hello") == digest(1)

    # The next promotion and its rollback go back to the first digest again, not to the
    # reverted second one.
    target.promote("hello", "prod", image(3), trace("carol"))
    assert target.rollback("prod").digest == digest(1)

    # Reverting the first promotion would leave prod unpinned: refused, nothing pushed.
    head = remote.head()
    with pytest.raises(PolicyRefusal, match="no digest-pinned hello"):
        target.rollback("prod")
    assert remote.head() == head
    assert first.sha in remote.log("%H")
    print(f"\nrollback (fetch + revert + push): {seconds * 1000:.0f} ms")


def test_rollback_with_no_promotion_is_refused(remote: Remote, target: GitOpsTarget) -> None:
    target.promote("hello", "staging", image(1), trace())
    with pytest.raises(PolicyRefusal, match="no Portcullis promotion of prod"):
        target.rollback("prod")


def test_rollback_conflicting_with_a_hand_edit_is_refused(
    remote: Remote, target: GitOpsTarget
) -> None:
    target.promote("hello", "prod", image(1), trace("alice"))
    target.promote("hello", "prod", image(2), trace("bob"))
    edited = remote.show("overlays/prod/kustomization.yaml").replace(digest(2), digest(9))
    hand = remote.person_commits("hotfix by hand", {"overlays/prod/kustomization.yaml": edited})
    with pytest.raises(PolicyRefusal, match="conflicts with later changes"):
        target.rollback("prod")
    assert remote.head() == hand


# --- concurrency ----------------------------------------------------------------------------


class InterruptedTarget(GitOpsTarget):
    """A real target; just before its first push, someone else pushes ``files``."""

    def __init__(self, *args: Any, remote: Remote, files: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remote = remote
        self._files = files
        self.other: str | None = None

    def _push(self) -> bool:
        if self.other is None:
            self.other = self._remote.person_commits("someone else's change", self._files)
        return super()._push()


def test_a_concurrent_push_to_another_file_is_rebased_over(remote: Remote, tmp_path: Path) -> None:
    staging = remote.show("overlays/staging/kustomization.yaml") + "replicas:\n- name: hello\n  count: 1\n"
    target = InterruptedTarget(remote.url, tmp_path / "work", remote=remote,
                               files={"overlays/staging/kustomization.yaml": staging})
    pushed = target.promote("hello", "prod", image(1), trace("alice"))

    assert pushed.push_attempts == 2
    assert remote.log("%H")[:2] == [pushed.sha, target.other]
    assert remote.overlay()["images"][0]["digest"] == digest(1)
    assert remote.overlay("staging")["replicas"] == [{"name": "hello", "count": 1}]


def test_a_concurrent_promotion_of_the_same_overlay_is_refused(
    remote: Remote, tmp_path: Path
) -> None:
    # Someone else's promotion of another digest to prod lands first: rebasing ours over it
    # conflicts, and Portcullis must not silently overwrite it.
    other = GitOpsTarget(remote.url, tmp_path / "other-work")

    class RacingTarget(GitOpsTarget):
        raced = False

        def _push(self) -> bool:
            if not self.raced:
                self.raced = True
                other.promote("hello", "prod", image(7), trace("zoe"))
            return super()._push()

    target = RacingTarget(remote.url, tmp_path / "work")
    with pytest.raises(PolicyRefusal, match="conflicts with a change pushed meanwhile"):
        target.promote("hello", "prod", image(1), trace("alice"))
    assert remote.overlay()["images"][0]["digest"] == digest(7)
    # The workdir is reusable afterwards: the next run starts from the remote again.
    assert target.promote("hello", "prod", image(1), trace("alice")).push_attempts == 1


def test_a_branch_that_keeps_moving_is_a_transient_failure(remote: Remote, tmp_path: Path) -> None:
    from portcullis.errors import TransientError

    class BusyTarget(GitOpsTarget):
        pushes = 0

        def _push(self) -> bool:
            self.pushes += 1
            remote.person_commits(f"busy {self.pushes}", {f"notes/{self.pushes}.txt": "x\n"})
            return super()._push()

    target = BusyTarget(remote.url, tmp_path / "work", max_push_attempts=2)
    with pytest.raises(TransientError, match="gave up after 2 push attempts"):
        target.promote("hello", "prod", image(1), trace("alice"))
    assert target.pushes == 2
    assert "images" not in remote.overlay()


# --- refusals -------------------------------------------------------------------------------


def test_missing_or_malformed_overlay_is_refused(remote: Remote, target: GitOpsTarget) -> None:
    head = remote.head()
    with pytest.raises(ConfigurationError, match="overlays/qa/kustomization.yaml .* does not exist"):
        target.promote("hello", "qa", image(1), trace("alice"))
    with pytest.raises(ConfigurationError, match="not an environment name"):
        target.promote("hello", "../prod", image(1), trace("alice"))
    assert remote.head() == head

    broken = remote.person_commits("break prod", {"overlays/prod/kustomization.yaml": "- a\n- b\n"})
    with pytest.raises(ConfigurationError, match="not a kustomization"):
        target.promote("hello", "prod", image(1), trace("alice"))
    bad_images = "resources: [../../base]\nimages: {name: hello}\n"
    broken = remote.person_commits("break images", {"overlays/prod/kustomization.yaml": bad_images})
    with pytest.raises(ConfigurationError, match="`images` must be a list"):
        target.promote("hello", "prod", image(1), trace("alice"))
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        parse_kustomization("images: [\n", "x.yaml")
    assert remote.head() == broken


def test_a_workdir_of_another_repository_is_refused(remote: Remote, tmp_path: Path) -> None:
    GitOpsTarget(remote.url, tmp_path / "work").current_digest("prod", "hello")
    other = tmp_path / "other.git"
    git("clone", "-q", "--bare", str(remote.bare), str(other))
    with pytest.raises(ConfigurationError, match="is a clone of .* not of the configured"):
        GitOpsTarget(str(other), tmp_path / "work").promote("hello", "prod", image(1), trace("a"))

    # Nor does it reset a checkout it did not make (someone's own clone, say).
    mine = tmp_path / "my-checkout"
    git("clone", "-q", str(remote.bare), str(mine))
    with pytest.raises(ConfigurationError, match="Portcullis did not make"):
        GitOpsTarget(remote.url, mine).current_digest("prod", "hello")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="not empty"):
        GitOpsTarget(remote.url, tmp_path / "full").current_digest("prod", "hello")


def test_an_unknown_branch_or_repository_is_refused(remote: Remote, tmp_path: Path) -> None:
    target = GitOpsTarget(remote.url, tmp_path / "work", branch="release")
    with pytest.raises(ConfigurationError, match="branch 'release' does not exist"):
        target.current_digest("prod", "hello")
    nowhere = GitOpsTarget(str(tmp_path / "missing.git"), tmp_path / "work2")
    with pytest.raises(ConfigurationError, match="there is no repository at"):
        nowhere.current_digest("prod", "hello")


def test_a_tag_only_image_cannot_be_expressed() -> None:
    with pytest.raises(PolicyRefusal, match="not pinned by digest"):
        ImageRef.parse("127.0.0.1:5000/portcullis/hello:1.0")
    with pytest.raises(ValidationError, match="not a sha256 digest"):
        ImageRef(registry="127.0.0.1:5000", repository="portcullis/hello", digest="1.0")
    with pytest.raises(ValidationError, match="Field required"):
        ImageRef(registry="127.0.0.1:5000", repository="portcullis/hello")  # type: ignore[call-arg]
    # And a tag left in an overlay by hand is dropped, so it cannot compete with the digest.
    before = {"images": [{"name": "hello", "newName": "old/hello", "newTag": "latest"}]}
    after = render_overlay(before, image(1), trace("a"), image_name="hello")
    assert after["images"] == [
        {"name": "hello", "newName": "127.0.0.1:5000/portcullis/hello", "digest": digest(1)}
    ]


def test_render_overlay_touches_only_its_own_keys() -> None:
    before: dict[str, Any] = {
        "resources": ["../../base"],
        "images": [{"name": "sidecar", "newName": "r/sidecar", "digest": digest(5)},
                   {"name": "hello", "newName": "r/hello", "digest": digest(4)}],
        "commonAnnotations": {"team": "payments", "portcullis.dev/stale": "x"},
        "patches": [{"path": "p.yaml"}],
    }
    snapshot = yaml.safe_dump(before)
    after = render_overlay(before, image(1), trace("alice"), image_name="hello")
    assert yaml.safe_dump(before) == snapshot  # the input is not modified
    assert list(after) == ["resources", "images", "commonAnnotations", "patches"]
    assert after["images"][0] == before["images"][0]
    assert after["images"][1]["digest"] == digest(1)
    assert after["commonAnnotations"]["team"] == "payments"
    assert "portcullis.dev/stale" not in after["commonAnnotations"]
    with pytest.raises(ConfigurationError, match="not an image name"):
        render_overlay(before, image(1), trace("alice"), image_name="hello world")


def test_trailer_forging_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="one line"):
        trace("alice\nPortcullis-Environment: staging")
    with pytest.raises(ValidationError, match="comma"):
        trace("alice,bob")
    with pytest.raises(ValidationError, match="spaces"):
        TraceAnnotations(commit=SOURCE_COMMIT, flow_run_url="http://x/ y", approved_by=(),
                         deployed_at=datetime.now(UTC))
    with pytest.raises(ValidationError, match="timezone-aware"):
        TraceAnnotations(commit=SOURCE_COMMIT, flow_run_url=FLOW_RUN, approved_by=(),
                         deployed_at=datetime(2025, 1, 1))
    with pytest.raises(ValidationError, match="40-hex"):
        trace("alice", commit="abc123")


# --- a real kustomize ----------------------------------------------------------------------


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


KUSTOMIZE = _kustomize()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None,
    reason="neither kustomize nor kubectl is on PATH (Debian: apt-get install kubernetes-client)",
)


@needs_kustomize
def test_kustomize_renders_the_pinned_image_and_annotations(remote: Remote, tmp_path: Path) -> None:
    assert KUSTOMIZE is not None
    target = GitOpsTarget(remote.url, tmp_path / "work", kustomize=KUSTOMIZE)
    target.promote("hello", "prod", image(1), trace("alice", "bob"))
    check = tmp_path / "check"
    git("clone", "-q", str(remote.bare), str(check))
    out = subprocess.run([*KUSTOMIZE, str(check / "overlays" / "prod")], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    deployment = docs["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == str(image(1))
    for annotated in (deployment["metadata"], deployment["spec"]["template"]["metadata"],
                      docs["Service"]["metadata"]):
        assert annotated["annotations"]["portcullis.dev/digest"] == digest(1)
        assert annotated["annotations"]["portcullis.dev/approved-by"] == "alice,bob"
        assert annotated["annotations"]["portcullis.dev/flow-run-url"] == FLOW_RUN
    assert deployment["metadata"]["namespace"] == "hello-prod"


@needs_kustomize
def test_a_pin_the_manifests_never_use_is_refused(remote: Remote, tmp_path: Path) -> None:
    assert KUSTOMIZE is not None
    target = GitOpsTarget(remote.url, tmp_path / "work", kustomize=KUSTOMIZE)
    head = remote.head()
    with pytest.raises(ConfigurationError, match="rendered manifests never use it"):
        target.promote("hello", "prod", image(1), trace("alice"), image_name="helo")
    assert remote.head() == head


PROD_CANARY = load_policy("prod", REPO_ROOT / "policies").canary


@needs_kustomize
def test_the_prod_canary_renders_as_an_argo_rollout_with_its_analysis(
    remote: Remote, tmp_path: Path
) -> None:
    """Given prod's canary policy, the overlay commit renders a Rollout + AnalysisTemplate."""
    assert KUSTOMIZE is not None and PROD_CANARY is not None
    target = GitOpsTarget(remote.url, tmp_path / "work", kustomize=KUSTOMIZE)
    target.promote("hello", "prod", image(1), trace("alice", "bob"), canary=PROD_CANARY)
    check = tmp_path / "check"
    git("clone", "-q", str(remote.bare), str(check))
    out = subprocess.run([*KUSTOMIZE, str(check / "overlays" / "prod")], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    assert set(docs) == {"Deployment", "Service", "Rollout", "AnalysisTemplate"}

    # The Deployment still pins the digest; the Rollout runs its template and it keeps none.
    deployment, rollout, template = docs["Deployment"], docs["Rollout"], docs["AnalysisTemplate"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == str(image(1))
    assert deployment["spec"]["replicas"] == 0
    assert rollout["spec"]["workloadRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": "hello", "scaleDown": "progressively"}
    assert rollout["metadata"]["namespace"] == template["metadata"]["namespace"] == "hello-prod"
    assert rollout["metadata"]["annotations"]["portcullis.dev/digest"] == digest(1)

    # The policy's steps: setWeight, pause for the window, analysis over that window.
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert [s["setWeight"] for s in steps[0::3]] == [s.weight for s in PROD_CANARY.steps]
    windows = [f"{round(s.window_seconds)}s" for s in PROD_CANARY.steps]
    assert [s["pause"]["duration"] for s in steps[1::3]] == windows
    for analysis, window in zip(steps[2::3], windows, strict=True):
        assert analysis["analysis"]["templates"] == [{"templateName": "hello-canary"}]
        args = {a["name"]: a for a in analysis["analysis"]["args"]}
        assert args["window"]["value"] == window
        assert args["canary-hash"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
        assert args["stable-hash"]["valueFrom"] == {"podTemplateHashValue": "Stable"}

    # One metric per check of the judge, with the policy's limits and run limits.
    metrics = {m["name"]: m for m in template["spec"]["metrics"]}
    assert set(metrics) == {"error-rate", "error-rate-vs-baseline", "latency",
                            "latency-vs-baseline"}
    limits = PROD_CANARY.limits
    for metric in metrics.values():
        assert metric["failureLimit"] == PROD_CANARY.failure_limit
        assert metric["inconclusiveLimit"] == PROD_CANARY.inconclusive_limit
        assert (metric["successCondition"], metric["failureCondition"]) == (
            "result[0] < 0", "result[0] > 0")
        query = metric["provider"]["prometheus"]["query"]
        assert '{{args.canary-hash}}' in query and "[{{args.window}}]" in query
    assert f"> bool {limits.max_error_rate:g}" in metrics["error-rate"]["provider"]["prometheus"][
        "query"]
    assert f'le="{limits.max_latency_seconds:g}"' in metrics["latency"]["provider"][
        "prometheus"]["query"]

    # A second promotion changes only the digest; the rendered canary stays as it was.
    target.promote("hello", "prod", image(2), trace("alice", "bob"), canary=PROD_CANARY)
    changed = git("--git-dir", str(remote.bare), "diff", "--name-only", "main~1", "main")
    assert changed.splitlines() == ["overlays/prod/kustomization.yaml"]


def test_every_rendered_query_is_promql_prometheus_evaluates(tmp_path: Path) -> None:
    """Each metric's query, with its arguments filled in, runs on a real Prometheus.

    With no traffic at all every check must answer 0: Inconclusive, never pass or fail.
    """
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (infra/bootstrap.sh installs it)")
    assert PROD_CANARY is not None
    _, template = render_canary(PROD_CANARY, app="hello", workload="hello")
    server = start_prometheus(tmp_path / "prometheus", haproxy_target="127.0.0.1:9",
                              latency_target="127.0.0.1:9")
    try:
        for metric in template["spec"]["metrics"]:
            query = (metric["provider"]["prometheus"]["query"]
                     .replace("{{args.canary-hash}}", "abc").replace("{{args.stable-hash}}", "def")
                     .replace("{{args.window}}", "600s"))
            body = httpx.get(f"{server.url}/api/v1/query", params={"query": query},
                             timeout=10).json()
            assert body["status"] == "success", (metric["name"], body)
            values = [float(r["value"][1]) for r in body["data"]["result"]]
            assert values == [0.0], (metric["name"], values)
    finally:
        server.stop()


def test_rollout_metric_names_cannot_inject_promql() -> None:
    with pytest.raises(ValidationError, match="not a Prometheus metric"):
        RolloutMetrics(requests_metric='x{a="b"} or vector(1)')
    with pytest.raises(ValidationError, match="one PromQL label matcher"):
        RolloutMetrics(error_matcher='code="5"} or vector(1) or {a="b"')
    assert PROD_CANARY is not None
    with pytest.raises(ConfigurationError, match="not a Kubernetes object name"):
        render_canary(PROD_CANARY, app="Hello World", workload="hello")


# --- a token over HTTP ----------------------------------------------------------------------


@dataclass
class HttpRemote:
    """A bare repository behind ``git http-backend`` on loopback, behind Basic auth."""

    url: str
    token: str
    seen_auth: list[bool]


@pytest.fixture()
def http_remote(remote: Remote) -> Iterator[HttpRemote]:
    """Serve ``remote`` over smart HTTP on a free port; only the right token gets in."""
    token = secrets.token_urlsafe(16)
    expected = "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode()
    seen: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            ok = self.headers.get("Authorization") == expected
            seen.append(ok)
            if not ok:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="gitops"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(remote.bare.parent),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REMOTE_USER": "portcullis",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            }
            out = subprocess.run(["git", "http-backend"], input=body, env=env,
                                 capture_output=True, timeout=30, check=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status = 200
            headers = []
            for line in head.decode().split("\r\n"):
                key, _, value = line.partition(": ")
                if key.lower() == "status":
                    status = int(value.split()[0])
                else:
                    headers.append((key, value))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _serve
        do_POST = _serve

    with serving(Handler) as port:
        yield HttpRemote(f"http://127.0.0.1:{port}/{remote.bare.name}", token, seen)


def test_a_token_reaches_the_server_in_a_header_and_never_in_errors(
    http_remote: HttpRemote, remote: Remote, tmp_path: Path
) -> None:
    good = GitOpsTarget(http_remote.url, tmp_path / "work", token=SecretStr(http_remote.token))
    pushed = good.promote("hello", "prod", image(1), trace("alice"))
    assert pushed.sha == remote.head()
    assert http_remote.seen_auth and all(http_remote.seen_auth)

    wrong = GitOpsTarget(http_remote.url, tmp_path / "work2", token=SecretStr("not-the-token"))
    with pytest.raises(ConfigurationError, match="refused the credentials") as refused:
        wrong.current_digest("prod", "hello")
    assert "not-the-token" not in str(refused.value)
    assert http_remote.token not in str(refused.value)

    with pytest.raises(ConfigurationError, match="not an https URL"):
        GitOpsTarget(str(remote.bare), tmp_path / "w3", token=SecretStr("t"))
    with pytest.raises(ConfigurationError, match="not an https URL"):
        GitOpsTarget("http://git.example.com/r.git", tmp_path / "w4", token=SecretStr("t"))


# --- the block and the tasks ----------------------------------------------------------------


def test_the_block_reads_its_environment(monkeypatch: pytest.MonkeyPatch, remote: Remote,
                                          tmp_path: Path) -> None:
    monkeypatch.delenv("PORTCULLIS_GITOPS_REPO_URL", raising=False)
    with pytest.raises(ConfigurationError, match="PORTCULLIS_GITOPS_REPO_URL"):
        GitOpsTargetBlock.from_env()
    monkeypatch.setenv("PORTCULLIS_GITOPS_REPO_URL", remote.url)
    monkeypatch.setenv("PORTCULLIS_GITOPS_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("PORTCULLIS_GITOPS_MAX_PUSH_ATTEMPTS", "5")
    block = GitOpsTargetBlock.from_env()
    assert block.branch == "main" and block.token is None
    built = block.get_target()
    assert built.max_push_attempts == 5 and built.workdir == tmp_path / "work"
    assert built.current_digest("prod", "hello") is None


@pytest.mark.prefect_server
def test_the_tasks_promote_and_revert_in_a_flow(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch, remote: Remote, tmp_path: Path
) -> None:
    from prefect import flow

    from tasks.gitops import commit_promotion, revert_promotion

    monkeypatch.setenv("PORTCULLIS_GITOPS_REPO_URL", remote.url)
    monkeypatch.setenv("PORTCULLIS_GITOPS_WORKDIR", str(tmp_path / "work"))

    @flow
    def promote_then_revert() -> tuple[GitOpsCommit, GitOpsCommit, GitOpsCommit]:
        one = commit_promotion("hello", "prod", image(1), SOURCE_COMMIT, FLOW_RUN, ["alice"])
        two = commit_promotion("hello", "prod", image(2), SOURCE_COMMIT, FLOW_RUN, ["bob"])
        back = revert_promotion("prod", "canary failed", FLOW_RUN)
        return one, two, back

    one, two, back = promote_then_revert()
    assert back.digest == one.digest == digest(1)
    assert two.digest == digest(2)
    assert remote.head() == back.sha
    assert remote.overlay()["images"][0]["digest"] == digest(1)
