"""Sharded tensors in one process: the manifest format, validation, block reads, partition."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, CorruptCheckpoint, Shard, shards, verify
from tlreg.ckpt.manifest import Manifest, manifest_key
from tlreg.ckpt.objects import chunk_key
from tlreg.ckpt.shards import Box, check_cover, intersect, partition, volume


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


def _tiles_pairwise(boxes: list[Box], shape: tuple[int, ...]) -> bool:
    """The definition of a tiling, checked the slow way: every pair of blocks compared."""
    if sum(volume(b[1]) for b in boxes) != volume(shape):
        return False
    for i, a in enumerate(boxes):
        if any(o + n > g for o, n, g in zip(a[0], a[1], shape, strict=True)):
            return False
        for b in boxes[:i]:
            overlap = intersect(a, b)
            if overlap is not None and volume(overlap[1]):
                return False
    return True


@st.composite
def _blocks(draw: st.DrawFn) -> tuple[list[Box], tuple[int, ...]]:
    """A grid tiling of a random 1- to 3-d shape (cut points per dimension), then sometimes
    one block moved, grown, shrunk, repeated or dropped."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    cuts = [
        sorted(draw(st.sets(st.integers(1, max(1, g - 1)), max_size=3)) | {0, g}) for g in shape
    ]
    boxes: list[Box] = []
    for cell in itertools.product(*[range(len(c) - 1) for c in cuts]):
        offsets = tuple(cuts[d][k] for d, k in enumerate(cell))
        sizes = tuple(cuts[d][k + 1] - cuts[d][k] for d, k in enumerate(cell))
        boxes.append((offsets, sizes))
    change = draw(st.sampled_from(["none", "move", "grow", "shrink", "repeat", "drop"]))
    i = draw(st.integers(0, len(boxes) - 1))
    d = draw(st.integers(0, ndim - 1))
    offsets, sizes = list(boxes[i][0]), list(boxes[i][1])
    if change == "move":
        offsets[d] = max(0, offsets[d] + draw(st.sampled_from([-1, 1])))
    elif change == "grow":
        sizes[d] += 1
    elif change == "shrink":
        sizes[d] -= 1
    if change == "repeat":
        boxes.append(boxes[i])
    elif change == "drop":
        del boxes[i]
    else:
        boxes[i] = (tuple(offsets), tuple(sizes))
    return draw(st.permutations(boxes)), shape


@settings(max_examples=300, deadline=None)
@given(_blocks())
def test_check_cover_accepts_exactly_the_tilings_the_pairwise_definition_accepts(case):
    boxes, shape = case
    try:
        check_cover(boxes, shape, "t")
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == _tiles_pairwise(boxes, shape)


def test_check_cover_of_a_thousand_row_blocks_compares_no_two_blocks():
    """1,000 ranks' blocks of one tensor: the sweep's comparisons grow linearly, not as n^2."""
    calls = 0
    real = shards.intersect

    def counting(a: Box, b: Box) -> Box | None:
        nonlocal calls
        calls += 1
        return real(a, b)

    boxes = [((k * 4, 0), (4, 8)) for k in range(1000)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "intersect", counting)
        check_cover(boxes[::-1], (4000, 8), "t")
    assert calls == 0  # row blocks are closed before the next one opens: nothing to compare
