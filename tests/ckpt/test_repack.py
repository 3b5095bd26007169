"""Repacking in gc: a small unchanged tensor no longer pins its first pack; every kept
checkpoint restores bit-exactly afterwards, also for a reader that holds an old manifest, on
SQLite and PostgreSQL, on a local store and on S3."""

from __future__ import annotations

import threading
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.ckpt.fsck import check_store
from tlreg.ckpt.objects import read_layout, read_relocation, stored_objects
from tlreg.ckpt.repack import live_bytes, live_spans
from tlreg.registry import BeingCollected, Registry
from tlreg.storage_backends import Store, open_store
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage

SAVES = 12


class Pinned(torch.nn.Module):
    """A weight that changes every step and a frozen one of the same size that never does,
    which dedup points at the first checkpoint's pack (where it shares an object with the
    first step's copy of the changing weight: both are large, so the pack policy packs them
    together)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(256, 256, bias=False)  # 256 KiB
        self.register_buffer("rng", torch.arange(256 * 256, dtype=torch.float32))  # 256 KiB


def stored_bytes(store: Store) -> int:
    return sum(read_layout(store, d).nbytes for d in stored_objects(store))


def unique_bytes(store: Store, manifest_ids: list[str]) -> int:
    """Bytes of the distinct tensors the checkpoints hold (what a perfect store keeps)."""
    seen = {}
    for mid in manifest_ids:
        for _, e in read_manifest(store, mid).stored():
            seen[e.hash] = e.nbytes
    return sum(seen.values())


def save_pinned(registry: Registry, store_url: str, saves: int = SAVES) -> tuple[list[str], dict]:
    model = Pinned()
    registry.create_branch("b")
    ids, states = [], {}
    with Checkpointer("b", registry=registry, store=store_url) as ckpt:
        for step in range(1, saves + 1):
            with torch.no_grad():
                model.fc.weight.add_(1.0)
            ids.append(ckpt.save(step, model=model).result())
            states[ids[-1]] = {k: v.clone() for k, v in model.state_dict().items()}
    return ids, states


def assert_restores(store: Store, manifest_id: str, expected: dict) -> None:
    with AsyncCheckpointer(store) as engine:
        state = engine.load(manifest_id)["model"]
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_bucket_url"))
    return str(tmp_path / "store")


def test_repack_frees_the_pack_a_small_unchanged_tensor_pinned(
    registry: Registry, store_url: str
) -> None:
    ids, states = save_pinned(registry, store_url)
    store = open_store(store_url)
    head = ids[-1]
    old_manifest = read_manifest(store, head)  # a reader that opened the head before gc
    pinned = {e.object for _, e in old_manifest.stored()} - set(
        read_manifest(store, ids[-2]).objects
    )
    first_pack = read_manifest(store, ids[0]).tensors["model/rng"].object
    assert old_manifest.tensors["model/rng"].object == first_pack  # the pin of the issue
    assert pinned  # and the head's own pack

    without = collect_garbage(registry, store, keep_last=1, grace=timedelta(0), max_unused=None)
    assert first_pack in stored_objects(store) and not without.repacked
    assert stored_bytes(store) > 1.45 * unique_bytes(store, [head])  # a whole stale weight

    plan = collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
    assert [h for h, _, _ in plan.repacked] == [first_pack]
    ((_, nbytes, live),) = plan.repacked
    # the frozen buffer is live, the first step's weight beside it is not
    assert (live, nbytes) == (256 * 256 * 4, 2 * 256 * 256 * 4)
    assert first_pack not in stored_objects(store)
    assert first_pack in {h for h, _ in plan.objects}
    record = read_relocation(store, first_pack)
    assert record is not None and len(record.ranges) == 1
    assert stored_bytes(store) <= 1.05 * unique_bytes(store, [head])
    assert stored_objects(store) == set(registry.objects_of(head))
    assert_restores(store, head, states[head])
    # a second collection finds nothing more to do
    again = collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
    assert (again.repacked, again.objects, again.prune) == ((), (), ())


def test_max_unused_bounds_what_is_repacked(registry: Registry, tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    ids, _ = save_pinned(registry, url, saves=3)
    store = open_store(url)
    first_pack = read_manifest(store, ids[0]).tensors["model/rng"].object
    dry = collect_garbage(registry, store, keep_last=1, grace=timedelta(0), max_unused=1.0)
    assert dry.repacked == () and first_pack in stored_objects(store)
    # unused share of the pinned pack: the stale weight, half of it
    kept = collect_garbage(registry, store, keep_last=1, grace=timedelta(0), max_unused=0.5)
    assert kept.repacked == () and first_pack in stored_objects(store)
    dry = collect_garbage(registry, store, keep_last=1, grace=timedelta(0), dry_run=True)
    assert [h for h, _, _ in dry.repacked] == [first_pack]
    assert first_pack in stored_objects(store)
    done = collect_garbage(registry, store, keep_last=1, grace=timedelta(0), max_unused=0.49)
    assert [h for h, _, _ in done.repacked] == [first_pack]


def test_repacked_twice_a_tensor_is_found_through_the_chain_of_records(
    registry: Registry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    model = Pinned()
    registry.create_branch("b")
    store = open_store(url)
    states = {}
    with Checkpointer("b", registry=registry, store=url) as ckpt:
        for round_ in range(2):
            for _ in range(3):
                with torch.no_grad():
                    model.fc.weight.add_(1.0)
                mid = ckpt.save(len(states), model=model).result()
                states[mid] = {k: v.clone() for k, v in model.state_dict().items()}
            if round_ == 0:
                registry.tag(mid, "kept")
            plan = collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
            assert len(plan.repacked) == 1
    kept = registry.resolve("kept").id
    rng_object = read_manifest(store, kept).tensors["model/rng"].object
    assert rng_object not in stored_objects(store)
    for mid in (kept, registry.resolve("b").id):
        assert_restores(store, mid, states[mid])
    spans = live_spans(store, [read_manifest(store, kept)], stored_objects(store))
    assert sum(live_bytes(s) for s in spans.values()) == unique_bytes(store, [kept])


def test_a_restore_running_during_a_repack_returns_correct_bytes(
    registry: Registry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    ids, states = save_pinned(registry, url)
    store = open_store(url)
    head = ids[-1]
    failures: list[BaseException] = []
    loads = 0
    stop = threading.Event()

    def restore_loop() -> None:
        nonlocal loads
        with AsyncCheckpointer(open_store(url)) as engine:
            while not stop.is_set():
                try:
                    state = engine.load(head)["model"]
                    for k, v in states[head].items():
                        assert torch.equal(state[k], v), k
                    loads += 1
                except BaseException as e:
                    failures.append(e)
                    return

    thread = threading.Thread(target=restore_loop)
    thread.start()
    try:
        plan = collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
    finally:
        stop.set()
        thread.join()
    assert plan.repacked and not failures, failures[:1]
    assert loads >= 1
    assert_restores(store, head, states[head])


def test_saves_running_during_a_repack_commit_whole_checkpoints(
    registry: Registry, tmp_path: Path
) -> None:
    url = str(tmp_path / "store")
    ids, states = save_pinned(registry, url, saves=4)
    store = open_store(url)
    registry.create_branch("side", from_ref=ids[-1])
    failures: list[BaseException] = []
    stop = threading.Event()
    saved = threading.Event()  # the side branch has a checkpoint of its own

    def save_loop() -> None:
        model = Pinned()  # the same frozen buffer: every save deduplicates against its pack
        with Registry(registry.url) as own, Checkpointer("side", registry=own, store=url) as ckpt:
            ckpt.restore(model=model)
            step = 100
            while not stop.is_set() and step < 130:
                with torch.no_grad():
                    model.fc.weight.add_(1.0)
                step += 1
                try:
                    mid = ckpt.save(step, model=model).result()
                except BeingCollected:
                    continue  # refused while gc deletes what it named: "save again"
                except BaseException as e:
                    failures.append(e)
                    return
                states[mid] = {k: v.clone() for k, v in model.state_dict().items()}
                saved.set()

    thread = threading.Thread(target=save_loop)
    thread.start()
    try:
        # on a busy machine the collections could all end before the first save starts
        saved.wait(timeout=120)
        for _ in range(3):
            # a grace, as in real use: with none, the manifest of a save between its write
            # and its registry commit is an orphan due at once (what grace exists for)
            collect_garbage(registry, store, keep_last=1, grace=timedelta(minutes=10))
    finally:
        stop.set()
        thread.join()
    assert not failures, "".join(traceback.format_exception(failures[0]))
    collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
    kept = registry.kept_manifests()
    assert len(kept) >= 2
    for mid in kept:
        assert_restores(store, mid, states[mid])
    report = check_store(store, kept)
    assert report.ok, report.problems
