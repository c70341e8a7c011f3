"""The lease rules (pure) and the lease files they act on.

Given a canary's traffic lease, the rule says what to do once the holder stops renewing it:
nothing while it is live; traffic back to stable and the canary removed once it expired;
never remove a container the router already serves as stable. A holder may act only while
its lease is its own and live, and an expired lease is never brought back by a late renewal.
"""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from portcullis.lease import (
    LeaseKeeper,
    LeaseLost,
    LeaseStore,
    LockLease,
    RouteView,
    TrafficLease,
    expired,
    may_renew,
    reclaim_traffic,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _lease(holder: str = "run-a/pid1@h", expires_in: float = 6.0, port: int = 20001) -> TrafficLease:
    return TrafficLease(subject="web.dev", holder=holder, pid=1, host="h", ttl_seconds=6.0,
                        expires_at=T0 + timedelta(seconds=expires_in), app="web",
                        environment="dev", canary_container="c0ffee", canary_port=port)


ROUTE = RouteView(stable_port=20000, canary_port=20001, canary_weight=20)


def test_a_live_lease_is_left_alone() -> None:
    assert reclaim_traffic(_lease(), ROUTE, T0) is None
    assert reclaim_traffic(_lease(), ROUTE, T0 + timedelta(seconds=5.9)) is None


def test_an_expired_canary_goes_back_to_stable_and_is_removed() -> None:
    action = reclaim_traffic(_lease(), ROUTE, T0 + timedelta(seconds=6))
    assert action is not None
    assert action.restore_stable and action.remove_canary
    assert "run-a" in action.reason


def test_a_canary_already_made_stable_is_kept() -> None:
    # The run died between "stable -> canary's port" and releasing its lease.
    promoted = RouteView(stable_port=20001, canary_port=20001, canary_weight=100)
    action = reclaim_traffic(_lease(), promoted, T0 + timedelta(seconds=7))
    assert action is not None and not action.remove_canary and action.restore_stable
    settled = RouteView(stable_port=20001, canary_port=None, canary_weight=0)
    action = reclaim_traffic(_lease(), settled, T0 + timedelta(seconds=7))
    assert action is not None and not action.remove_canary and not action.restore_stable


def test_without_a_route_only_the_container_goes() -> None:
    action = reclaim_traffic(_lease(), None, T0 + timedelta(seconds=7))
    assert action is not None and action.remove_canary and not action.restore_stable


def test_only_the_live_holder_may_renew() -> None:
    lease = _lease()
    assert may_renew(lease, lease.holder, T0)
    assert not may_renew(lease, "run-b/pid2@h", T0)
    assert not may_renew(lease, lease.holder, T0 + timedelta(seconds=6))
    assert not may_renew(None, lease.holder, T0)
    assert expired(lease, T0 + timedelta(seconds=6)) and not expired(lease, T0)


def test_a_late_renewal_does_not_revive_an_expired_lease(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, TrafficLease)
    store.take(_lease())
    assert store.renew("web.dev", "run-a/pid1@h", T0 + timedelta(seconds=1)) is not None
    assert store.renew("web.dev", "run-b/pid2@h", T0 + timedelta(seconds=2)) is None
    late = T0 + timedelta(seconds=30)
    assert store.renew("web.dev", "run-a/pid1@h", late) is None
    assert store.read("web.dev") is not None and expired(store.read("web.dev"), late)  # type: ignore[arg-type]
    store.release("web.dev", "run-b/pid2@h")  # not the holder: nothing happens
    assert store.subjects() == ["web.dev"]
    store.release("web.dev", "run-a/pid1@h")
    assert store.subjects() == []


def test_a_keeper_that_lost_its_lease_refuses_to_act(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, LockLease)
    lease = LockLease(subject="dev", holder="run-a/pid1@h", pid=1, host="h", ttl_seconds=30,
                      expires_at=T0, environment="dev", prefect_lease_id="x")
    keeper = LeaseKeeper(store, lease).start()
    with keeper.acting():
        pass
    # Another holder took over (as a waiter does once the heartbeat expired).
    store.take(lease.model_copy(update={"holder": "run-b/pid2@h"}))
    with pytest.raises(LeaseLost):
        keeper.ensure_held()
    assert keeper.lost.is_set()
    keeper.stop()
    assert store.read("dev") is not None and store.read("dev").holder == "run-b/pid2@h"  # type: ignore[union-attr]


def _renew_many(directory: str, holder: str, count: int) -> int:
    store = LeaseStore(Path(directory), TrafficLease)
    ok = 0
    for i in range(count):
        ok += store.renew("web.dev", holder, T0 + timedelta(milliseconds=i)) is not None
    return ok


def test_renewals_from_other_processes_never_corrupt_the_file(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path, TrafficLease)
    store.take(_lease(expires_in=3600))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_renew_many, [(str(tmp_path), "run-a/pid1@h", 200)] * 2)
    assert results == [200, 200]
    assert store.read("web.dev") is not None
