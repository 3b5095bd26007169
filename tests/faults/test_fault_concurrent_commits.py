"""Sixteen processes checkpoint into one store and one registry at once: no commit is lost.

Every process saves through the full path (objects, manifest, registry commit) on a branch of
its own, with one large tensor that all of them hold (so they race to write the same
content-addressed object) and a tensor of their own. Afterwards every commit each process
got back is listed, in its order, and verifies, and the shared object was counted as new
bytes exactly once.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from typing import Any

import pytest
import torch
from faultlib import COUNTS, trials

from tlreg.ckpt import verify
from tlreg.registry import Registry
from tlreg.storage_backends import open_store

PROCESSES = 16
SAVES = 3
ROUNDS = trials(short=1, long=5)

pytestmark = pytest.mark.slow


def _shared() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"backbone": torch.randn(4096, 1100, generator=gen)}  # > SOLO_BYTES: own object


def _checkpoint_from_a_process(
    registry_url: str, store_url: str, branch: str, i: int, start: Any, results: Any
) -> None:
    from tlreg.training import Checkpointer

    torch.set_num_threads(1)
    try:
        with Registry(registry_url) as registry:
            ckpt = Checkpointer(branch, registry=registry, store=store_url)
            start.wait(timeout=120)
            ids = []
            for step in range(1, SAVES + 1):
                own = torch.full((64,), float(i * 100 + step))
                pending = ckpt.save(step, extra={"state": {**_shared(), "own": own}})
                ids.append(pending.result())
            ckpt.close()
        results.put((i, ids))
    except BaseException as e:  # reported to the parent, which fails the test with it
        results.put((i, f"{type(e).__name__}: {e}"))


def test_sixteen_processes_checkpointing_at_once_lose_no_commit(
    registry: Registry, registry_url: str, tmp_path: Any
) -> None:
    store_url = str(tmp_path / "store")
    # torch's thread pools do not survive a fork of this process; a fork server that only
    # imported torch and tlreg is safe to fork, and spares 16 imports of torch
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tlreg.training", "tlreg.registry"])
    tally: Counter[str] = Counter()
    for rnd in range(ROUNDS):
        branches = [f"r{rnd}/p{i}" for i in range(PROCESSES)]
        for b in branches:
            registry.create_branch(b)
        start, results = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=_checkpoint_from_a_process,
                args=(registry_url, store_url, b, i, start, results),
            )
            for i, b in enumerate(branches)
        ]
        for p in procs:
            p.start()
        start.set()
        reports = dict(results.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert {i: r for i, r in reports.items() if isinstance(r, str)} == {}
        store = open_store(store_url)
        for i, b in enumerate(branches):
            log = registry.log(b)
            assert [r.id for r in reversed(log)] == reports[i]
            assert [r.step for r in reversed(log)] == list(range(1, SAVES + 1))
            for record in log:
                assert verify(store, record.manifest).ok
        tally["commits"] += sum(len(ids) for ids in reports.values())
        tally["processes"] += PROCESSES
    # the shared tensor was new bytes once: whichever process committed it first
    backbone = 4096 * 1100 * 4
    firsts = [c for c in registry.checkpoints() if c.new_bytes >= backbone]
    assert len(firsts) == 1
    assert len(registry.checkpoints()) == tally["commits"] == ROUNDS * PROCESSES * SAVES
    tally["commits lost"] += 0
    COUNTS.update({f"16 processes committing: {k}": v for k, v in tally.items()})
