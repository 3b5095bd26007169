"""README.md's "write your own task" and "use your own loop" examples, run as they are
printed (read from the README), on SQLite and PostgreSQL with a store on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from readme_examples import readme_example, readme_examples

from tlreg.registry import Registry
from tlreg.training import Checkpointer, Task, load_task


@pytest.fixture
def env(tmp_path: Path, registry_url: str) -> dict[str, str]:
    """A user's environment: a fresh TLREG_HOME whose registry is the parametrized backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLREG_")}
    env["TLREG_HOME"] = str(tmp_path / "home")
    env["TLREG_REGISTRY_URL"] = registry_url
    return env


def test_the_readme_marks_its_three_examples() -> None:
    assert sorted(readme_examples()) == ["own-loop", "own-trainer", "task"]


def test_the_readme_task_is_a_task_tlreg_trains_and_transfers(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "blobs.py").write_text(readme_example("task"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    task = load_task("blobs:task")
    assert isinstance(task, Task)
    (x, y), (xv, yv) = task.datasets()
    assert x.shape == (500, 2) and xv.shape == (100, 2)
    model = task.build_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = task.metric(model(xv), yv)
    assert accuracy > 0.9  # the blobs are separable: the example learns
    with Checkpointer.for_branch("blobs", create=True, task="blobs:task") as ckpt:
        ckpt.save(100, model=model, metrics={task.metric_name: accuracy}).result()
    # a new branch from it re-initialises exactly the task's reset globs
    with Checkpointer.for_branch("blobs-2", create=True, from_="blobs") as ckpt:
        ckpt.restore(model=task.build_model(1), reset=task.reset)
        report = ckpt.last_restore
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    assert sorted(report.transferred) == ["features.0.bias", "features.0.weight"]


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_the_readme_own_loop_checkpoints_and_resumes(
    tmp_path: Path, env: dict[str, str], registry_url: str
) -> None:
    code = readme_example("own-loop")
    first = _run(code, env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "branch my-loop is at step 30\n"
    second = _run(code, env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "branch my-loop is at step 60\n"
    assert second.stderr == ""  # no warning: the with block closed everything
    with Registry(registry_url) as registry:
        log = registry.log("my-loop")
        assert [r.step for r in log] == [60, 50, 40, 30, 20, 10]
        runs = registry.runs("my-loop")
        assert [r.status for r in runs] == ["succeeded", "succeeded"]
        assert [r.run_id for r in log] == [runs[1].id] * 3 + [runs[0].id] * 3
        losses = registry.run_metrics(runs[1].id, "loss")
        assert [p.step for p in losses] == [40, 50, 60]
        assert [p.value for p in losses] == [
            log[2].metrics["loss"],
            *(r.metrics["loss"] for r in log[1::-1]),
        ]
