"""Gates in the promote flow, on a real Prefect server, Docker engine, registry and trivy.

Given the example app built in dev, when it is promoted to staging and prod, then each
environment's policy is enforced: prod waits for two verified approvals from different groups,
refuses a forged code and the commit author's self-approval, and leaves an audit log whose
verify command passes and fails after one changed byte. Staging refuses a digest that never
passed dev; a freeze window refuses the run with its name, reason and end; two promotions
racing for one environment meet at its lock and deploy one at a time.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import docker
import pyotp
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

from flows.promote import promote
from flows.rollback import clear_pin, rollback
from portcullis.errors import PolicyRefusal
from portcullis.results import PromotionResult
from portcullis.settings import Settings
from portcullis.state import open_state
from tasks.deploy import LABEL_APPROVED_BY
from tasks.gates import ensure_environment_lock, lock_name
from tests.conftest import AppRepo, PipelineEnv, without_canary
from tests.support.approval_driver import Resumer
from tests.support.codes import Codes

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow,
              pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRETS = {name: pyotp.random_base32() for name in ("alice", "bob", "carol", "ada", "trent")}
GROUPS = {"alice": "security", "bob": "platform", "carol": "platform", "ada": "platform",
          "trent": "developers"}
# Every identity the directory knows for each person: bob also commits from a private address.
ALIASES = {"bob": ["bob@example.com", "bob.personal@example.org"]}
NO_FREEZE = '[freeze]\ncalendar = "off"\n'


def _policies(directory: Path, prod_freeze: str = NO_FREEZE) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dev.toml").write_text(without_canary((REPO_ROOT / "policies" / "dev.toml").read_text()))
    base = ('allowed_branches = ["main"]\nallowed_repositories = ["file://*"]\n'
            '[scan]\nthreshold = "HIGH"\n')
    (directory / "staging.toml").write_text(
        'environment = "staging"\npromote_from = "dev"\n' + base +
        '[approval]\nrequired_approvals = 1\ntimeout = "PT5M"\n' + NO_FREEZE)
    (directory / "prod.toml").write_text(
        'environment = "prod"\npromote_from = "staging"\n' + base +
        '[approval]\nrequired_approvals = 2\nrequired_groups = ["security", "platform"]\n'
        'timeout = "PT5M"\n' + prod_freeze)


@pytest.fixture()
def gated(pipeline_env: PipelineEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Policies with approvals, an approvers file (0600) and a fast approval poll."""
    policy_dir = tmp_path / "policies"
    _policies(policy_dir)
    approvers = tmp_path / "deploy-side" / "approvers.toml"
    approvers.parent.mkdir(mode=0o700)
    approvers.write_text("".join(
        f'[[approver]]\nname = "{n}"\ngroups = ["{GROUPS[n]}"]\n'
        f'aliases = {json.dumps(ALIASES.get(n, [f"{n}@example.com"]))}\n'
        f'totp_secret = "{s}"\n\n' for n, s in SECRETS.items()))
    approvers.chmod(0o600)
    monkeypatch.setenv("PORTCULLIS_POLICY_DIR", str(policy_dir))
    monkeypatch.setenv("PORTCULLIS_APPROVERS_FILE", str(approvers))
    monkeypatch.setenv("PORTCULLIS_APPROVAL_POLL_SECONDS", "1")
    return policy_dir


def form(name: str, digest: str, code: str | None = None) -> dict[str, Any]:
    return {"approver": name, "code": code or codes(name),
            "digest_prefix": digest[7:19], "decision": "approve", "comment": "looks good"}


#: An unused code of a person's for each call (codes are burned once used).
codes = code = Codes(SECRETS)


def _run(name: str, **params: Any) -> PromotionResult:
    return promote.with_options(flow_run_name=name)(**params)  # type: ignore[no-any-return]


