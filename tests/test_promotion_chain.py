"""The chain trusts signatures, not files: end to end on a real Prefect server, Docker engine,
registry (token mode, promoter account) and trivy.

Given the example app promoted to dev, when someone forges a ``promotion.completed`` line for
staging (the audit log's writer rewrites the anchor, so ``portcullis.audit verify`` passes),
then prod still refuses the digest: staging's deploy side never signed a record for it. When
the digest really goes through staging and prod, each completed promotion leaves a record
that ``python -m portcullis verify-promotion`` verifies offline and prints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.promote import promote
from portcullis.audit import AuditEntry
from portcullis.errors import PolicyRefusal
from portcullis.results import PromotionResult
from portcullis.settings import Settings
from portcullis.state import open_state
from tests.conftest import REPO_ROOT, AppRepo, PipelineEnv
from tests.support.approval_driver import Resumer
from tests.test_gated_promotions import code, form
from tests.test_gated_promotions import gated as gated  # noqa: PLC0414 - the fixture, by name

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow,
              pytest.mark.timeout(600)]



def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          check=False, cwd=REPO_ROOT, timeout=120)


def _promote(app: str, environment: str, approvers: tuple[str, ...] = (), **kw: str) -> PromotionResult:
    name = f"{app}-{environment}"
    resumer = Resumer(name)
    digest = kw.get("image", "@").split("@")[1]
    thread = resumer.play([lambda a=a: form(a, digest) for a in approvers]) if approvers else None
    result = promote.with_options(flow_run_name=name)(
        app=app, environment=environment, requested_by="trent",
        requester_code=code("trent") if environment != "dev" else "", **kw)
    if thread is not None:
        thread.join(30)
        assert resumer.error is None, resumer.error
    return result  # type: ignore[no-any-return]


def test_a_forged_log_line_gets_nothing_into_prod_and_real_promotions_are_signed(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv, app_repo: AppRepo,
    app_name: str,
) -> None:
    dev = _promote(app_name, "dev", source_repo=str(app_repo.path), commit="HEAD", ref="main",
                   context_path=".")
    image = str(dev.image)
    shown = _cli("portcullis", "verify-promotion", image, "--environment", "dev", "--app", app_name)
    assert "approved by nobody" in shown.stdout
    assert shown.returncode == 0, shown.stderr
    assert f"VERIFIED: {app_name} in dev" in shown.stdout
    assert "evidence provenance:" in shown.stdout and "evidence scan:" in shown.stdout
    assert "[attestation sha256:" in shown.stdout  # which attestation was verified

    # The attack: a promotion.completed record for staging, appended by a writer of the audit
    # trail itself (a direct insert), so the hash chain agrees with it.
    trail = open_state(Settings(home=pipeline_env.home)).audit_log()
    trail.append(AuditEntry(
        event="promotion.completed", actor="portcullis", run_id="forged", app=app_name,
        environment="staging", digest=dev.image.digest, details={"image": image}))
    audit_ok = _cli("portcullis.audit", "verify")  # the configured store
    assert audit_ok.returncode == 0, audit_ok.stdout + audit_ok.stderr
    with pytest.raises(PolicyRefusal, match=f"{dev.image.digest} never passed staging"):
        _promote(app_name, "prod", image=image)
    not_staging = _cli("portcullis", "verify-promotion", image, "--environment", "staging")
    assert not_staging.returncode != 0
    assert "no staging promotion record signed by staging's deploy side" in not_staging.stderr

    staging = _promote(app_name, "staging", ("carol",), image=image)
    assert staging.built is None and staging.image == dev.image
    prod = _promote(app_name, "prod", ("alice", "bob"), image=image)
    assert prod.deployment is not None and prod.deployment.image.digest == dev.image.digest

    shown = _cli("portcullis", "verify-promotion", image, "--environment", "prod")
    assert shown.returncode == 0, shown.stderr
    print(f"\nverify-promotion --environment prod:\n{shown.stdout}")
    assert f"promotion to prod of {app_name}" in shown.stdout
    assert "requested by trent" in shown.stdout and "freeze   clear" in shown.stdout
    assert "evidence signature: signed by key:" in shown.stdout
    assert "approved by alice at " in shown.stdout and "approved by bob at " in shown.stdout
    assert "time step" in shown.stdout  # how each approver's identity was verified

    # The audit trail names each signed record; the chain check names the one it trusted.
    records = trail.records()
    completed = [r for r in records if r.event == "promotion.completed" and r.run_id != "forged"]
    assert [r.environment for r in completed] == ["dev", "staging", "prod"]
    assert all(str(r.details["promotion_record"]).endswith(".att") for r in completed)
    checked = [r for r in records if r.event == "chain.checked"]
    assert [r.details["passed_in"] for r in checked] == ["dev", "staging"]
    assert all("signed by key:" in str(r.details["record"]) for r in checked)
