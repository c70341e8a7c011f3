"""The deploy lock refuses to be shared when someone changes it through the Prefect API.

The lock is a Prefect global concurrency limit, and anyone with the API can change one: disable
it (a disabled limit grants every request, silently), raise its limit, give it slot decay, or
reset its slot count while a run holds it. Given each change, on a real Prefect server, a
second promotion that gets the slot gives it back, records ``lock.refused`` and stops, instead
of deploying alongside the first.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from portcullis.audit import AuditLog
from portcullis.errors import ConfigurationError
from tasks.gates import RunAudit, ensure_environment_lock, environment_lock, lock_name

pytestmark = [pytest.mark.prefect_server]

WINDOW = 4.0


def _events(path: Path) -> list[tuple[str, str | None, Any]]:
    return [(r.event, r.run_id, r.details.get("reason")) for r in AuditLog(path).records()]


@pytest.mark.parametrize(("change", "said"), [
    ({"active": False}, "is disabled"),
    ({"limit": 3}, "allows 3 at once"),
    ({"slot_decay_per_second": 1.0}, "frees held slots by decay"),
])
def test_a_changed_lock_is_given_back_and_refused(
    prefect_harness: None, tmp_path: Path, change: dict[str, Any], said: str,
) -> None:
    environment = f"tampered-{secrets.token_hex(3)}"
    ensure_environment_lock(environment)
    name = lock_name(environment)
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**change))
    audit = RunAudit(AuditLog(tmp_path / "audit.jsonl"), "run-b", "lockapp", environment)
    with pytest.raises(ConfigurationError, match=said), environment_lock(
            environment, audit, window_seconds=WINDOW, state_dir=tmp_path / "locks"):
        pytest.fail("deployed under a lock someone changed")
    (refused,) = _events(tmp_path / "audit.jsonl")
    assert refused[:2] == ("lock.refused", "run-b") and said in refused[2]
    with get_client(sync_client=True) as client:
        # Given back: restored, the lock is free for the next run at once.
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
            active=True, limit=1, slot_decay_per_second=0.0))
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
    with environment_lock(environment, audit, window_seconds=WINDOW, state_dir=tmp_path / "locks"):
        pass


def test_a_slot_count_reset_under_a_live_holder_lets_nobody_else_in(
    prefect_harness: None, tmp_path: Path,
) -> None:
    environment = f"reset-{secrets.token_hex(3)}"
    locks = tmp_path / "locks"
    holder = RunAudit(AuditLog(tmp_path / "a.jsonl"), "run-a", "lockapp", environment)
    second = RunAudit(AuditLog(tmp_path / "b.jsonl"), "run-b", "lockapp", environment)
    with environment_lock(environment, holder, window_seconds=WINDOW, state_dir=locks):
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(
                lock_name(environment), GlobalConcurrencyLimitUpdate(active_slots=0))
        with pytest.raises(ConfigurationError, match="still holds it"), environment_lock(
                environment, second, window_seconds=WINDOW, state_dir=locks):
            pytest.fail("deployed while another run held the lock")
    assert [e[0] for e in _events(tmp_path / "a.jsonl")] == ["lock.acquired", "lock.released"]
    assert [e[0] for e in _events(tmp_path / "b.jsonl")] == ["lock.refused"]
