"""The Python API a script uses (issue 19): ``Checkpointer.for_branch`` creating a branch, a Run
row with its lease and metrics, and pending saves flushed at interpreter exit. On SQLite and
PostgreSQL, with a real store on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tlreg.ckpt import CheckpointError
from tlreg.registry import BranchNotFound, Registry
from tlreg.registry.leases import BranchLeased
from tlreg.training import Checkpointer, ConfigError
from tlreg.training.examples.digits import lower, upper

TASK = "tlreg.training.examples.digits:upper"


@pytest.fixture
def home(tmp_path: Path, registry_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tlreg home whose registry is the parametrized backend and whose store is on disk."""
    home = tmp_path / "home"
    for var in ("TLREG_HOME", "TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TLREG_HOME", str(home))
    monkeypatch.setenv("TLREG_REGISTRY_URL", registry_url)
    return home


@pytest.fixture
def registry(home: Path, registry_url: str) -> Registry:
    reg = Registry(registry_url)
    yield reg
    reg.close()


def test_for_branch_on_a_missing_branch_says_how_to_create_it(
    home: Path, registry: Registry
) -> None:
    with pytest.raises(BranchNotFound, match=r"for_branch\('nope', create=True\)"):
        Checkpointer.for_branch("nope")
    assert registry.branches() == []
    assert registry.runs() == []


def test_a_registry_a_script_made_records_its_store_and_holds_later_users_to_it(
    home: Path, registry: Registry, tmp_path: Path
) -> None:
    with Checkpointer.for_branch("b", create=True) as ckpt:
        ckpt.save(1, model=lower.build_model(0)).result()
    assert registry.get_meta("store_url") == str(home / "store")
    with pytest.raises(ConfigError, match="records store"):
        Checkpointer.for_branch("b", store_url=str(tmp_path / "other"))


def test_for_branch_create_makes_the_branch_from_a_ref_with_its_task(
    home: Path, registry: Registry
) -> None:
    model = lower.build_model(0)
    with Checkpointer.for_branch("base", create=True) as ckpt:
        base_id = ckpt.save(10, model=model).result()
    with Checkpointer.for_branch("head", create=True, task=TASK, from_="base") as ckpt:
        new = upper.build_model(1)
        record = ckpt.restore(model=new)
        assert record is not None and record.id == base_id
        assert not ckpt.last_restore.resumed and ckpt.last_restore.transferred
    b = registry.get_branch("head")
    assert (b.base, b.head, b.task) == (base_id, base_id, TASK)
    # an existing branch is used as it is
    with Checkpointer.for_branch("head", create=True, from_="base") as ckpt:
        assert ckpt.head is not None and ckpt.head.id == base_id


def test_a_script_gets_a_run_row_with_its_checkpoints_and_metrics(
    home: Path, registry: Registry
) -> None:
    model = lower.build_model(0)
    with Checkpointer.for_branch("b", create=True) as ckpt:
        run_id = ckpt.run_id
        ckpt.log_metrics(5, loss=0.5, accuracy=0.75)
        first = ckpt.save(10, model=model).result()
        ckpt.log_metrics(10, loss=0.25)
        (live,) = registry.runs("b")
        assert live.status == "running"
    (run,) = registry.runs("b")
    assert (run.id, run.status, run.error) == (run_id, "succeeded", None)
    assert run.config["source"] == "python" and run.config["pid"] == os.getpid()
    assert registry.get(first).run_id == run_id
    points = {(p.metric, p.step): p.value for p in registry.run_metrics(run_id)}
    assert points == {("accuracy", 5): 0.75, ("loss", 5): 0.5, ("loss", 10): 0.25}
    assert registry.lease("b") is None  # given back


def test_a_with_block_that_raises_fails_the_run_and_ctrl_c_stops_it(
    home: Path, registry: Registry
) -> None:
    with pytest.raises(ValueError), Checkpointer.for_branch("b", create=True):
        raise ValueError("bad batch")
    with pytest.raises(KeyboardInterrupt), Checkpointer.for_branch("b"):
        raise KeyboardInterrupt
    runs = registry.runs("b")
    assert [(r.status, r.error) for r in runs] == [
        ("failed", "ValueError: bad batch"),
        ("stopped", "KeyboardInterrupt"),
    ]


def test_a_second_writer_on_a_branch_is_refused_naming_the_live_run(
    home: Path, registry: Registry
) -> None:
    with Checkpointer.for_branch("b", create=True) as first:
        with pytest.raises(BranchLeased, match=f"run {first.run_id} on host"):
            Checkpointer.for_branch("b")
        assert len(registry.runs("b")) == 1  # the refused one left no Run row
    with Checkpointer.for_branch("b") as second:  # given back at close
        assert second.run_id != first.run_id