def test_dev_to_staging_to_prod_with_two_verified_approvals(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv, app_repo: AppRepo,
    app_name: str, docker_client: docker.DockerClient,
) -> None:
    # Ada wrote the commit (the app_repo author is "Ada Author <ada@example.com>").
    dev = _run(f"{app_name}-dev", app=app_name, environment="dev", source_repo=str(app_repo.path),
               commit="HEAD", ref="main", context_path=".", requested_by="trent")
    image = str(dev.image)

    staging_resumer = Resumer(f"{app_name}-staging")
    t1 = staging_resumer.play([lambda: form("carol", dev.image.digest)])
    staging = _run(f"{app_name}-staging", app=app_name, environment="staging", image=image,
                   requested_by="trent", requester_code=code("trent"))
    t1.join(30)
    assert staging_resumer.error is None, staging_resumer.error
    assert staging.approved_by == ("carol",)
    assert staging.built is None  # staging never rebuilds
    assert staging.deployment is not None  # the container says who let it in
    labels = docker_client.containers.get(staging.deployment.container_id).labels
    assert labels[LABEL_APPROVED_BY] == "carol"

    forged = "000000" if pyotp.TOTP(SECRETS["alice"]).now() != "000000" else "111111"
    prod_resumer = Resumer(f"{app_name}-prod")
    t2 = prod_resumer.play([
        lambda: form("alice", dev.image.digest, code=forged),   # forged code: refused
        lambda: form("ada", dev.image.digest),                  # the commit author: refused
        lambda: form("alice", dev.image.digest),                # security
        lambda: form("bob", dev.image.digest),                  # platform
    ])
    prod = _run(f"{app_name}-prod", app=app_name, environment="prod", image=image,
                requested_by="trent", requester_code=code("trent"))
    t2.join(30)
    assert prod_resumer.error is None, prod_resumer.error
    assert prod.approved_by == ("alice", "bob")
    assert "Refused" in prod_resumer.descriptions[1]
    assert "wrote commit" in prod_resumer.descriptions[2] or "author" in prod_resumer.descriptions[2]

    records = open_state(Settings(home=pipeline_env.home)).audit_log().records()
    prod_events = [(r.event, r.actor) for r in records if r.environment == "prod"]
    assert ("promotion.completed", "portcullis") in prod_events
    assert [e for e in prod_events if e[0] == "approval.accepted"] == [
        ("approval.accepted", "alice"), ("approval.accepted", "bob")]
    assert all(r.run_id and r.at for r in records)

    store = Settings(home=pipeline_env.home).state_database_url.render_as_string()
    verify = [sys.executable, "-m", "portcullis.audit", "verify", store]
    assert subprocess.run(verify, capture_output=True, check=False).returncode == 0
    middle = len(records) // 2
    with closing(sqlite3.connect(pipeline_env.home / "state.db")) as db, db:
        # The file's owner can drop the append-only trigger; the chain still shows the edit.
        db.execute("DROP TRIGGER audit_records_no_update")
        (body,) = db.execute("SELECT body FROM audit_records WHERE seq = ?", (middle,)).fetchone()
        raw = bytearray(body)
        raw[len(raw) // 2] ^= 0x01  # one changed byte in the middle of a record
        db.execute("UPDATE audit_records SET body = ? WHERE seq = ?", (bytes(raw), middle))
    broken = subprocess.run(verify, capture_output=True, text=True, check=False)
    assert broken.returncode == 1 and f"BROKEN: record {middle} " in broken.stdout


def test_staging_refuses_a_digest_that_never_passed_dev(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv,
) -> None:
    ghost = "127.0.0.1:1/portcullis/ghost@sha256:" + "ab" * 32
    with pytest.raises(PolicyRefusal, match="never passed dev"):
        _run("ghost-staging", app="ghost", environment="staging", image=ghost,
             requested_by="trent", requester_code=code("trent"))


def test_a_freeze_window_refuses_the_run_with_its_name_reason_and_end(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv,
) -> None:
    _policies(gated, prod_freeze=(
        '[freeze]\ncalendar = "off"\n[[freeze.windows]]\nkind = "once"\nname = "launch-week"\n'
        'reason = "marketing launch"\ntz = "America/New_York"\n'
        'start = "2020-01-01T00:00:00"\nend = "2099-01-01T00:00:00"\n'))
    with pytest.raises(PolicyRefusal) as err:
        _run("frozen-prod", app="hello", environment="prod",
             image="127.0.0.1:1/portcullis/hello@sha256:" + "cd" * 32,
             requested_by="trent", requester_code=code("trent"))
    message = str(err.value)
    assert "launch-week" in message and "marketing launch" in message and "2099" in message


def test_two_promotions_racing_for_one_environment_deploy_one_at_a_time(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv, app_repo: AppRepo,
    app_name: str,
) -> None:
    # Given dev's deploy slot held (as a deploy in progress holds it), when two promotions start
    # together (a barrier), then both reach the lock while it is held; once it frees, one takes
    # it and the other waits until that one has released it.
    trail = open_state(Settings(home=pipeline_env.home)).audit_log()
    ensure_environment_lock("dev")
    with get_client(sync_client=True) as client:
        taken = client.increment_concurrency_slots_with_lease(
            names=[lock_name("dev")], slots=1, mode="concurrency", lease_duration=600)
    held = ConcurrencyLimitWithLeaseResponse.model_validate(taken.json()).lease_id
    results: list[Any] = []
    start = threading.Barrier(2)

    def go(i: int) -> None:
        start.wait(60)
        try:
            results.append(_run(f"{app_name}-race-{i}", app=app_name, environment="dev",
                                source_repo=str(app_repo.path), commit="HEAD", ref="main",
                                context_path="."))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    def at_lock() -> set[str | None]:
        # Listing the change is the last step before the lock (flows/promote.py).
        return {r.run_id for r in trail.records() if r.app == app_name and r.event.startswith("change.")}

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 300
        while len(at_lock()) < 2 and len(results) < 2 and time.monotonic() < deadline:
            threads[0].join(0.2)  # a bounded wait for the next look at the audit trail
        assert len(at_lock()) == 2, results
        before_release = len(trail.records())
    finally:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(held)
    for t in threads:
        t.join(300)
    assert all(isinstance(r, PromotionResult) for r in results), results
    records = trail.records()
    lock_events = [(i, r.event, r.run_id) for i, r in enumerate(records) if r.event.startswith("lock.")]
    # Never interleaved: the second acquired only after the first released (it waited).
    assert [e for _, e, _ in lock_events] == ["lock.acquired", "lock.released"] * 2
    (_, _, first), (_, _, first_again), (_, _, second), (_, _, second_again) = lock_events
    assert first == first_again and second == second_again and first != second
    # Nobody passed the lock while the slot was held, and both runs were waiting at it then.
    assert lock_events[0][0] >= before_release
    assert {first, second} == at_lock()


def test_a_requester_cannot_name_someone_else_nor_go_unproven(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv,
) -> None:
    # trent names bob as the requester (so that trent could approve himself): bob's identity
    # needs bob's code; trent's own code does not prove it.
    image = "127.0.0.1:1/portcullis/hello@sha256:" + "ef" * 32
    with pytest.raises(PolicyRefusal, match="requester code for bob is wrong"):
        _run("impersonated-staging", app="hello", environment="staging", image=image,
             requested_by="bob", requester_code=code("trent"))
    with pytest.raises(PolicyRefusal, match="needs a verified requester"):
        _run("unproven-staging", app="hello", environment="staging", image=image,
             requested_by="bob")
    with pytest.raises(PolicyRefusal, match="not an enrolled identity"):
        _run("stranger-staging", app="hello", environment="staging", image=image,
             requested_by="mallory", requester_code="123456")
    records = open_state(Settings(home=pipeline_env.home)).audit_log().records()
    refused = [(r.event, r.actor, r.details.get("claimed")) for r in records
               if r.event == "requester.refused"]
    assert refused == [("requester.refused", "unverified", "bob")] * 2 + [
        ("requester.refused", "unverified", "mallory")]
    assert not any(r.event in ("approval.requested", "promotion.completed") for r in records)


def test_a_rollback_or_unpin_where_people_approve_needs_a_proven_requester(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv,
) -> None:
    # The pin and the signed rollback record name who asked: in staging (approvers needed) the
    # name must be proven as for a promotion, before anything is looked at or changed.
    with pytest.raises(PolicyRefusal, match="requester code for bob is wrong"):
        rollback.with_options(flow_run_name="impersonated-rollback")(
            app="hello", environment="staging", reason="test", requested_by="bob",
            requester_code=code("trent"))
    with pytest.raises(PolicyRefusal, match="needs a verified requester"):
        rollback.with_options(flow_run_name="unproven-rollback")(
            app="hello", environment="staging", reason="test", requested_by="bob")
    with pytest.raises(PolicyRefusal, match="needs a verified requester"):
        clear_pin.with_options(flow_run_name="unproven-unpin")(
            app="hello", environment="staging", requested_by="bob")
    # Proven, the same request goes on, and is refused only for what is true of staging.
    with pytest.raises(PolicyRefusal, match="not pinned"):
        clear_pin.with_options(flow_run_name="proven-unpin")(
            app="hello", environment="staging", requested_by="bob", requester_code=code("bob"))
    records = open_state(Settings(home=pipeline_env.home)).audit_log().records()
    refused = [(r.details.get("claimed"), r.run_id) for r in records if r.event == "requester.refused"]
    assert [claimed for claimed, _ in refused] == ["bob"] * 3
    established = [r for r in records if r.event == "requester.established"]
    assert [(r.details["requester"], r.details["proof"]) for r in established][-1:] == [("bob", "totp")]
    refused_runs = {run for _, run in refused}
    assert not any(r.event in ("lock.acquired", "environment.pinned", "environment.unpinned")
                   for r in records if r.run_id in refused_runs)


def test_an_author_of_any_commit_in_the_change_cannot_approve(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv, app_repo: AppRepo,
    app_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bob wrote an earlier commit of the change from his private address; Ada wrote HEAD.
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Robert Bee")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "bob.personal@example.org")
    app_repo.commit_config("bob's part of the change", MESSAGE='"from bob"')
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ada Author")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ada@example.com")
    app_repo.commit_config("ada's part of the change", MESSAGE='"from ada"')
    dev = _run(f"{app_name}-dev", app=app_name, environment="dev", source_repo=str(app_repo.path),
               commit="HEAD", ref="main", context_path=".")

    resumer = Resumer(f"{app_name}-staging")
    t = resumer.play([lambda: form("bob", dev.image.digest), lambda: form("carol", dev.image.digest)])
    staging = _run(f"{app_name}-staging", app=app_name, environment="staging", image=str(dev.image),
                   requested_by="trent", requester_code=code("trent"))
    t.join(30)
    assert resumer.error is None, resumer.error
    assert staging.approved_by == ("carol",)
    assert "authored a commit in this change" in resumer.descriptions[1]
    records = open_state(Settings(home=pipeline_env.home)).audit_log().records()
    listed = next(r for r in records if r.event == "change.listed" and r.environment == "staging")
    assert "Robert Bee <bob.personal@example.org>" in listed.details["authors"]  # type: ignore[operator]
