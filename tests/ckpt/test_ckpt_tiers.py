"""The node-local tier: writes land locally, drains copy to the shared store in a safe order,
reads come from the nearest tier, and pruning a tier keeps exactly what is kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, CheckpointNotFound, CorruptCheckpoint
from tlreg.ckpt.manifest import manifest_key
from tlreg.ckpt.objects import chunk_key, meta_key
from tlreg.ckpt.tiers import Drainer, TieredStore, TokenBucket, expand_tier, prune_local
from tlreg.ckpt.verify import verify
from tlreg.storage_backends import LocalStore, Store, open_store
from tlreg.storage_backends.errors import StoreUnavailable

Same = Callable[[Any, Any], None]


def _state(seed: int, n: int = 4, size: int = 1000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"w{i}": torch.randn(size, generator=g) for i in range(n)},
        "step": seed,
    }


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "s3":
        return open_store(str(request.getfixturevalue("s3_bucket_url")))
    return open_store(str(tmp_path / "shared"))


def _keys(store: Store) -> set[str]:
    return set(store.list(""))


def test_expand_tier_names_each_node_its_own_folder() -> None:
    assert expand_tier("/nvme/tlreg/{node}/tier", "a1b2") == "/nvme/tlreg/a1b2/tier"
    assert expand_tier("/nvme/tlreg", "a1b2") == "/nvme/tlreg"


def test_a_tiered_store_writes_locally_and_reads_the_nearest_tier(tmp_path: Path) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    shared.put("a/only-shared", b"S")
    shared.put("a/both", b"shared copy")
    tiered = TieredStore(local, shared)
    tiered.put("a/both", b"local copy")
    tiered.put("a/new", b"N")
    assert tiered.url == shared.url
    assert _keys(local) == {"a/both", "a/new"}
    assert _keys(shared) == {"a/only-shared", "a/both"}
    assert tiered.get("a/both") == b"local copy"
    assert tiered.get("a/only-shared") == b"S"
    assert tiered.get_range("a/only-shared", 0, 1) == b"S"
    assert tiered.size("a/both") == len(b"local copy")
    assert sorted(tiered.list("a")) == ["a/both", "a/new", "a/only-shared"]
    assert tiered.exists("a/only-shared") and not tiered.exists("a/none")
    tiered.delete("a/both")  # the local copy only
    assert tiered.get("a/both") == b"shared copy"


def test_a_local_save_touches_nothing_in_the_shared_store_until_it_is_drained(
    tmp_path: Path, shared: Store, same: Same
) -> None:
    local = open_store(str(tmp_path / "local"))
    state = _state(1)
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        pending = ckpt.save(state, step=1)
        manifest = pending.manifest()
    assert _keys(shared) == set()
    assert local.exists(manifest_key(manifest.id))

    stats = Drainer(local, shared).drain(manifest.objects, manifest.id)
    assert (stats.objects, stats.present) == (len(manifest.objects), 0)
    # the shared store alone now holds the whole checkpoint, bit-exactly
    with AsyncCheckpointer(shared) as plain:
        same(plain.load(manifest.id), state)
    assert verify(shared, manifest.id).ok
    # draining again copies nothing
    again = Drainer(local, shared).drain(manifest.objects, manifest.id)
    assert (again.objects, again.present) == (0, len(manifest.objects))


def test_a_drain_copies_only_what_the_shared_store_lacks(tmp_path: Path, same: Same) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    frozen = _state(1)["model"]
    with AsyncCheckpointer(shared) as plain:  # an ancestor already in the shared store
        base = plain.save({"model": frozen}, step=0).manifest()
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        ckpt.remember(base.id)  # deduplicates against the shared store's objects
        state = {"model": frozen, "head": torch.arange(10.0)}
        manifest = ckpt.save(state, step=1).manifest()
    stats = Drainer(local, shared).drain(manifest.objects, manifest.id)
    assert stats.present == len(set(base.objects) & set(manifest.objects)) >= 1
    assert stats.objects == len(set(manifest.objects) - set(base.objects)) >= 1
    with AsyncCheckpointer(shared) as plain:
        same(plain.load(manifest.id), state)


def test_a_missing_local_object_is_read_from_the_shared_store(tmp_path: Path, same: Same) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    state = _state(2)
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        manifest = ckpt.save(state, step=2).manifest()
    Drainer(local, shared).drain(manifest.objects, manifest.id)
    for digest in manifest.objects:  # the node lost the objects, not the manifest
        for key in [k for k in local.list("objects") if digest in k]:
            local.delete(key)
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        same(ckpt.load(manifest.id), state)


def test_a_damaged_local_object_is_never_drained(tmp_path: Path) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        manifest = ckpt.save(_state(3), step=3).manifest()
    (digest,) = manifest.objects
    path = Path(str(local.local_path(chunk_key(digest, 0))))
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match=f"object {digest} on the local tier .* hash"):
        Drainer(local, shared).drain(manifest.objects, manifest.id)
    assert not shared.exists(meta_key(digest))
    assert not shared.exists(manifest_key(manifest.id))


_DRAIN_SCRIPT = """
import json, sys
from tlreg.ckpt.tiers import Drainer
from tlreg.storage_backends import open_store
local, shared, objects, manifest_id, rate = json.loads(sys.argv[1])
Drainer(open_store(local), open_store(shared), bytes_per_s=rate).drain(objects, manifest_id)
"""


def test_a_drain_killed_mid_copy_leaves_nothing_visible_and_the_next_drain_finishes(
    tmp_path: Path, same: Same
) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    # one 48 MiB pack of three 16 MiB chunks, drained at 8 MiB/s: ~6 s to copy
    state = {"big": torch.arange(12 << 20, dtype=torch.float32)}
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        manifest = ckpt.save(state, step=1).manifest()
    (digest,) = manifest.objects
    args = json.dumps([local.url, shared.url, list(manifest.objects), manifest.id, 8 << 20])
    proc = subprocess.Popen([sys.executable, "-c", _DRAIN_SCRIPT, args])
    try:
        first = Path(str(shared.local_path(chunk_key(digest, 0))))
        deadline = time.monotonic() + 60
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the drain ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    copied = _keys(shared)
    assert chunk_key(digest, 0) in copied  # killed mid-copy...
    assert meta_key(digest) not in copied  # ...so the object is not complete in shared
    assert manifest_key(manifest.id) not in copied  # and no manifest points at it
    with pytest.raises(CheckpointNotFound, match=f"no checkpoint manifest {manifest.id}"):
        with AsyncCheckpointer(shared) as plain:
            plain.load(manifest.id)

    stats = Drainer(local, shared).drain(manifest.objects, manifest.id)
    assert stats.objects == 1
    with AsyncCheckpointer(shared) as plain:
        same(plain.load(manifest.id), state)
    assert verify(shared, manifest.id).ok


def test_the_drain_budget_holds_bytes_back_by_exactly_the_excess() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    bucket = TokenBucket(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.take(500)  # 2,500 bytes: the first 1,000 are the burst, 1,500 wait 1.5 s
    assert bucket.taken == 2500
    assert bucket.waited_s == pytest.approx(1.5)
    assert now[0] == pytest.approx(1.5)
    now[0] += 10.0  # idle: the budget refills to its burst only
    bucket.take(1500)
    assert bucket.waited_s == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive bytes/s"):
        TokenBucket(0)


def test_a_drain_under_a_budget_is_throttled(tmp_path: Path) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        manifest = ckpt.save({"w": torch.zeros(1 << 20)}, step=1).manifest()  # 4 MiB
    stats = Drainer(local, shared, bytes_per_s=2 << 20).drain(manifest.objects, manifest.id)
    # 2 MiB pass at once (the burst); the rest waits at 2 MiB/s
    assert stats.bytes > 4 << 20
    assert stats.throttled_s == pytest.approx((stats.bytes - (2 << 20)) / (2 << 20), rel=0.05)


def test_pruning_a_local_tier_keeps_exactly_the_kept_checkpoints(
    tmp_path: Path, same: Same
) -> None:
    local, shared = open_store(str(tmp_path / "local")), open_store(str(tmp_path / "shared"))
    common = torch.randn(100_000)
    with AsyncCheckpointer(TieredStore(local, shared)) as ckpt:
        first = ckpt.save({"common": common}, step=1).manifest()
        old = ckpt.save({"other": torch.ones(20_000)}, step=2).manifest()
        kept_state = {"common": common, "w": torch.full((20_000,), 2.0)}
        kept = ckpt.save(kept_state, step=3).manifest()  # "common" deduplicates to first's
    assert set(first.objects) <= set(kept.objects)
    assert not set(old.objects) & set(kept.objects)
    stats = prune_local(local, [kept.id])
    assert (stats.manifests, stats.objects) == (2, len(old.objects))
    on_tier = {k.split("/")[3] for k in local.list("objects")}
    assert on_tier == set(kept.objects)
    assert not local.exists(manifest_key(old.id)) and not local.exists(manifest_key(first.id))
    assert _keys(shared) == set()  # the shared store is never touched
    with AsyncCheckpointer(local) as alone:  # the kept checkpoint is whole on the tier
        same(alone.load(kept.id), kept_state)


class _RefusingStore(LocalStore):
    """A shared store that refuses every write (an outage of the shared tier)."""

    def put(self, key: str, data: Any) -> None:
        raise StoreUnavailable(f"cannot write {key}: the shared store is down")


def test_a_save_is_local_safe_before_it_is_shared(tmp_path: Path, same: Same) -> None:
    shared_url = str(tmp_path / "shared")
    state = {"w": torch.randn(1 << 20)}  # 4 MiB, drained at 1 MiB/s: ~3 s after local-safe
    with AsyncCheckpointer(
        shared_url, local_tier=str(tmp_path / "local"), drain_bytes_per_s=1 << 20
    ) as ckpt:
        pending = ckpt.save(state, step=1)
        assert pending.tier == "shared"
        manifest_id = pending.local.result()
        assert not pending.committed.done()  # local-safe, still draining
        assert not open_store(shared_url).exists(manifest_key(manifest_id))
        assert pending.manifest().id == manifest_id  # the manifest is there from local-safe on
        assert pending.result() == manifest_id
        assert 0 < pending.stats.local_s < pending.stats.local_s + pending.stats.drain_s
        assert pending.stats.drained_bytes > 4 << 20
    with AsyncCheckpointer(shared_url) as plain:
        same(plain.load(manifest_id), state)


def test_a_local_only_save_never_touches_the_shared_store(tmp_path: Path, same: Same) -> None:
    shared = open_store(str(tmp_path / "shared"))
    state = _state(5)
    with AsyncCheckpointer(shared, local_tier=str(tmp_path / "local")) as ckpt:
        pending = ckpt.save(state, step=5, persist=False)
        assert pending.tier == "local"
        assert pending.result() == pending.local.result()
        same(ckpt.load(pending.result()), state)
    assert _keys(shared) == set()


def test_a_failed_drain_leaves_the_checkpoint_local_and_says_so(tmp_path: Path, same: Same) -> None:
    shared = _RefusingStore(str(tmp_path / "shared"))
    state = _state(6)
    with AsyncCheckpointer(shared, local_tier=str(tmp_path / "local")) as ckpt:
        pending = ckpt.save(state, step=6)
        manifest_id = pending.local.result()
        with pytest.raises(CheckpointError, match=f"checkpoint {manifest_id} stayed on the local"):
            pending.result()
        same(ckpt.load(manifest_id), state)  # still restorable from the local tier
    assert _keys(shared) == set()


def test_the_writer_process_saves_through_the_local_tier(tmp_path: Path, same: Same) -> None:
    shared_url = str(tmp_path / "shared")
    state = _state(7)
    with AsyncCheckpointer(shared_url, local_tier=str(tmp_path / "local"), writer="process") as c:
        manifest_id = c.save(state, step=7).result()
    with AsyncCheckpointer(shared_url) as plain:
        same(plain.load(manifest_id), state)


def test_pruning_forgets_the_removed_objects_so_no_later_save_points_at_them(
    tmp_path: Path, same: Same
) -> None:
    shared_url = str(tmp_path / "shared")
    v1, v2 = torch.randn(50_000), torch.randn(50_000)
    with AsyncCheckpointer(shared_url, local_tier=str(tmp_path / "local")) as ckpt:
        first = ckpt.save({"x": v1}, step=1, persist=False).result()  # local only
        second = ckpt.save({"x": v2}, step=2).result()  # shared
        stats = ckpt.prune_local([second])
        assert stats.manifests == 1 and stats.removed
        assert not ckpt.local.exists(manifest_key(first))  # type: ignore[union-attr]
        pending = ckpt.save({"x": v1}, step=3)  # v1 again: written anew, not deduplicated
        third = pending.result()  # (pointing at the pruned object, its drain would fail)
        assert pending.stats.new_bytes == v1.numel() * 4
    with AsyncCheckpointer(shared_url) as plain:
        same(plain.load(third), {"x": v1})


def test_a_damaged_local_copy_is_read_again_from_the_shared_store(
    tmp_path: Path, same: Same
) -> None:
    shared_url, local = str(tmp_path / "shared"), open_store(str(tmp_path / "local"))
    state = _state(8)
    with AsyncCheckpointer(shared_url, local_tier=local) as ckpt:
        manifest = ckpt.save(state, step=8).manifest()
        ckpt.wait()
    (digest,) = manifest.objects
    path = Path(str(local.local_path(chunk_key(digest, 0))))
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x10
    path.write_bytes(bytes(raw))
    with AsyncCheckpointer(shared_url, local_tier=local) as ckpt:
        same(ckpt.load(manifest.id), state)
        assert ckpt.last_load_tiers == {"shared": sum(manifest.objects.values())}
