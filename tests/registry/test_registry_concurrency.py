"""Concurrent writers: the database, not the filesystem, serialises commits."""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tlreg.registry import (
    BranchNotFound,
    CheckpointRecord,
    HeadMoved,
    Registry,
    UnsafeFilesystem,
    retry_on_head_moved,
)
from tlreg.registry import engine as registry_engine

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


# -- many processes --------------------------------------------------------------------------

PROCESSES = 16
SHARED_COMMITS = 4  # per process, default expected head
RETRIED_COMMITS = 2  # per process, explicit expected head through retry_on_head_moved
OWN_COMMITS = 2  # per process, on its own branch


def _commit_from_a_process(url: str, i: int, start: Any, results: Any) -> None:
    """One worker process: its own Registry (own connections), released by ``start``."""
    try:
        with Registry(url) as reg:
            reg.create_branch(f"own-{i}")
            start.wait(timeout=60)
            done = []
            for k in range(SHARED_COMMITS + RETRIED_COMMITS):
                cid = f"p{i}-s{k}"
                if k < SHARED_COMMITS:
                    done.append(reg.commit("shared", cid, step=k, objects={cid: 1}).id)
                    continue

                def attempt(cid: str = cid, k: int = k) -> CheckpointRecord:
                    head = reg.get_branch("shared").head
                    return reg.commit("shared", cid, step=k, objects={}, expected_head=head)

                done.append(retry_on_head_moved(attempt, attempts=200, backoff=0.005).id)
            for k in range(OWN_COMMITS):
                done.append(reg.commit(f"own-{i}", f"p{i}-o{k}", step=k, objects={"same": 5}).id)
        results.put((i, done))
    except BaseException as e:  # reported to the parent, which fails the test with it
        results.put((i, repr(e)))


def test_sixteen_processes_commit_concurrently_without_a_lost_update(
    registry: Registry, registry_url: str
) -> None:
    registry.create_branch("shared")
    ctx = multiprocessing.get_context("fork")  # fork: no re-import per worker on 2 cores
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_commit_from_a_process, args=(registry_url, i, start, results))
        for i in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    start.set()
    reports = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert {i: r for i, r in reports.items() if isinstance(r, str)} == {}
    committed = [cid for ids in reports.values() for cid in ids]
    per_process = SHARED_COMMITS + RETRIED_COMMITS + OWN_COMMITS
    assert len(committed) == len(set(committed)) == PROCESSES * per_process
    assert {c.id for c in registry.checkpoints()} == set(committed)
    log = registry.log("shared")
    assert len(log) == PROCESSES * (SHARED_COMMITS + RETRIED_COMMITS)
    for newer, older in itertools.pairwise(log):
        assert newer.parents == (older.id,)
    assert log[-1].parents == ()
    for i in range(PROCESSES):
        own = registry.log(f"own-{i}")
        assert [r.id for r in own] == [f"p{i}-o{k}" for k in reversed(range(OWN_COMMITS))]
    # The object every process shares was new exactly once.
    assert sum(c.new_bytes for c in registry.checkpoints()) == PROCESSES * SHARED_COMMITS + 5


# -- the retry helper ---------------------------------------------------------------------------


def test_retry_on_head_moved_retries_until_success_and_reraises_the_last_failure() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise HeadMoved("moved", branch="b", expected="x", actual=f"y{len(calls)}")
        return "ok"

    assert retry_on_head_moved(flaky, attempts=3, backoff=0) == "ok"
    calls.clear()
    with pytest.raises(HeadMoved) as e:
        retry_on_head_moved(flaky, attempts=2, backoff=0)
    assert e.value.actual == "y2"
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        retry_on_head_moved(flaky, attempts=0)


def test_retry_on_head_moved_does_not_retry_other_errors() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise BranchNotFound("branch 'x' does not exist")

    with pytest.raises(BranchNotFound):
        retry_on_head_moved(broken, attempts=5, backoff=0)
    assert len(calls) == 1


# -- SQLite files ----------------------------------------------------------------------------------


def test_sqlite_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "reg" / "registry.db"
    with Registry(f"sqlite:///{path}") as reg:
        reg.create_branch("main")
        reg.commit("main", "c1", step=0, objects={})
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert modes["registry.db"] == 0o600
    assert all(mode == 0o600 for name, mode in modes.items() if name.startswith("registry.db"))


@pytest.mark.parametrize("fs_type", ["nfs4", "cifs", "lustre", "fuse.sshfs"])
def test_sqlite_on_a_network_filesystem_is_refused_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs_type: str
) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path / 'net'} {fs_type} rw 0 0\n"
        f"tmpfs {tmp_path / 'net' / 'local'} tmpfs rw 0 0\n"
    )
    monkeypatch.setattr(registry_engine, "MOUNTS", mounts)
    url = f"sqlite:///{tmp_path / 'net' / 'registry.db'}"
    with pytest.raises(UnsafeFilesystem) as e:
        Registry(url)
    message = str(e.value)
    assert "\n" not in message
    assert f"is on a {fs_type} filesystem" in message
    assert "use PostgreSQL (postgresql+psycopg://user@host/db), or pass --force" in message
    assert not (tmp_path / "net" / "registry.db").exists()
    with Registry(url, force=True) as reg:
        reg.create_branch("main")
        assert pickle.loads(pickle.dumps(reg)).force is True
    # A local filesystem mounted below the network one is fine.
    Registry(f"sqlite:///{tmp_path / 'net' / 'local' / 'registry.db'}").close()
