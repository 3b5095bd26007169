"""tlreg gc and tlreg upgrade through the CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tlreg.ckpt import AsyncCheckpointer, verify
from tlreg.ckpt.manifest import stored_manifests
from tlreg.ckpt.objects import stored_objects
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower


def test_gc_keeps_heads_and_tags_and_deletes_only_unreferenced_bytes(
    tlreg: Callable, home: Path, registry_url: str
) -> None:
    tlreg("init")
    store_path = str(home / "store")
    store = open_store(store_path)
    model = lower.build_model(0)
    registry = Registry(registry_url)
    registry.create_branch("b")
    ids = []
    with Checkpointer("b", registry=registry, store=store_path) as ckpt:
        for step in range(1, 5):
            with torch.no_grad():
                model.head.bias.add_(1.0)  # every checkpoint has one new tensor
            ids.append(ckpt.save(step, model=model).result())
    registry.tag(ids[0], "first")
    # A save that crashed before its registry commit: objects + manifest, no row.
    with AsyncCheckpointer(store) as engine:
        orphan = engine.save({"w": torch.full((1000,), 7.0)}).result()
    orphan_objects = set(read_objects(store, orphan)) - set().union(
        *(registry.objects_of(i) for i in ids)
    )
    before = stored_objects(store)

    dry = json.loads(tlreg("gc", "--keep-last", "1", "--grace", "0s", "--dry-run", "--json").output)
    assert dry["prune"] == sorted(ids[1:3]) and stored_objects(store) == before

    result = tlreg("gc", "--keep-last", "1", "--grace", "0s")
    assert result.exit_code == 0, result.output
    pruned = {r.id for r in registry.checkpoints() if r.pruned}
    assert pruned == set(ids[1:3])  # the tagged first and the head stay
    assert [r.id for r in registry.log("b")] == ids[::-1]  # lineage is intact
    for kept in (ids[0], ids[3]):
        assert verify(store, registry.get(kept).manifest).ok
    referenced = set().union(*(registry.objects_of(i) for i in (ids[0], ids[3])))
    assert stored_objects(store) == referenced
    assert orphan not in stored_manifests(store)
    assert orphan_objects and not orphan_objects & stored_objects(store)
    registry.close()


def read_objects(store: object, manifest_id: str) -> list[str]:
    from tlreg.ckpt import read_manifest

    return list(read_manifest(store, manifest_id).objects)  # type: ignore[arg-type]


def test_orphans_younger_than_the_grace_period_are_kept(tlreg: Callable, home: Path) -> None:
    tlreg("init")
    store = open_store(str(home / "store"))
    with AsyncCheckpointer(store) as engine:
        orphan = engine.save({"w": torch.ones(10)}).result()
    result = tlreg("gc", "--grace", "1h")
    assert result.exit_code == 0
    assert "younger than --grace" in result.output
    assert orphan in stored_manifests(store)


def test_upgrade_on_a_current_registry_is_a_no_op(tlreg: Callable) -> None:
    tlreg("init")
    result = tlreg("upgrade")
    assert result.exit_code == 0
    assert result.output.startswith("registry schema is up to date (version ")


def test_bad_grace_durations_are_refused(tlreg: Callable) -> None:
    tlreg("init")
    result = tlreg("gc", "--grace", "soon")
    assert result.exit_code == 2
    assert "'soon' is not a duration like 90s, 15m, 24h or 7d" in result.output
