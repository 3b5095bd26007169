"""Sharded tensors in one process: the manifest format, validation, block reads, partition."""

from __future__ import annotations

import json

import pytest
import torch

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, CorruptCheckpoint, Shard, verify
from tlreg.ckpt.manifest import Manifest, manifest_key
from tlreg.ckpt.objects import chunk_key
from tlreg.ckpt.shards import partition


def _grid() -> torch.Tensor:
    return torch.arange(48, dtype=torch.int32).reshape(6, 8)


def test_shards_that_tile_the_tensor_are_recorded_with_offsets_in_a_version_2_manifest(ckpt, same):
    g = _grid()
    state = {"top": Shard(g[:2], (0, 0), (6, 8)), "whole": Shard(g, (0, 0), (6, 8))}
    with pytest.raises(CheckpointError, match=r"hold 16 of its 48 elements"):
        ckpt.save(state).result()
    assert list(ckpt.store.list("manifests")) == []

    manifest_id = ckpt.save({"whole": Shard(g, (0, 0), (6, 8))}).result()
    raw = json.loads(ckpt.store.get(manifest_key(manifest_id)))
    entry = raw["tensors"]["whole"]
    assert raw["version"] == 2
    assert (entry["shape"], entry["nbytes"], entry["object"]) == ([6, 8], 192, "")
    (shard,) = entry["shards"]
    assert (shard["offsets"], shard["shape"], shard["nbytes"]) == ([0, 0], [6, 8], 192)
    manifest = ckpt.manifest(manifest_id)
    assert Manifest.from_json(manifest.to_json()) == manifest
    same({"whole": g}, ckpt.load(manifest_id))


def test_a_sharded_entry_in_a_version_1_manifest_is_refused(ckpt):
    manifest_id = ckpt.save({"whole": Shard(_grid(), (0, 0), (6, 8))}).result()
    raw = json.loads(ckpt.store.get(manifest_key(manifest_id)))
    raw["version"] = 1
    with pytest.raises(CorruptCheckpoint, match="sharded tensors in a version 1 manifest"):
        Manifest.from_json(raw)


def test_any_block_of_any_tensor_loads_as_a_shard(ckpt, same):
    g = _grid()
    manifest_id = ckpt.save({"plain": g, "sharded": Shard(g, (0, 0), (6, 8))}).result()
    for path in ("plain", "sharded"):
        got = ckpt.load(manifest_id, shards={path: ((1, 3), (4, 2))})[path]
        assert (got.offsets, got.global_shape) == ((1, 3), (6, 8))
        same(g[1:5, 3:5].contiguous(), got.local)
    with pytest.raises(ValueError, match="does not fit in the tensor 'plain'"):
        ckpt.load(manifest_id, shards={"plain": ((5, 0), (2, 8))})
    with pytest.raises(KeyError, match="'nope'"):
        ckpt.load(manifest_id, shards={"nope": ((0, 0), (1, 1))})


def test_verify_names_a_damaged_shard_by_path_and_offsets(ckpt):
    manifest_id = ckpt.save({"w": Shard(_grid(), (0, 0), (6, 8))}).result()
    digest = ckpt.manifest(manifest_id).tensors["w"].shards[0].object
    path = ckpt.store.local_path(chunk_key(digest, 0))
    with open(path, "r+b") as f:
        f.write(b"\xff")
    report = verify(ckpt.store, manifest_id)
    assert report.damaged_tensors == ["w@[0, 0]"]
    with AsyncCheckpointer(ckpt.store) as fresh, pytest.raises(CorruptCheckpoint, match="w@"):
        fresh.load(manifest_id)


@pytest.mark.parametrize(
    ("offsets", "global_shape"), [((0,), (6, 8)), ((5, 0), (6, 8)), ((-1, 0), (6, 8))]
)
def test_a_shard_that_does_not_fit_its_global_shape_is_refused(offsets, global_shape):
    with pytest.raises(ValueError, match=r"offset|does not fit"):
        Shard(_grid()[:2], offsets, global_shape)


def test_partition_balances_bytes_deterministically_whatever_the_input_order():
    sizes = [(f"t{i}", (i % 7 + 1) * 1000) for i in range(40)]
    owner = partition(sizes, 3)
    assert owner == partition(list(reversed(sizes)), 3)
    loads = [sum(n for p, n in sizes if owner[p] == r) for r in range(3)]
    assert max(loads) - min(loads) <= 7000  # within the largest tensor
    assert partition([("a", 0), ("b", 0)], 2) == {"a": 0, "b": 1}
