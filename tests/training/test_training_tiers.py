"""The Checkpointer with a node-local tier, without Ray (issue 16): a checkpoint is committed
``local`` with its node, then marked ``shared`` once drained; local-only saves stay local;
the tier is pruned to the last K local checkpoints once a newer one is shared; a restore says
which tier it read; a node's loss makes its local-only checkpoints ``lost`` and the restorable
head the newest shared one. Real zarr stores on disk, SQLite and PostgreSQL."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from tlreg.ckpt import verify
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower


def _manifests(root: Path) -> set[str]:
    """Ids of the manifests stored under ``root`` (manifests/xx/yy/ID.json)."""
    return {p.stem for p in (root / "manifests").rglob("*.json")}


def test_local_then_shared_with_persist_every_and_the_tier_pruned_to_the_last_k(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    node = socket.gethostname()
    store, tier = tmp_path / "store", tmp_path / "tiers" / "{node}"
    model = lower.build_model(0)
    with Checkpointer(
        "base",
        registry=registry,
        store=str(store),
        local_tier=str(tier),
        persist_every=4,
        local_keep=1,
    ) as ckpt:
        assert ckpt.nodes == (node,) and ckpt.local_tier == str(tmp_path / "tiers" / node)
        saves = []
        for step in range(1, 10):
            with torch.no_grad():
                model.head.bias.add_(1.0)  # every checkpoint differs
            saves.append(ckpt.save(step, model=model))
            # a shared save is drained before the next save, whose prune then counts it
            (saves[-1].committed if step % 4 == 0 else saves[-1].local).result()
        ids = [p.result() for p in saves]
        expected = ["shared" if s % 4 == 0 else "local" for s in range(1, 10)]
        assert [p.tier for p in saves] == expected
    records = [registry.get(i) for i in ids]
    assert [r.tier for r in records] == ["shared" if r.step % 4 == 0 else "local" for r in records]
    assert all(r.nodes == (node,) for r in records if r.tier == "local")
    assert [r.step for r in reversed(registry.log("base"))] == list(range(1, 10))
    shared_store = open_store(str(store))
    for r in records:
        if r.tier == "shared":
            assert verify(shared_store, r.manifest).ok
        else:
            assert r.manifest not in _manifests(store)
    # the prune before step 9's save (after step 8 was shared) kept step 8 and one older
    # local one (step 7); steps 1-3 and 5-6 are gone from the tier
    local_root = tmp_path / "tiers" / node
    kept = _manifests(local_root)
    by_step = {r.step: r.manifest for r in records}
    assert {by_step[8], by_step[9]} <= kept
    assert not {by_step[s] for s in (1, 2, 3, 5, 6)} & kept


def test_a_restore_says_which_tier_it_read_and_a_lost_node_makes_local_checkpoints_lost(
    registry: Registry, tmp_path: Path
) -> None:
    registry.create_branch("base")
    node = socket.gethostname()
    store, tier = str(tmp_path / "store"), str(tmp_path / "tiers" / "{node}")
    model = lower.build_model(0)
    with Checkpointer(
        "base", registry=registry, store=store, local_tier=tier, persist_every=2
    ) as ckpt:
        shared = ckpt.save(2, model=model).result()
        with torch.no_grad():
            model.head.bias.add_(1.0)
        local = ckpt.save(3, model=model).result()
    assert registry.get(local).tier == "local"

    fresh = lower.build_model(1)
    with Checkpointer("base", registry=registry, store=store, local_tier=tier) as ckpt:
        record = ckpt.restore(model=fresh)
        assert record is not None and record.id == local
        assert ckpt.last_restore.tier == "local"
        assert ckpt.last_restore.tiers.get("shared", 0) == 0
    assert torch.equal(fresh.head.bias, model.head.bias)

    lost = registry.mark_nodes_lost([node])
    assert [c.id for c in lost] == [local]
    head = registry.restorable_head("base")
    assert head is not None and head.id == shared
    # a new node's tier is empty: everything comes from the store
    other = str(tmp_path / "other-tier")
    with Checkpointer("base", registry=registry, store=store, local_tier=other) as ckpt:
        record = ckpt.restore(checkpoint=head.id, model=fresh)
        assert record is not None and record.step == 2
        assert ckpt.last_restore.tier == "shared"
        with torch.no_grad():
            fresh.head.bias.add_(5.0)
        resumed = ckpt.save(3, model=fresh).result()
    # the new step-3 checkpoint continues from the restored one, past the lost one
    assert registry.get(resumed).parents == (shared,)
    assert [r.step for r in reversed(registry.log("base"))] == [2, 3]
    assert registry.resolve("base").id == resumed
