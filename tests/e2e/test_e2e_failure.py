"""Training on its own local Ray, interrupted: a worker killed mid-training (Ray Train restarts
the group, which resumes from the last committed checkpoint; nothing committed is lost,
repeated or damaged), and the whole ``tlreg train`` stopped by SIGTERM (what a batch
scheduler sends at its time limit) or SIGINT (Ctrl-C): the run is marked stopped, the resume
command is printed and no Ray process survives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
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


def _train(shell: Any, steps: int, *more: str) -> subprocess.Popen[str]:
    """``tlreg train base`` on 2 workers, a checkpoint every 20 steps, in its own process
    (which starts its own local Ray)."""
    args = ["--workers", "2", "--steps", str(steps), "--checkpoint-every", "20", *more]
    return shell.popen("train", "base", *args, "--json")


def _first_commit(
    proc: subprocess.Popen[str], registry: Registry
) -> tuple[int, list[psutil.Process]]:
    """Wait until ``proc``'s training has committed a checkpoint and both its workers run:
    the committed step and the workers."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        committed = registry.get_branch("base").head
        workers = _train_workers(psutil.Process(proc.pid))
        if committed is not None and len(workers) == 2:
            return registry.get(committed).step, workers
    raise AssertionError("training ended, or made no commit, before it could be interrupted")


@pytest.fixture
def base_shell(tmp_path: Path, make_shell: Callable[..., Any]) -> Any:
    """A shell whose SQLite registry has branch ``base`` for the digits task."""
    shell = make_shell(f"sqlite:///{tmp_path / 'registry.db'}")
    shell.tlreg("init")
    shell.tlreg("branch", "base", "--task", "tlreg.training.examples.digits:lower")
    return shell


def test_killed_worker_resumes_from_last_commit_without_losing_or_repeating_steps(
    base_shell: Any,
) -> None:
    shell = base_shell
    # The worker is killed as soon as the step-20 commit exists (~step 20-25 of 100): ~8 s of
    # training still to go at ~10 steps/s, and four commits after the one it resumes from.
    steps = 100
    proc = _train(shell, steps, "--max-failures", "2")
    registry = Registry(shell.env["TLREG_REGISTRY_URL"])
    try:
        killed_step, workers = _first_commit(proc, registry)
        os.kill(workers[-1].pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads(out)

        assert killed_step < steps
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_keeps_its_commits_and_leaves_no_ray_process(
    base_shell: Any, signum: signal.Signals
) -> None:
    """SIGTERM is what a batch scheduler sends at its time limit; SIGINT is Ctrl-C. Either
    marks the run stopped (not "running" forever), says what was committed and how to resume,
    and gives the branch's lease back."""
    shell = base_shell
    proc = _train(shell, 5000)
    registry = Registry(shell.env["TLREG_REGISTRY_URL"])
    ray_processes: list[psutil.Process] = []
    try:
        _first_commit(proc, registry)
        lease = registry.lease("base")
        assert lease is not None and (lease.run_id, lease.pid) == (1, proc.pid)
        # everything its Ray runs (GCS, raylet, workers, ...), found while still in its tree
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert {"gcs_server", "raylet"} <= {p.name() for p in ray_processes}
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err[-3000:]
        head = registry.resolve("base")
        assert err.strip().splitlines()[-1] == (
            f"Error: training branch 'base' was stopped by {signum.name} (run 1); "
            f"last committed checkpoint {head.id[:12]} at step {head.step}; "
            "resume with: tlreg train base --steps 5000"
        )
        assert registry.lease("base") is None
        _, alive = psutil.wait_procs(ray_processes, timeout=30)
        assert alive == [], [" ".join(p.cmdline()[:3]) for p in alive]

        [run] = registry.runs("base")
        assert (run.status, run.error) == ("stopped", f"stopped by {signum.name}")
        log = registry.log("base")
        step_numbers = [r.step for r in reversed(log)]
        assert step_numbers == list(range(20, 20 * len(log) + 1, 20))
        assert step_numbers[-1] < 5000
        store = open_store(shell.store_url)
        for record in log:
            report = verify(store, record.manifest)
            assert report.ok, report.problems
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in ray_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        registry.close()
