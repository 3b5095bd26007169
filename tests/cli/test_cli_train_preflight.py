"""``tlreg train`` fails early and loudly (issue 19): what can be checked before Ray starts is,
on SQLite and PostgreSQL, and a resume reuses how the branch was trained.

Ray never starts in these tests: ``_ensure_ray`` is replaced by one that fails the test, so a
refusal that came after Ray would show up as that failure, not as the expected error.
"""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tlreg.training.driver as driver
from tlreg.cli.train import TrainProgress
from tlreg.registry import Registry
from tlreg.training import TrainConfig
from tlreg.training.events import (
    Checkpointed,
    CheckpointFailed,
    Evaluated,
    RayStarted,
    RayStarting,
    Restored,
)

LOWER = "tlreg.training.examples.digits:lower"


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def ray_started(num_cpus: int) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "_ensure_ray", ray_started)


@pytest.fixture
def base(tlreg: Callable[..., Any], registry_url: str) -> Iterator[Registry]:
    """An initialised home with branch ``base`` (digits task); its registry, open."""
    assert tlreg("init").exit_code == 0
    assert tlreg("branch", "base", "--task", LOWER).exit_code == 0
    registry = Registry(registry_url)
    try:
        yield registry
    finally:
        registry.close()


def _error_line(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[-1]


def _commit(registry: Registry, step: int, *, run_config: dict[str, Any] | None = None) -> str:
    """Commit a checkpoint at ``step`` on base (registry rows only: these tests never read it)."""
    run_id = None
    if run_config is not None:
        run_id = registry.start_run("base", run_config).id
        registry.finish_run(run_id, status="succeeded")
    checkpoint = f"01a251e0{step:08d}"
    registry.commit("base", checkpoint, step=step, objects={}, run_id=run_id)
    return checkpoint


def test_a_second_train_on_a_branch_with_a_live_run_is_refused_before_ray(
    tlreg: Callable[..., Any], base: Registry, no_ray: None
) -> None:
    run, lease = base.start_leased_run("base", {"steps": 400})  # the first train, running
    line = _error_line(tlreg("train", "base", "--steps", "400"))
    # the heartbeat's age is whole seconds since the lease was taken: 0, or more on a busy machine
    age = re.search(r", heartbeat (\d+) s ago; ", line)
    assert age is not None and int(age.group(1)) < 60, line
    assert line == (
        f"Error: branch 'base' already has a live run: run {run.id} on host {lease.host} "
        f"(pid {lease.pid}) since {lease.acquired:%Y-%m-%d %H:%M:%S} UTC, "
        f"heartbeat {age.group(1)} s ago; "
        "wait for it to end, or stop it (a holder that died is taken over 60 s after its last "
        "heartbeat)"
    )
    assert [r.id for r in base.runs("base")] == [run.id]  # no Run row for the refused one


def test_a_second_submit_on_a_branch_with_a_live_run_is_refused_before_submitting(
    tlreg: Callable[..., Any], base: Registry
) -> None:
    run, _lease = base.start_leased_run("base", {})
    # Port 9 has no job server: reaching it would be another error.
    line = _error_line(tlreg("submit", "base", "--address", "http://127.0.0.1:9"))
    assert line.startswith(f"Error: branch 'base' already has a live run: run {run.id} on host")


def test_steps_at_or_below_the_branch_step_are_refused_before_ray(
    tlreg: Callable[..., Any], base: Registry, no_ray: None
) -> None:
    head = _commit(base, 60)
    for steps in ("40", "60"):
        assert _error_line(tlreg("train", "base", "--steps", steps)) == (
            f"Error: branch 'base' is already at step 60 (head {head[:12]}), at or past "
            f"--steps {steps}: pass --steps above 60 to train further (--steps counts to a total)"
        )
    assert [r.id for r in base.runs("base")] == []


def test_a_misspelled_freeze_glob_is_refused_before_ray(
    tlreg: Callable[..., Any], base: Registry, no_ray: None
) -> None:
    line = _error_line(tlreg("train", "base", "--freeze", "head.*", "--freeze", "featurs.*"))
    assert line == (
        f"Error: --freeze 'featurs.*' matches no parameter of {LOWER}'s model; its parameters "
        "start with 'features.', 'head.' (globs match whole names, e.g. 'features.*')"
    )


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """``read_only(folder)``: put a read-only bind mount over ``folder`` (root ignores file
    modes) until the test ends."""
    mounted: list[Path] = []

    def mount(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for args in (["--bind"], ["-o", "remount,bind,ro"]):
            if subprocess.run(["mount", *args, str(folder), str(folder)]).returncode != 0:
                pytest.skip("needs mount --bind (root)")
            if args == ["--bind"]:
                mounted.append(folder)

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_store_is_refused_before_ray(
    tlreg: Callable[..., Any], base: Registry, home: Path, read_only: Callable[[Path], None],
    no_ray: None,
) -> None:  # fmt: skip
    store = home / "store"
    read_only(store)
    line = _error_line(tlreg("train", "base", "--steps", "10"))
    assert line.startswith(f"Error: store {store} is not writable (")
    assert "Read-only file system" in line
    assert line.endswith(
        "training could keep no checkpoint; fix its permissions or pass another --store"
    )
    assert base.runs("base") == []


def test_a_resume_reuses_how_the_head_was_trained_and_a_flag_given_again_overrides(
    tlreg: Callable[..., Any], base: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = {"freeze": ["features.*"], "lr": 0.01, "batch_size": 16, "steps": 60}
    _commit(base, 60, run_config=trained)
    seen: list[TrainConfig] = []

    def fake_training(config: TrainConfig, **_kw: Any) -> Any:
        seen.append(config)
        raise driver.RunFailed("stop here")  # what was asked is all this test needs

    monkeypatch.setattr("tlreg.cli.train.run_training", fake_training)
    result = tlreg("train", "base", "--steps", "80")
    assert result.output.splitlines()[0] == (
        "note: resuming 'base' as run 1 trained it: --freeze 'features.*' --lr 0.01 "
        "--batch-size 16 (give a flag again to override)"
    )
    assert (seen[0].freeze, seen[0].lr, seen[0].batch_size) == (("features.*",), 0.01, 16)

    result = tlreg("train", "base", "--steps", "80", "--lr", "0.001")
    assert result.output.splitlines()[0] == (
        "note: --lr 0.001 overrides --lr 0.01, which branch 'base' was trained with (run 1)"
    )
    assert (seen[1].freeze, seen[1].lr) == (("features.*",), 0.001)


def test_train_progress_in_plain_mode_says_each_phase_and_the_committed_checkpoint() -> None:
    out = io.StringIO()  # not a terminal
    config = TrainConfig(branch="b", task=LOWER, registry_url="sqlite:////x.db", store_url="/s")
    progress = TrainProgress(config, file=out)
    for event in (
        RayStarting(joining=False),
        RayStarted(elapsed_s=12.34, workers=2),
        Restored(
            step=60,
            checkpoint="01a251e07114aaaa",
            resumed=True,
            transferred=(),
            skipped=(),
            frozen=(),
            matched_layers=None,
        ),
        Evaluated(
            step=70,
            loss=0.5,
            metric=0.9,
            metric_name="val_accuracy",
            elapsed_s=1.0,
            checkpoint="01a251e07114aaaa",
        ),
        CheckpointFailed(step=80, error="cannot create objects/ab: Permission denied"),
        Checkpointed(step=90, id="01a251e081caaaaa", stall_ms=5.0, new_bytes=1, logical_bytes=2),
    ):
        progress.on_event(event)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "starting Ray...",
        "Ray ready in 12.3 s; starting 2 workers...",
        "resuming from 01a251e07114 at step 60",
        "step 60/200  loss -  metric -  ckpt 01a251e07114@60",
    ]
    assert "checkpoint at step 80 failed: cannot create objects/ab: Permission denied" in lines
    assert lines[-1].startswith("step 90/200  ")
    assert lines[-1].endswith("  loss 0.5000  metric val_accuracy 0.9000  ckpt 01a251e081ca@90")
    assert "\r" not in out.getvalue()
