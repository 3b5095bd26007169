"""``tlreg verify --all`` and ``--quick``: every kept checkpoint, every object once, on
SQLite and PostgreSQL; damage in a checkpoint nobody restores is named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.ckpt.objects import chunk_key, read_layout
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 64, bias=False)
        self.register_buffer("rng", torch.arange(256, dtype=torch.float32))


def save_four(home: Path, registry_url: str) -> list[str]:
    model = Model()
    registry = Registry(registry_url)
    registry.create_branch("b")
    ids = []
    with Checkpointer("b", registry=registry, store=str(home / "store")) as ckpt:
        for step in range(1, 5):
            with torch.no_grad():
                model.fc.weight.add_(1.0)
            ids.append(ckpt.save(step, model=model).result())
    registry.close()
    return ids


def flip_byte(home: Path, manifest_id: str, path: str) -> None:
    store = open_store(str(home / "store"))
    entry = read_manifest(store, manifest_id).tensors[path]
    layout = read_layout(store, entry.object)
    index, offset = divmod(entry.offset + 3, layout.chunk)
    chunk = home / "store" / chunk_key(entry.object, index)
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0x10
    chunk.write_bytes(bytes(data))


def test_verify_all_names_a_flipped_byte_in_a_checkpoint_that_is_not_the_head(
    tlreg: Callable, home: Path, registry_url: str
) -> None:
    tlreg("init")
    ids = save_four(home, registry_url)
    ok = tlreg("verify", "--all", "--json")
    assert ok.exit_code == 0, ok.output
    clean = json.loads(ok.output)
    assert (clean["ok"], clean["checkpoints"], clean["broken"], clean["orphans"]) == (
        True,
        4,
        {},
        [],
    )
    assert clean["checked_bytes"] > 0 and clean["pinned_bytes"] == 0

    flip_byte(home, ids[1], "model/fc.weight")
    result = tlreg("verify", "--all", "--json")
    assert result.exit_code == 1
    found = json.loads(result.output)
    assert list(found["broken"]) == [ids[1]]
    assert found["broken"][ids[1]]["damaged_tensors"] == ["model/fc.weight"]
    assert found["problems"] == [
        f"checkpoint {ids[1]}: damaged object {found['broken'][ids[1]]['damaged_objects'][0]}",
        f"checkpoint {ids[1]}: damaged tensor model/fc.weight",
    ]
    text = tlreg("verify", "--all")
    assert text.exit_code == 1
    assert f"damaged: checkpoint {ids[1]}: damaged tensor model/fc.weight" in text.output
    assert "damaged: 4 checkpoints" in text.output
    # the head alone still verifies; quick mode reads no bytes, so it cannot see a flip
    assert tlreg("verify", "b").exit_code == 0
    quick = tlreg("verify", "--all", "--quick", "--json")
    assert quick.exit_code == 0 and json.loads(quick.output)["checked_bytes"] == 0


def test_verify_quick_finds_a_lost_chunk_and_reports_orphans_and_pinned_bytes(
    tlreg: Callable, home: Path, registry_url: str
) -> None:
    tlreg("init")
    ids = save_four(home, registry_url)
    store = open_store(str(home / "store"))
    with AsyncCheckpointer(store) as engine:  # a save that crashed before its commit
        orphan = engine.save({"w": torch.full((100,), 3.0)}).result()
    orphan_objects = sorted(read_manifest(store, orphan).objects)
    gc = tlreg("gc", "--keep-last", "1", "--grace", "1h", "--max-unused", "100%")
    assert gc.exit_code == 0, gc.output
    report = json.loads(tlreg("verify", "--all", "--quick", "--json").output)
    assert report["ok"] and report["checkpoints"] == 1 and report["orphans"] == orphan_objects
    # the head uses the buffer and the RNG state of the first pack: its weight is pinned
    first = read_manifest(store, ids[0]).tensors["model/rng"].object
    assert report["pinned_bytes"] == 64 * 64 * 4
    assert read_layout(store, first).nbytes == 64 * 64 * 4 + 1024 + 5056

    weight = read_manifest(store, ids[3]).tensors["model/fc.weight"].object
    (home / "store" / chunk_key(weight, 0)).unlink()
    lost = tlreg("verify", "--all", "--quick", "--json")
    assert lost.exit_code == 1
    assert json.loads(lost.output)["broken"][ids[3]]["damaged_objects"] == [weight]


def test_verify_all_and_verify_ref_follow_a_repack(
    tlreg: Callable, home: Path, registry_url: str
) -> None:
    tlreg("init")
    ids = save_four(home, registry_url)
    registry = Registry(registry_url)
    registry.tag(ids[1], "keep")
    registry.close()
    gc = tlreg("gc", "--keep-last", "1", "--grace", "0s")
    assert gc.exit_code == 0, gc.output
    assert "mostly-unused objects" in gc.output
    for ref in ("b", "keep"):
        one = tlreg("verify", ref)
        assert one.exit_code == 0, one.output
    report = json.loads(tlreg("verify", "--all", "--json").output)
    assert report["ok"] and report["checkpoints"] == 2 and report["pinned_bytes"] == 0


def test_verify_needs_a_ref_or_all(tlreg: Callable) -> None:
    tlreg("init")
    assert tlreg("verify").exit_code == 2
    both = tlreg("verify", "b", "--all")
    assert both.exit_code == 2 and "exclude each other" in both.output
