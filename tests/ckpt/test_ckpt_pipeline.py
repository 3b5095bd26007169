"""The asynchronous pipeline: staged vs committed, lazy staging, back-pressure, failures."""

from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch
from faulty_stores import FailingStore

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, PendingSave
from tlreg.ckpt.staging import align


def test_eager_save_is_staged_when_it_returns_and_later_mutation_is_not_saved(
    gated_store, model_factory, clone, same
):
    model = model_factory()
    state = {"model": model.state_dict()}
    before = clone(state)
    gated_store.gate.clear()  # nothing reaches the store until we say so
    with AsyncCheckpointer(gated_store) as ckpt:
        pending = ckpt.save(state, step=1)
        assert pending.staged.done() and not pending.committed.done()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        gated_store.gate.set()
        loaded = ckpt.load(pending.result())
    same(before, loaded)
    assert not torch.equal(loaded["model"]["0.weight"], model.state_dict()["0.weight"])
    assert pending.stats.stall_s > 0 and pending.stats.persist_s > 0
    assert pending.stats.tensors == 6
    assert pending.stats.logical_bytes == sum(t.nbytes for t in before["model"].values())


def test_lazy_save_mutation_after_staged_is_not_saved(gated_store, model_factory, clone, same):
    model = model_factory()
    state = {"model": model.state_dict()}
    before = clone(state)
    gated_store.gate.clear()
    with AsyncCheckpointer(gated_store, lazy=True) as ckpt:
        pending = ckpt.save(state)
        pending.staged.result()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-3.0)
        gated_store.gate.set()
        same(before, ckpt.load(pending.result()))


def test_lazy_save_with_attached_optimizer_steps_only_after_staging(
    store, model_factory, clone, same, held_copy
):
    model = model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 12)).sum().backward()
    state = {"model": model.state_dict()}
    before = clone(state)
    hooks_before = len(opt._optimizer_step_pre_hooks)

    with AsyncCheckpointer(store, lazy=True) as ckpt:
        ckpt.attach_optimizer(opt)
        ckpt.attach_optimizer(opt)  # what every lazy save(optimizer=...) does: one hook
        assert len(opt._optimizer_step_pre_hooks) == hooks_before + 1
        pending = ckpt.save(state)  # returns at once: the copy is held back
        assert not pending.staged.done()
        stepper = held_copy.step_waiting(opt)
        same(before, {"model": model.state_dict()})  # parameters untouched so far
        held_copy.release.set()
        stepper.join()
        same(before, ckpt.load(pending.result()))
    assert not torch.equal(model.state_dict()["0.weight"], before["model"]["0.weight"])
    assert len(opt._optimizer_step_pre_hooks) == hooks_before
    opt.step()  # close() removed the hook; stepping works without a checkpointer


def test_max_inflight_bytes_bounds_staged_bytes_of_uncommitted_saves(gated_store):
    state = {"w": torch.zeros(10_000), "b": torch.ones(300)}
    per_save = align(40_000) + align(1_200)
    limit = 2 * per_save + per_save // 2  # room for two saves, not three
    observed: list[int] = []
    ckpt = AsyncCheckpointer(gated_store, max_inflight_bytes=limit)
    gated_store.on_put = lambda key: observed.append(ckpt.inflight_bytes)
    gated_store.gate.clear()
    returned: list[PendingSave] = []

    def saver() -> None:
        for step in range(5):
            state["w"].fill_(step)
            returned.append(ckpt.save(state, step=step))

    thread = threading.Thread(target=saver)
    thread.start()
    thread.join(timeout=0.5)
    assert len(returned) == 2, "a third save must wait while two are in flight"
    assert ckpt.inflight_bytes == 2 * per_save
    gated_store.gate.set()
    thread.join()
    ids = [p.result() for p in returned]
    assert len(set(ids)) == 5 and max(observed) <= limit
    assert ckpt.inflight_bytes == 0
    assert [ckpt.load(i)["w"][0].item() for i in ids] == [0, 1, 2, 3, 4]
    ckpt.close()


def test_failed_save_writes_no_manifest_and_result_reraises_the_original_error(
    tmp_path, monkeypatch, same
):
    monkeypatch.setattr("tlreg.ckpt.persist.PACK_BYTES", 4096)
    store = FailingStore(str(tmp_path / "faulty"), fail_at=3)
    state = {f"t{i}": torch.full((500,), float(i)) for i in range(8)}  # 4 packs of two tensors
    with AsyncCheckpointer(store) as ckpt:
        pending = ckpt.save(state)
        with pytest.raises(OSError, match="injected: no space left") as info:
            pending.result()
        assert list(store.list("manifests")) == []
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "put" in frames  # the traceback reaches the store's own frame
        assert isinstance(pending.committed.exception(), OSError)
        # the checkpointer keeps working, and does not trust objects of the failed save
        store.fail_at = -1
        same(state, ckpt.load(ckpt.save(state).result()))
        assert len(list(store.list("manifests"))) == 1


def test_close_waits_for_pending_saves_and_refuses_new_ones(gated_store):
    ckpt = AsyncCheckpointer(gated_store)
    gated_store.gate.clear()
    pending = ckpt.save({"x": torch.arange(10)})
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not pending.done()
    gated_store.gate.set()
    closer.join()
    assert pending.done() and pending.committed.exception() is None
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.save({"x": torch.arange(10)})
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.load(pending.result())


def test_pending_save_is_constructible_from_futures():
    from concurrent.futures import Future

    staged: Future[None] = Future()
    committed: Future[str] = Future()
    pending = PendingSave(staged, committed)
    committed.set_result("a" * 32)
    assert pending.result() == "a" * 32 and pending.stats.new_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stage_through_pinned_buffers_and_round_trip(store, same):
    torch.manual_seed(0)
    on_gpu = {
        "w": torch.randn(256, 256, device="cuda"),
        "h": torch.randn(33, device="cuda", dtype=torch.bfloat16).t(),
        "cpu": torch.arange(5),
    }
    expected = {k: v.cpu() for k, v in on_gpu.items()}
    with AsyncCheckpointer(store, lazy=True) as ckpt:
        pending = ckpt.save(on_gpu)
        pending.staged.result()
        on_gpu["w"].add_(1)
        same(expected, ckpt.load(pending.result()))


def test_a_saves_live_byte_count_waits_for_its_writes_and_ends_at_every_staged_byte(gated_store):
    weight = torch.arange(5000, dtype=torch.float32)
    state = {"w": weight, "tied": weight, "b": torch.ones(300), "empty": torch.zeros(0)}
    staged = 2 * 20_000 + 1_200  # a tensor under two paths is staged under each
    with AsyncCheckpointer(gated_store, writer="thread") as ckpt:
        gated_store.gate.clear()  # every object write waits
        try:
            pending = ckpt.save(state, step=1)
            time.sleep(0.3)
            assert not pending.done()
            assert pending.stats.bytes_done == 20_000  # the second path of the tied tensor
        finally:
            gated_store.gate.set()
        first = pending.result()
        assert pending.stats.bytes_done == pending.stats.bytes_copied == staged
        again = ckpt.save(state, step=2)  # everything found stored: counted, nothing written
        again.result()
        assert again.stats.bytes_done == staged and again.stats.new_bytes == 0
        read: list[int] = []
        ckpt.load(first, on_bytes=read.append)
        assert sum(read) == staged
