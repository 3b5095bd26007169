"""Concurrent writers: the database, not the filesystem, serialises commits."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tlreg.registry import CheckpointRecord, HeadMoved, Registry

THREADS = 8
COMMITS_PER_THREAD = 5
T = TypeVar("T")


def run_in_threads(registry_url: str, work: Callable[[Registry, int], T]) -> list[T]:
    """Run ``work(registry, i)`` in THREADS threads, each with its own Registry (own pool, as
    separate processes would have), all released at once by a barrier."""
    barrier = threading.Barrier(THREADS)

    def worker(i: int) -> T:
        with Registry(registry_url) as reg:
            barrier.wait(timeout=30)
            return work(reg, i)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(worker, range(THREADS)))


def test_concurrent_default_commits_form_one_chain_without_lost_updates(
    registry: Registry, registry_url: str
) -> None:
    registry.create_branch("main")

    def work(reg: Registry, i: int) -> list[str]:
        return [
            reg.commit("main", f"t{i}-c{k}", step=k, objects={f"o{i}-{k}": 1}).id
            for k in range(COMMITS_PER_THREAD)
        ]

    committed = {cid for ids in run_in_threads(registry_url, work) for cid in ids}
    assert len(committed) == THREADS * COMMITS_PER_THREAD
    log = registry.log("main")
    assert {r.id for r in log} == committed
    assert len(log) == THREADS * COMMITS_PER_THREAD
    # One chain: each checkpoint's only parent is the next older one, the oldest is the root.
    for newer, older in itertools.pairwise(log):
        assert newer.parents == (older.id,)
    assert log[-1].parents == ()
    assert registry.get_branch("main").head == log[0].id
    assert registry.branch_bytes("main") == (0, THREADS * COMMITS_PER_THREAD)


def test_concurrent_commits_with_a_stale_expected_head_all_but_one_get_head_moved(
    registry: Registry, registry_url: str
) -> None:
    registry.create_branch("main")
    base = registry.commit("main", "base", step=0, objects={}).id

    def work(reg: Registry, i: int) -> CheckpointRecord | HeadMoved:
        try:
            return reg.commit("main", f"racer-{i}", step=1, objects={}, expected_head=base)
        except HeadMoved as e:
            return e

    results = run_in_threads(registry_url, work)
    winners = [r for r in results if isinstance(r, CheckpointRecord)]
    losers = [r for r in results if isinstance(r, HeadMoved)]
    assert len(winners) == 1 and len(losers) == THREADS - 1
    assert all((e.expected, e.actual) == (base, winners[0].id) for e in losers)
    assert [r.id for r in registry.log("main")] == [winners[0].id, base]
    assert len(registry.checkpoints()) == 2


def test_concurrent_commits_on_different_branches_count_a_shared_object_once(
    registry: Registry, registry_url: str
) -> None:
    for i in range(THREADS):
        registry.create_branch(f"b{i}")

    def work(reg: Registry, i: int) -> int:
        objects = {"shared-a": 100, "shared-b": 10, f"own-{i}": 1}
        return reg.commit(f"b{i}", f"c{i}", step=0, objects=objects).new_bytes

    assert sum(run_in_threads(registry_url, work)) == 100 + 10 + THREADS
