"""SIGKILL in the middle of saves: a checkpoint is either committed and whole, or invisible.

A real process (``saver.py``) checkpoints back to back into a local store and a registry (SQLite
and PostgreSQL) and is SIGKILLed at a random moment, many times over the same branch. After each
kill, every checkpoint the registry lists must verify, and the head must restore bit-exactly;
then ``tlreg gc`` must leave exactly the committed checkpoints' manifests and objects behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from faultlib import COUNTS, trials
from saver import build_model, expected_state

from tlreg.ckpt import verify
from tlreg.ckpt.manifest import stored_manifests
from tlreg.ckpt.objects import stored_objects
from tlreg.registry import Registry
from tlreg.storage_backends import LocalStore
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage

SAVER = Path(__file__).with_name("saver.py")
KILLS = trials(short=4, long=40)

pytestmark = pytest.mark.slow


def _start(registry_url: str, store: Path, lazy: bool) -> subprocess.Popen[str]:
    args = [sys.executable, str(SAVER), registry_url, str(store), "main"]
    return subprocess.Popen(
        [*args, "--lazy"] if lazy else args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_mid_save(proc: subprocess.Popen[str], rng: random.Random) -> list[str]:
    """Wait for the first commit, let it run a random while more, SIGKILL it; its stdout lines."""
    first = proc.stdout.readline() if proc.stdout else ""
    if not first.startswith("committed"):
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"saver did not commit: {first!r}\n{err[-2000:]}")
    time.sleep(rng.uniform(0.0, 0.6))
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return [first.strip(), *out.splitlines()]


def _committed_are_whole(registry: Registry, store: LocalStore, tally: Counter[str]) -> None:
    """Every listed checkpoint verifies; the head restores bit-exactly into a fresh model."""
    log = registry.log("main")
    for record in log:
        report = verify(store, record.manifest)
        if not report.ok:
            tally["checkpoints lost"] += 1
        assert report.ok, f"committed checkpoint {record.id} is damaged: {report.problems}"
    steps = [r.step for r in log]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)
    head = log[0]
    model = build_model()
    extra: dict[str, int] = {}
    with Checkpointer("main", registry=registry, store=store) as ckpt:
        assert ckpt.restore(model=model, extra=extra) == head
    got = model.state_dict()
    for name, want in expected_state(head.step).items():
        if not torch.equal(got[name].view(torch.int32), want.view(torch.int32)):
            tally["checkpoints lost"] += 1
            pytest.fail(f"head {head.id} (step {head.step}) restored a different {name}")
    assert extra == {"step": head.step}


def test_sigkill_mid_save_never_exposes_a_partial_checkpoint_and_gc_removes_the_orphans(
    registry: Registry, registry_url: str, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    registry.create_branch("main")
    rng = random.Random(20261124)
    tally: Counter[str] = Counter()
    for trial in range(KILLS):
        proc = _start(registry_url, store_dir, lazy=trial % 2 == 1)
        reported = _kill_mid_save(proc, rng)
        tally["SIGKILL trials"] += 1
        # What the killed process saw committed is in the registry (a commit that returned is
        # durable); the registry may hold one more, committed just before the kill landed.
        seen = {line.split()[2] for line in reported if line.startswith("committed")}
        listed = {r.id for r in registry.log("main")}
        assert seen <= listed
        _committed_are_whole(registry, store, tally)

    log = registry.log("main")
    tally["checkpoints committed"] += len(log)
    referenced = {h for r in log for h in registry.objects_of(r.id)}
    orphan_objects = stored_objects(store) - referenced
    orphan_manifests = stored_manifests(store) - {r.manifest for r in log}
    leftovers = [p for p in store_dir.rglob("*") if p.is_file() and ".tmp-" in p.name]
    for _ in range(2):  # the first pass records first sightings; grace 0 lets the same pass go
        collect_garbage(registry, store, grace=timedelta(0))
    assert stored_manifests(store) == {r.manifest for r in log}
    assert stored_objects(store) == referenced
    assert [p for p in store_dir.rglob("*") if p.is_file() and ".tmp-" in p.name] == []
    tally["orphans collected"] += len(orphan_objects) + len(orphan_manifests) + len(leftovers)
    _committed_are_whole(registry, store, tally)
    assert tally["checkpoints lost"] == 0
    COUNTS.update({f"sigkill mid-save: {k}": v for k, v in tally.items()})
    COUNTS["sigkill mid-save: checkpoints lost"] += 0  # printed even when none were
