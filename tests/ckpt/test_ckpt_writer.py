"""The writer process (``writer="process"``) against the thread writer: same bytes, same
manifests, failures and a killed writer surfacing from ``pending.result()``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_stores import FailingStore

from tlreg.ckpt import AsyncCheckpointer, WriterError
from tlreg.ckpt.objects import object_prefix
from tlreg.storage_backends import MemoryStore, open_store

WRITERS = ["thread", "process"]


def odd_state() -> dict[str, Any]:
    """Packed small tensors, a solo tensor (>= SOLO_BYTES), odd dtypes, an empty tensor, a
    duplicate and plain values."""
    g = torch.Generator().manual_seed(7)
    big = torch.randn(4_300_000, generator=g)  # ~16.4 MiB: an object of its own
    return {
        "big": big,
        "same_as_big": big.clone(),
        "small": {f"t{i}": torch.randn(37 + i, generator=g) for i in range(20)},
        "odd": [
            torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.float64),
            torch.randint(-100, 100, (3, 5), generator=g, dtype=torch.int8),
            torch.randn(4, 6, generator=g).to(torch.bfloat16),
            torch.tensor([True, False]),
            torch.empty(0, 3),
        ],
        "step": 3,
        "name": "run",
    }


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("writer", WRITERS)
def test_round_trip_is_bit_exact_with_either_writer(store, writer, lazy, clone, same):
    state = odd_state()
    before = clone(state)
    with AsyncCheckpointer(store, writer=writer, lazy=lazy) as ckpt:
        pending = ckpt.save(state, step=1)
        pending.staged.result()
        state["big"].add_(1.0)  # after staged: must not reach the checkpoint
        state["small"]["t0"].zero_()
        manifest_id = pending.result()
        same(before, ckpt.load(manifest_id))
        assert pending.stats.tensors_reused == 1  # same_as_big dedups against big
        again = ckpt.save(state)
        same(state, ckpt.load(again.result()))
    with AsyncCheckpointer(store, writer="thread") as reader:  # readable by the other writer
        same(before, reader.load(manifest_id))


def test_both_writers_write_identical_manifest_entries_and_objects(tmp_path):
    state = odd_state()
    manifests = {}
    for writer in WRITERS:
        with AsyncCheckpointer(str(tmp_path / writer), writer=writer) as ckpt:
            manifests[writer] = ckpt.manifest(ckpt.save(state).result())
        files = sorted(
            (p.relative_to(tmp_path / writer).as_posix(), p.read_bytes())
            for p in (tmp_path / writer / "objects").rglob("*")
            if p.is_file()
        )
        manifests[writer + "/files"] = files  # type: ignore[assignment]
    thread, process = manifests["thread"], manifests["process"]
    assert {p: e.to_json() for p, e in thread.tensors.items()} == {
        p: e.to_json() for p, e in process.tensors.items()
    }
    assert thread.objects == process.objects and thread.tree == process.tree
    assert manifests["thread/files"] == manifests["process/files"]


def test_writer_process_failure_surfaces_from_result_and_writes_no_manifest(
    tmp_path, monkeypatch, same
):
    monkeypatch.setattr("tlreg.ckpt.persist.PACK_BYTES", 4096)
    store = FailingStore(str(tmp_path / "faulty"), fail_at=3)
    state = {f"t{i}": torch.full((500,), float(i)) for i in range(8)}  # 4 packs
    with AsyncCheckpointer(store, writer="process") as ckpt:
        pending = ckpt.save(state)
        with pytest.raises(WriterError, match="injected: no space left writing objects/"):
            pending.result()
        assert list(store.list("manifests")) == []
        pid = ckpt._writer.pid
        assert pid is not None  # a failed request does not stop the writer

    with AsyncCheckpointer(FailingStore(str(tmp_path / "faulty")), writer="process") as ckpt:
        same(state, ckpt.load(ckpt.save(state).result()))
        assert len(list(store.list("manifests"))) == 1


def test_killed_writer_fails_the_save_clearly_and_the_next_save_restarts_it(tmp_path, same):
    store = FailingStore(str(tmp_path / "slow"), delay=1.0)
    state = {f"t{i}": torch.full((300_000,), float(i)) for i in range(4)}
    with AsyncCheckpointer(store, writer="process") as ckpt:
        pending = ckpt.save(state)
        deadline = time.monotonic() + 60
        while ckpt._writer.pid is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victim = ckpt._writer.pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WriterError, match=r"died during .*exit code -9.*no manifest"):
            pending.result(timeout=60)
        assert list(store.list("manifests")) == []
        store.delay = 0.0  # (the new writer gets a fresh pickle of the store)
        manifest_id = ckpt.save(state).result(timeout=60)
        assert ckpt._writer.pid not in (None, victim)
        same(state, ckpt.load(manifest_id))


def test_writer_process_exits_when_its_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        from tlreg.ckpt import AsyncCheckpointer
        ckpt = AsyncCheckpointer({str(tmp_path / "s")!r}, writer="process")
        ckpt.save({{"x": torch.arange(10)}}).result()
        print(ckpt._writer.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    writer = int(out.stdout.split()[0])
    deadline = time.monotonic() + 20
    while Path(f"/proc/{writer}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{writer}").exists() or _is_zombie(writer)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_process_writer_refuses_a_store_it_cannot_reach(gated_store):
    with pytest.raises(ValueError, match="writer='thread' with memory://"):
        AsyncCheckpointer(MemoryStore(), writer="process")
    # a LocalStore subclass that pickles as a plain LocalStore would lose its overrides
    with pytest.raises(ValueError, match=r"pickles as a LocalStore.*GatedStore's own methods"):
        AsyncCheckpointer(gated_store, writer="process")
    with pytest.raises(ValueError, match="writer must be 'thread' or 'process'"):
        AsyncCheckpointer(open_store("memory://"), writer="fork")  # type: ignore[arg-type]


def test_close_stops_the_writer_and_unlinks_its_shared_buffers(store):
    ckpt = AsyncCheckpointer(store, writer="process")
    ckpt.save({"x": torch.randn(1000)}).result()
    writer = ckpt._writer
    segments = list(ckpt._stager._shared._names.values())  # type: ignore[union-attr]
    assert segments and all(Path("/dev/shm", s).exists() for s in segments)
    proc = writer._proc
    ckpt.close()
    assert proc is not None and proc.poll() == 0
    assert not any(Path("/dev/shm", s).exists() for s in segments)


def test_process_writer_rewrites_a_skipped_tensor_whose_object_was_deleted(
    store, model_factory, same
):
    model = model_factory()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with AsyncCheckpointer(store, writer="process") as ckpt:
        ckpt.attach_model(model)
        first = ckpt.manifest(ckpt.save({"model": model.state_dict()}).result())
        for digest in first.objects:
            for key in list(store.list(object_prefix(digest))):
                store.delete(key)  # what gc would do
        pending = ckpt.save({"model": model.state_dict()})  # re-read into a shared buffer
        second = pending.result()
        assert pending.stats.new_bytes > 0
        same({"model": model.state_dict()}, ckpt.load(second))
        names = ckpt._stager._shared._names  # type: ignore[union-attr]
        assert len(names) == 1  # the re-read buffer was unlinked, the arena kept
