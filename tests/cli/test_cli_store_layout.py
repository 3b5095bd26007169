"""The fanned-out ``manifests/`` layout: new manifests under ``manifests/<xx>/<yy>/``; a store
written before keeps working (readers, gc) and ``tlreg upgrade`` moves its manifests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.ckpt.fsck import upgrade_store
from tlreg.ckpt.manifest import flat_manifest_key, manifest_key, stored_manifests
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer


def test_manifests_are_fanned_out_like_objects(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    with AsyncCheckpointer(store) as engine:
        ids = [engine.save({"w": torch.full((4,), float(i))}).result() for i in range(3)]
    keys = sorted(store.list("manifests"))
    assert keys == sorted(f"manifests/{i[-2:]}/{i[-4:-2]}/{i}.json" for i in ids)
    assert keys == sorted(manifest_key(i) for i in ids)
    assert stored_manifests(store) == set(ids)


def flatten(store_dir: Path, manifest_id: str) -> None:
    """Move a manifest where tlreg before the fan-out kept it."""
    fanned = store_dir / manifest_key(manifest_id)
    (store_dir / flat_manifest_key(manifest_id)).write_bytes(fanned.read_bytes())
    fanned.unlink()


def test_an_old_flat_store_is_read_collected_and_upgraded(
    tlreg: Callable, home: Path, registry_url: str
) -> None:
    tlreg("init")
    store_dir = home / "store"
    store = open_store(str(store_dir))
    registry = Registry(registry_url)
    registry.create_branch("b")
    model = torch.nn.Linear(8, 8)
    with Checkpointer("b", registry=registry, store=str(store_dir)) as ckpt:
        ids = [ckpt.save(step, model=model).result() for step in (1, 2)]
    with AsyncCheckpointer(store) as engine:  # an unregistered save (crashed before commit)
        orphan = engine.save({"w": torch.ones(3)}).result()
    for mid in (*ids, orphan):
        flatten(store_dir, mid)
    assert stored_manifests(store) == {*ids, orphan}
    assert read_manifest(store, ids[1]).id == ids[1]
    assert tlreg("verify", "b").exit_code == 0
    # gc finds the flat orphan and deletes it (first pass records it, grace 0s lets it go)
    assert tlreg("gc", "--grace", "0s").exit_code == 0
    assert stored_manifests(store) == set(ids)

    # a crash mid-upgrade: one manifest copied but its flat file not yet deleted
    (store_dir / manifest_key(ids[0])).parent.mkdir(parents=True, exist_ok=True)
    (store_dir / manifest_key(ids[0])).write_bytes(
        (store_dir / flat_manifest_key(ids[0])).read_bytes()
    )
    result = tlreg("upgrade")
    assert result.exit_code == 0, result.output
    assert "2 manifests moved" in result.output
    assert sorted(store.list("manifests")) == sorted(manifest_key(i) for i in ids)
    assert upgrade_store(store) == 0
    assert "store layout is up to date" in tlreg("upgrade").output
    report = json.loads(tlreg("verify", "--all", "--json").output)
    assert report["ok"] and report["checkpoints"] == 2
    with Checkpointer("b", registry=registry, store=str(store_dir)) as ckpt:
        assert ckpt.restore(model=torch.nn.Linear(8, 8)).id == ids[1]
    registry.close()