def test_a_failed_save_fails_the_run(home: Path, registry: Registry) -> None:
    model = lower.build_model(0)
    with Checkpointer.for_branch("b", create=True) as ckpt:
        pending = ckpt.save(1, model=model)
        pending.result()
        # another writer moves the head under this checkpointer: its next commit must fail
        registry.create_branch("other", from_ref="b")
        with Checkpointer("other", registry=registry, store=str(home / "store")) as other:
            moved = other.save(2, model=model).result()
        with registry._session(write=True) as s:  # the head moved by hand, as a racing writer
            from tlreg.registry import models as m

            row = s.get(m.Branch, "b")
            assert row is not None
            row.head = moved
        failing = ckpt.save(3, model=model)
        with pytest.raises(Exception, match="moved"):
            failing.result()
    (run,) = registry.runs("b")
    assert run.status == "failed"
    assert run.error is not None and run.error.startswith("1 checkpoints failed (first at step 3")


def test_a_with_block_that_ends_normally_raises_the_saves_that_failed_unchecked(
    home: Path, registry: Registry
) -> None:
    """The README's loop never calls result(): a failed save must not pass in silence."""
    model = lower.build_model(0)
    registry.create_branch("b")
    with pytest.raises(CheckpointError, match=r"failed .*unchecked failures at steps 2, 3"):
        with Checkpointer.for_branch("b") as ckpt:
            ckpt.save(1, model=model).result()
            registry.commit("b", "0" * 32, step=5, objects={})  # the head moves under it
            ckpt.save(2, model=model)
            ckpt.save(3, model=model)
    (run,) = registry.runs("b")
    assert run.status == "failed" and run.error is not None
    assert run.error.startswith("2 checkpoints failed (first at step 2")


def _script(home: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        """
        import torch
        from tlreg.training import Checkpointer
        model = torch.nn.Linear(256, 256)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )


def test_saves_never_awaited_are_committed_at_exit_with_a_warning(
    home: Path, registry: Registry
) -> None:
    registry.create_branch("b")
    proc = _script(
        home,
        """
        import time
        ckpt = Checkpointer.for_branch("b")
        commit = ckpt.registry.commit
        def slow_commit(*args, **kwargs):  # both saves are still pending when the script ends
            time.sleep(1.0)
            return commit(*args, **kwargs)
        ckpt.registry.commit = slow_commit
        ckpt.save(1, model=model)
        ckpt.save(2, model=model)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "tlreg: Checkpointer for branch 'b' was not closed at exit: committing 2 pending saves "
        "(steps 1, 2); call close() or use a with block"
    ) in proc.stderr
    assert [r.step for r in registry.log("b")] == [2, 1]
    (run,) = registry.runs("b")
    assert run.status == "succeeded"


def test_a_checkpointer_left_open_with_nothing_pending_is_closed_at_exit_with_a_warning(
    home: Path, registry: Registry
) -> None:
    registry.create_branch("b")
    proc = _script(
        home,
        """
        ckpt = Checkpointer.for_branch("b")
        ckpt.save(1, model=model).result()
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        "tlreg: Checkpointer for branch 'b' was not closed at exit: closing it; "
        "call close() or use a with block\n"
    )
    (run,) = registry.runs("b")
    assert run.status == "succeeded"


def test_a_save_that_cannot_commit_at_exit_is_reported_lost(home: Path, registry: Registry) -> None:
    registry.create_branch("b")
    proc = _script(
        home,
        """
        from tlreg.registry import Registry
        import os
        ckpt = Checkpointer.for_branch("b")
        ckpt.save(1, model=model).result()
        with Registry(os.environ["TLREG_REGISTRY_URL"]) as r:
            r.commit("b", "0" * 32, step=5, objects={})  # the head moved: step 2 cannot land
        ckpt.save(2, model=model)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tlreg: WARNING: the checkpoint at step 2 of branch 'b' was LOST at exit" in proc.stderr


def test_log_metrics_needs_a_run(home: Path, registry: Registry) -> None:
    registry.create_branch("b")
    with (
        Checkpointer("b", registry=registry, store=str(home / "store")) as ckpt,
        pytest.raises(RuntimeError, match="records no run"),
    ):
        ckpt.log_metrics(1, loss=1.0)
    assert registry.runs() == []


def test_restore_of_a_model_resumes_from_the_saved_step(home: Path) -> None:
    model = lower.build_model(0)
    with Checkpointer.for_branch("b", create=True) as ckpt:
        ckpt.save(7, model=model).result()
    fresh = lower.build_model(1)
    with Checkpointer.for_branch("b") as ckpt:
        record = ckpt.restore(model=fresh)
    assert record is not None and record.step == 7 and ckpt.last_restore.resumed
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_scripts_run_records_its_argv_without_passwords(home: Path, registry: Registry) -> None:
    registry.create_branch("b")
    proc = _script(
        home,
        """
        with Checkpointer.for_branch("b"):
            pass
        """,
        "--source",
        "s3://user:hunter2@bucket/data",
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = registry.runs("b")
    assert run.config["argv"][1:] == ["--source", "s3://user@bucket/data"]
    assert "hunter2" not in repr(run.config)
