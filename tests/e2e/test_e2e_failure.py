"""A worker killed mid-training: Ray Train restarts the group, which resumes from the last
committed checkpoint; nothing committed is lost, repeated or damaged."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tlreg.ckpt import verify
from tlreg.registry import Registry
from tlreg.storage_backends import open_store

pytestmark = pytest.mark.slow


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    """Ray Train worker processes started (indirectly) by ``root``: only our own Ray."""
    found = []
    for p in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join([p.name(), *p.cmdline()]):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_worker_resumes_from_last_commit_without_losing_or_repeating_steps(
    tmp_path: Path,
    make_shell: Callable[..., Any],
) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    shell = make_shell(registry_url)
    shell.tlreg("init")
    shell.tlreg("branch", "base", "--task", "tlreg.training.examples.digits:lower")
    # The worker is killed as soon as the step-20 commit exists (~step 20-25 of 100): ~8 s of
    # training still to go at ~10 steps/s, and four commits after the one it resumes from.
    steps = 100
    proc = shell.popen(
        "train",
        "base",
        "--workers",
        "2",
        "--steps",
        str(steps),
        "--checkpoint-every",
        "20",
        "--max-failures",
        "2",
        "--json",
    )
    registry = Registry(registry_url)
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            committed = registry.get_branch("base").head
            workers = _train_workers(psutil.Process(proc.pid))
            if committed is not None and len(workers) == 2:
                killed = (registry.get(committed).step, workers[-1].pid)
                os.kill(workers[-1].pid, signal.SIGKILL)
        assert killed is not None, "training ended before a worker could be killed"
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads(out)

        assert killed[0] < steps
        assert summary["resumed_from"] is not None  # the restarted group resumed
        log = registry.log("base")
        step_numbers = [r.step for r in reversed(log)]
        assert step_numbers == sorted(set(step_numbers))  # strictly increasing, no duplicates
        assert step_numbers[-1] == steps
        assert all(s % 20 == 0 for s in step_numbers)
        store = open_store(shell.store_url)
        for record in log:
            report = verify(store, record.manifest)
            assert report.ok, report.problems
        runs = registry.runs("base")
        assert [r.status for r in runs] == ["succeeded"]
    finally:
        if proc.poll() is None:
            proc.kill()
        registry.close()
