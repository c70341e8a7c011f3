"""Manual rollback through the real flows, behind the real router, under load.

Given v1 and then v2 promoted to dev (v2 through the canary, while the stack's users send
requests through the front door: infra/loadgen.py in the background), when someone rolls dev back,
then v1 (verified again) serves, not one request fails during the switch, the environment is
pinned against schedules, and clearing the pin is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blocks.credentials import DeployCredentials
from flows.promote import promote
from flows.rollback import clear_pin, rollback
from infra.prometheus import free_tcp_port
from infra.traffic import Traffic, TrafficPorts, ensure_traffic, stop_traffic
from portcullis.environments import port_plan
from portcullis.errors import PolicyRefusal
from portcullis.promotion_record import verify_promotion
from portcullis.settings import Settings
from portcullis.state import open_state
from tests.conftest import AppRepo, PipelineEnv
from tests.support.users import users_at

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow,
              pytest.mark.timeout(600)]


@pytest.fixture()
def traffic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
            pipeline_env: PipelineEnv) -> Iterator[Traffic]:
    state = tmp_path_factory.mktemp("traffic")
    ports = TrafficPorts(free_tcp_port(), free_tcp_port(), free_tcp_port(), free_tcp_port())
    traffic = ensure_traffic(state, ports)
    # The repository's own dev policy, canary included.
    monkeypatch.setenv("PORTCULLIS_POLICY_DIR", str(Path(__file__).resolve().parents[1] / "policies"))
    monkeypatch.setenv("PORTCULLIS_TRAFFIC_DIR", str(state))
    monkeypatch.setenv("PORTCULLIS_PROMETHEUS_URL", traffic.prometheus_url)
    yield traffic
    stop_traffic(state)


def _promote(repo: AppRepo, app: str) -> Any:
    return promote(app=app, environment="dev", source_repo=str(repo.path), commit="HEAD",
                   ref="main", context_path=".")


def test_rollback_serves_the_previous_digest_without_failing_a_request_and_pins_it(
    prefect_harness: None, pipeline_env: PipelineEnv, traffic: Traffic, app_repo: AppRepo,
    app_name: str, tmp_path: Path,
) -> None:
    v1 = _promote(app_repo, app_name)
    front = f"http://127.0.0.1:{port_plan(app_name, 'dev').front}/cgi-bin/hello"
    with users_at(front, tmp_path / "users") as users:
        app_repo.commit_config("v2", MESSAGE='"hello v2"')
        v2 = _promote(app_repo, app_name)
        assert v2.canary is not None and v2.canary.phase.value == "Successful"
        assert "hello v2" in httpx.get(front, timeout=5).text

        before = users.counts(front)
        deployment = rollback(app=app_name, environment="dev", reason="v2 broke checkout",
                              requested_by="oncall-olga")
        # Every request sent during the rollback, up to a run that ended after it.
        result = users.next_runs(front, 1).since(before)

    assert deployment.image.digest == v1.image.digest
    assert deployment.previous_digest == v2.image.digest
    assert "hello from portcullis" in httpx.get(front, timeout=5).text
    print(f"\nFIGURE rollback under load: {result.requests} requests in {result.runs} runs, "
          f"{result.http_errors} HTTP errors, {result.socket_errors} socket errors")
    assert result.requests > 100
    assert result.http_errors == 0 and result.socket_errors == 0

    pin = open_state(Settings(home=pipeline_env.home)).pins.get(app_name, "dev")
    assert pin is not None and pin.digest == v1.image.digest and pin.pinned_by == "oncall-olga"
    events = [r.event for r in open_state(Settings(home=pipeline_env.home)).audit_log().records()
              if r.app == app_name]
    assert "rollback.completed" in events and "environment.pinned" in events
    # Signed records: what was rolled back to and why; v2's canary verdicts with their numbers.
    creds = DeployCredentials.from_env()
    with creds.registry_client() as client:
        rolled = verify_promotion(client, v1.image, "dev", creds.promotion_trust_root("dev"),
                                  app=app_name, kinds=("rollback",))
        promoted = verify_promotion(client, v2.image, "dev", creds.promotion_trust_root("dev"),
                                    app=app_name)
    assert rolled.predicate.rolled_back_from == v2.image.digest
    assert rolled.predicate.reason == "v2 broke checkout"
    assert rolled.predicate.requested_by == "oncall-olga"
    assert promoted.predicate.canary is not None and promoted.predicate.canary.phase == "Successful"
    assert [s.summary for s in promoted.predicate.canary.steps] == list(v2.canary.steps)

    assert clear_pin(app=app_name, environment="dev", requested_by="oncall-olga") == v1.image.digest
    assert open_state(Settings(home=pipeline_env.home)).pins.get(app_name, "dev") is None
    with pytest.raises(PolicyRefusal, match="not pinned"):
        clear_pin(app=app_name, environment="dev", requested_by="oncall-olga")


def test_rollback_of_a_first_deploy_is_refused(
    prefect_harness: None, pipeline_env: PipelineEnv, traffic: Traffic, app_repo: AppRepo,
    app_name: str,
) -> None:
    _promote(app_repo, app_name)
    with pytest.raises(PolicyRefusal, match="first deploy"):
        rollback(app=app_name, environment="dev", reason="test", requested_by="olga")
