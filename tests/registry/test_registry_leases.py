"""Branch leases: at most one live run per branch, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
from test_registry_migrations import make_v1

from tlreg.registry import BranchNotFound, Registry
from tlreg.registry.leases import BranchLeased, LeaseKeeper, LeaseLost

THREADS = 8


def test_a_second_run_on_a_leased_branch_is_refused_naming_the_live_run(
    registry: Registry,
) -> None:
    registry.create_branch("race")
    run, lease = registry.start_leased_run("race", {"steps": 60})
    assert lease.run_id == run.id and lease.holder == f"run {run.id}"
    with pytest.raises(BranchLeased) as refused:
        registry.start_leased_run("race", {"steps": 60})
    message = str(refused.value)
    assert message.startswith(f"branch 'race' already has a live run: run {run.id} on host ")
    assert f"(pid {lease.pid}) since {lease.acquired:%Y-%m-%d %H:%M:%S} UTC" in message
    # The refused run left no Run row behind.
    assert [r.id for r in registry.runs("race")] == [run.id]
    assert registry.lease("race") == lease


def test_concurrent_takers_of_one_branch_get_exactly_one_lease(registry_url: str) -> None:
    with Registry(registry_url) as reg:
        reg.create_branch("race")
    barrier = threading.Barrier(THREADS)
    won: list[int] = []
    refused: list[str] = []

    def take() -> None:
        with Registry(registry_url) as reg:
            barrier.wait(timeout=30)
            try:
                run, _lease = reg.start_leased_run("race", {})
                won.append(run.id)
            except BranchLeased as e:
                refused.append(str(e))

    threads = [threading.Thread(target=take) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == THREADS - 1
    assert all(f"live run: run {won[0]} on host" in r for r in refused)
    with Registry(registry_url) as reg:
        assert [r.id for r in reg.runs("race")] == won


def test_an_expired_lease_is_taken_over_and_its_dead_run_marked_failed(
    registry: Registry,
) -> None:
    registry.create_branch("b")
    dead_run, dead = registry.start_leased_run("b", {}, ttl_s=0.05)
    time.sleep(0.1)  # no heartbeat: the holder died
    assert registry.lease("b") is None
    run, lease = registry.start_leased_run("b", {})
    assert lease.run_id == run.id
    [old] = [r for r in registry.runs("b") if r.id == dead_run.id]
    assert old.status == "failed"
    assert old.error is not None
    assert old.error.startswith(f"abandoned: no heartbeat from {dead.host}")
    assert old.error.endswith(f"run {run.id} took the branch over")
    # The dead holder learns it at its next heartbeat, and cannot release the new lease.
    with pytest.raises(LeaseLost, match=rf"^run {dead_run.id} lost its lease on branch 'b'"):
        registry.heartbeat_lease(dead)
    assert registry.release_lease(dead) is False
    assert registry.lease("b") == lease


def test_heartbeats_keep_a_lease_alive_and_release_frees_the_branch(
    registry: Registry,
) -> None:
    registry.create_branch("b")
    lease = registry.acquire_lease("b", holder="my-script", ttl_s=0.3)
    with LeaseKeeper(registry, lease, ttl_s=0.3) as keeper:
        time.sleep(0.8)  # longer than the ttl: only the heartbeats keep it
        live = registry.lease("b")
        assert live is not None and live.token == lease.token and live.holder == "my-script"
        assert live.expires > lease.expires
        assert not keeper.lost.is_set()
    assert registry.lease("b") is None
    registry.acquire_lease("b", holder="next")


def test_a_lease_on_a_missing_branch_is_branch_not_found(registry: Registry) -> None:
    with pytest.raises(BranchNotFound):
        registry.acquire_lease("nope", holder="x")
    with pytest.raises(BranchNotFound):
        registry.start_leased_run("nope", {})


def test_a_registry_upgraded_to_v6_leases_branches_of_its_runs(registry_url: str) -> None:
    make_v1(registry_url, with_data=False)
    Registry.upgrade(registry_url)
    with Registry(registry_url) as reg:
        reg.create_branch("main")
        run, lease = reg.start_leased_run("main", {"steps": 3})
        assert (run.id, lease.holder) == (1, "run 1")
        with pytest.raises(BranchLeased):
            reg.acquire_lease("main", holder="another")


def test_a_branch_with_a_live_run_is_neither_deleted_nor_renamed_until_it_ends(
    registry: Registry,
) -> None:
    registry.create_branch("busy")
    run, lease = registry.start_leased_run("busy", {})
    for attempt in (
        lambda: registry.delete_branch("busy"),
        lambda: registry.delete_branch("busy", force=True),
        lambda: registry.rename_branch("busy", "moved"),
    ):
        with pytest.raises(BranchLeased, match=rf"live run \(run {run.id} on host .*: cannot"):
            attempt()
    assert [b.name for b in registry.branches()] == ["busy"]
    registry.release_lease(lease)
    assert registry.rename_branch("busy", "moved").name == "moved"
    registry.delete_branch("moved")
    assert registry.branches() == []
