"""``tlreg train`` on Ray does not "succeed" about a wasted run (issue 19): a checkpoint that
fails to commit stops the run at once (exit 1, run failed with the cause) unless the user
opted to continue, and a branch trained with ``--freeze`` resumes without repeating it.
Each test joins the Ray cluster shared by tests/e2e (no Ray start-up per run)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tlreg.registry import Registry
from tlreg.training.examples.digits import lower

LOWER = "tlreg.training.examples.digits:lower"

pytestmark = pytest.mark.slow


@pytest.fixture
def shell(tmp_path: Path, make_cluster_shell: Callable[..., Any]) -> Any:
    """A shell on the shared cluster whose SQLite home has branch ``base`` (digits)."""
    shell = make_cluster_shell(f"sqlite:///{tmp_path / 'registry.db'}")
    shell.tlreg("init")
    shell.tlreg("branch", "base", "--task", LOWER)
    return shell


@pytest.fixture
def read_only_objects(shell: Any) -> Iterator[Path]:
    """The store's ``objects/`` behind a read-only bind mount: the store takes the probe write
    of the preflight, and every checkpoint fails (as with a quota, or a mount that turned
    read-only mid-run)."""
    objects = Path(shell.store_url) / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "--bind", str(objects), str(objects)]).returncode != 0:
        pytest.skip("needs mount --bind (root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(objects), str(objects)], check=True)
        yield objects
    finally:
        subprocess.run(["umount", str(objects)], check=True)


def _train(shell: Any, *args: str) -> tuple[int, str, str]:
    proc = shell.popen("train", "base", "--workers", "1", *args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_a_checkpoint_that_fails_to_commit_stops_the_run_with_exit_1(
    shell: Any, read_only_objects: Path
) -> None:
    code, out, err = _train(shell, "--steps", "400", "--checkpoint-every", "5", "--eval-every", "1")
    assert code == 1, err[-3000:]
    lines = err.strip().splitlines()
    # Reported when it happened (before the run's end), then the run's one Error line.
    found = [line for line in out.splitlines() if line.startswith("checkpoint at step 5")]
    assert len(found) == 1, out + err[-3000:]
    failed = found[0]
    assert failed.startswith("checkpoint at step 5 failed: ")
    assert "Read-only file system" in failed
    assert lines[-1] == (
        f"Error: training branch 'base' failed (run 1): {failed}; the run stopped there "
        "(--on-checkpoint-error continue trains on regardless)"
    )
    with Registry(shell.env["TLREG_REGISTRY_URL"]) as registry:
        [run] = registry.runs("base")
        assert run.status == "failed"
        assert run.error is not None and run.error.startswith(failed)
        assert registry.get_branch("base").head is None
        assert registry.lease("base") is None  # the branch is free again
        # It stopped at the failure (seen a step or two later), far before its 400 steps.
        evals = [p.step for p in registry.run_metrics(run.id, "loss")]
        assert 5 <= max(evals) < 50


def test_a_run_that_opted_to_continue_reports_each_failed_checkpoint_and_succeeds(
    shell: Any, read_only_objects: Path
) -> None:
    code, out, err = _train(
        shell, "--steps", "10", "--checkpoint-every", "5", "--on-checkpoint-error", "continue"
    )
    assert code == 0, err[-3000:]
    failed = [line for line in out.splitlines() if line.startswith("checkpoint at step")]
    assert [line.split(":")[0] for line in failed] == [
        "checkpoint at step 5 failed",
        "checkpoint at step 10 failed",
    ]
    assert err.strip().splitlines()[-1] == (
        "  2 checkpoints failed (first at step 5); the head is the last one committed"
    )


def test_a_branch_trained_with_freeze_resumes_without_repeating_it(shell: Any) -> None:
    frozen = sorted(k for k, _ in lower.build_model(0).named_parameters() if "features" in k)
    code, out, err = _train(
        shell, "--steps", "10", "--checkpoint-every", "10", "--freeze", "features.*", "--json"
    )
    assert code == 0, err[-3000:]
    assert sorted(json.loads(out)["frozen"]) == frozen

    # Before: torch's "loaded state dict has a different number of parameter groups".
    code, out, err = _train(shell, "--steps", "20", "--checkpoint-every", "10", "--json")
    assert code == 0, err[-3000:]
    assert (
        "note: resuming 'base' as run 1 trained it: --freeze 'features.*' "
        "(give a flag again to override)"
    ) in err.splitlines()
    summary = json.loads(out)
    assert (summary["start_step"], summary["final_step"]) == (10, 20)
    assert sorted(summary["frozen"]) == frozen
    with Registry(shell.env["TLREG_REGISTRY_URL"]) as registry:
        assert [r.config["freeze"] for r in registry.runs("base")] == [["features.*"]] * 2
