"""SIGKILL at random points of a repacking ``tlreg gc``: no kept checkpoint is ever lost.

Every round saves a few checkpoints whose frozen tensor pins an old pack, then runs
a real gc process (``repacker.py``) that kills itself with SIGKILL at a random store write,
store delete or registry call of the protocol. After each kill every kept checkpoint must
restore bit-exactly (through the relocation records where its objects moved); then a gc in
this process must complete and leave the store at most 5% above the kept unique bytes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from faultlib import COUNTS, trials

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.ckpt.fsck import check_store
from tlreg.ckpt.objects import read_layout, stored_objects
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage

REPACKER = Path(__file__).with_name("repacker.py")
ROUNDS = trials(short=2, long=12)

pytestmark = pytest.mark.slow


class Pinned(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(128, 128, bias=False)
        self.register_buffer("frozen", torch.arange(128 * 128, dtype=torch.float32))


def _run(registry_url: str, store: str, kill_at: int) -> tuple[bool, int]:
    proc = subprocess.run(
        [sys.executable, str(REPACKER), registry_url, store, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == -signal.SIGKILL:
        return True, kill_at
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = int(next(x for x in proc.stdout.splitlines() if x.startswith("ops")).split()[1])
    return False, ops


def _kept_restore(registry: Registry, store_url: str, states: dict, tally: Counter[str]) -> None:
    store = open_store(store_url)
    kept = registry.kept_manifests()
    with AsyncCheckpointer(store) as engine:
        for manifest_id in kept:
            state = engine.load(manifest_id)["model"]
            for name, want in states[manifest_id].items():
                if not torch.equal(state[name].view(torch.uint8), want.view(torch.uint8)):
                    tally["checkpoints lost"] += 1
                    pytest.fail(f"kept checkpoint {manifest_id} restored a different {name}")
            tally["kept checkpoints restored"] += 1
    report = check_store(store, kept)
    assert report.ok, report.problems


@pytest.mark.timeout(1800)  # the long setting: a real gc process per round
def test_sigkill_at_random_points_of_a_repack_loses_no_kept_checkpoint(
    registry: Registry, registry_url: str, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    store = open_store(url)
    registry.create_branch("b")
    model = Pinned()
    rng = random.Random(20261207)
    states: dict[str, dict[str, torch.Tensor]] = {}
    tally: Counter[str] = Counter()
    ops = 0
    with Checkpointer("b", registry=registry, store=url) as ckpt:
        for round_ in range(ROUNDS + 1):
            for _ in range(3):
                with torch.no_grad():
                    model.fc.weight.add_(1.0)
                mid = ckpt.save(len(states), model=model).result()
                states[mid] = {k: v.clone() for k, v in model.state_dict().items()}
            if round_ % 2 == 0:
                registry.tag(mid, f"t{round_}")  # older kept checkpoints to repack under
            # the first round counts the protocol's steps; later ones die at a random one
            killed, at = _run(registry_url, url, rng.randint(1, ops) if ops else 10**9)
            ops = ops or at
            tally["rounds"] += 1
            tally["killed mid-gc" if killed else "finished before the kill point"] += 1
            _kept_restore(registry, url, states, tally)
            done = collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
            tally["objects repacked by the next gc"] += len(done.repacked)
            _kept_restore(registry, url, states, tally)
            kept = registry.kept_manifests()
            unique = {e.hash: e.nbytes for m in kept for _, e in read_manifest(store, m).stored()}
            stored = sum(read_layout(store, d).nbytes for d in stored_objects(store))
            assert stored <= 1.05 * sum(unique.values())
    assert tally["killed mid-gc"] >= ROUNDS // 2
    COUNTS.update({f"sigkill mid-repack: {k}": v for k, v in tally.items()})
    COUNTS["sigkill mid-repack: checkpoints lost"] += 0
