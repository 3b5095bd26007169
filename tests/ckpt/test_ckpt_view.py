"""The virtual Zarr view: a checkpoint opens with plain zarr-python, read-only, bit-exact."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from tlreg.ckpt import AsyncCheckpointer, CheckpointNotFound
from tlreg.ckpt.dtypes import DTYPES
from tlreg.ckpt.view import CheckpointStore, ReadOnlyView, open_checkpoint
from tlreg.storage_backends import LocalStore


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = OrderedDict(
        [
            ("features.0.weight", torch.randn(16, 3, 3, 3)),
            ("features.0.bias", torch.randn(16)),
            ("features.1.weight", torch.randn(16).to(torch.bfloat16)),
            ("head.weight", torch.randn(10, 16, dtype=torch.float64)),
            ("head.scale", torch.tensor(0.5, dtype=torch.float16)),  # 0-d
            ("head.mask", torch.rand(10) > 0.5),
            ("head.index", torch.arange(-5, 5, dtype=torch.int64)),
            ("head.code", torch.randint(0, 255, (3, 4), dtype=torch.uint8)),
            ("head.phase", torch.randn(4, dtype=torch.complex64)),
            ("head.fp8", torch.randn(12).to(torch.float8_e4m3fn)),
            ("head.empty", torch.empty(0, 7)),
            # 17 MiB: an object of its own, over two object chunks
            ("embed.weight", torch.randn(4352, 1024)),
        ]
    )
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 3, 3, 3)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
    }
    return {"model": model, "optimizer": optimizer, "step": 3}


def _flat(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat = {f"model/{k}": v for k, v in state["model"].items()}
    for index, slots in state["optimizer"]["state"].items():
        flat |= {f"optimizer/state/{index}/{k}": v for k, v in slots.items()}
    return flat


def _as_torch(array: zarr.Array, data: np.ndarray) -> torch.Tensor:
    """The zarr data as the tensor it stands for (raw bits viewed as the torch dtype)."""
    dtype = DTYPES[array.attrs["tlreg"]["torch_dtype"]]
    tensor = torch.from_numpy(np.array(data, copy=True))
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def saved(store) -> tuple[LocalStore, str, dict[str, Any]]:
    state = _state()
    with AsyncCheckpointer(store) as ckpt:
        manifest_id = ckpt.save(state, step=3, metadata={"run": "view"}).result()
        manifest = ckpt.manifest(manifest_id)
    big = manifest.tensors["model/embed.weight"]
    small = manifest.tensors["model/head.weight"]
    assert big.offset == 0 and manifest.objects[big.object] == big.nbytes  # solo object
    assert manifest.objects[small.object] > small.nbytes  # packed with others
    return store, manifest_id, state


def test_every_tensor_reads_back_bit_exactly_through_zarr_open_group(saved):
    store, manifest_id, state = saved
    group = zarr.open_group(CheckpointStore(store, manifest_id), mode="r")

    for path, tensor in _flat(state).items():
        array = group[path]
        assert isinstance(array, zarr.Array), path
        assert array.shape == tuple(tensor.shape), path
        assert array.attrs["tlreg"]["torch_dtype"] == str(tensor.dtype).removeprefix("torch.")
        restored = _as_torch(array, array[...])
        assert restored.dtype == tensor.dtype and restored.shape == tensor.shape, path
        assert _bits(restored) == _bits(tensor), f"{path}: bytes differ"


def test_dtypes_numpy_has_are_kept_and_the_others_are_raw_unsigned_bits(saved):
    store, manifest_id, _ = saved
    group = open_checkpoint(store, manifest_id)
    assert group["model/features.0.weight"].dtype == np.float32
    assert group["model/head.mask"].dtype == np.bool_
    assert group["model/head.phase"].dtype == np.complex64
    assert group["model/features.1.weight"].dtype == np.uint16  # bfloat16
    assert group["model/head.fp8"].dtype == np.uint8  # float8_e4m3fn
    assert group["model/head.scale"].shape == ()


def test_listing_the_group_shows_exactly_the_state_paths(saved):
    store, manifest_id, state = saved
    group = open_checkpoint(store, manifest_id)

    arrays = {name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
    groups = {name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Group)}

    assert arrays == set(_flat(state))
    assert groups == {"model", "optimizer", "optimizer/state", "optimizer/state/0"}
    assert sorted(group["model"].array_keys()) == sorted(state["model"])
    assert group.attrs["tlreg"]["manifest"] == manifest_id
    assert group.attrs["tlreg"]["step"] == 3
    assert group.attrs["tlreg"]["metadata"] == {"run": "view"}
    assert group.attrs["tlreg"]["omitted"] == {}


class CountingStore(LocalStore):
    """A local store that counts the bytes read from it."""

    bytes_read = 0

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = super().get_range(key, start, length)
        self.bytes_read += len(data)
        return data

    def get_into(self, key: str, out: memoryview, start: int = 0) -> None:
        super().get_into(key, out, start)
        self.bytes_read += len(out)


def test_a_slice_reads_only_the_chunks_it_touches_and_equals_numpy(saved, tmp_path):
    _, manifest_id, state = saved
    counting = CountingStore(str(tmp_path / "store"))
    chunk_bytes = 64 << 10
    group = open_checkpoint(counting, manifest_id, chunk_bytes=chunk_bytes)
    weight = state["model"]["embed.weight"].numpy()
    array = group["model/embed.weight"]
    assert array.chunks == (16, 1024)  # 16 rows of 4 KiB

    part = array[100:140, 7:300:5]

    assert np.array_equal(part, weight[100:140, 7:300:5])
    assert counting.bytes_read <= 4 * chunk_bytes  # rows 96..143: 3 chunks, not 17 MiB
    counting.bytes_read = 0
    assert np.array_equal(array[-1], weight[-1])
    assert np.array_equal(array[4351:, -3:], weight[4351:, -3:])
    assert counting.bytes_read <= 2 * chunk_bytes


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 4096, 1 << 20])
def test_any_chunk_size_gives_the_same_arrays_including_partial_last_chunks(saved, chunk_bytes):
    store, manifest_id, state = saved
    group = open_checkpoint(store, manifest_id, chunk_bytes=chunk_bytes)
    for path in ("model/features.0.weight", "optimizer/state/0/exp_avg", "model/head.code"):
        expected = _flat(state)[path].numpy()
        array = group[path]
        assert all(c <= s for c, s in zip(array.chunks, expected.shape, strict=True))
        assert np.array_equal(array[...], expected), (path, array.chunks)
        assert np.array_equal(array[1:, ::2], expected[1:, ::2]), (path, array.chunks)


def test_writes_and_deletes_are_refused(saved):
    store, manifest_id, state = saved
    before = sorted(store.list(""))
    view = CheckpointStore(store, manifest_id)
    group = zarr.open_group(view, mode="r")

    with pytest.raises((ReadOnlyView, ValueError)):
        group["model/head.weight"][0, 0] = 1.0
    with pytest.raises((ReadOnlyView, ValueError)):
        group.create_array("new", shape=(2,), dtype="float32")
    with pytest.raises(ValueError, match="read-only"):  # zarr's own check of store.read_only
        zarr.open_group(view, mode="a")
    with pytest.raises(ReadOnlyView):
        view.with_read_only(False)
    with pytest.raises(PermissionError):
        zarr.core.sync.sync(view.delete("model/head.weight/zarr.json"))

    assert sorted(store.list("")) == before
    assert np.array_equal(group["model/head.weight"][...], state["model"]["head.weight"].numpy())


def test_paths_that_cannot_be_zarr_nodes_are_listed_as_omitted(store):
    state = {"a": torch.ones(2), "a/b": torch.zeros(3), "x": {"__meta": torch.ones(1)}}
    with AsyncCheckpointer(store) as ckpt:
        manifest_id = ckpt.save(state).result()

    group = open_checkpoint(store, manifest_id)

    omitted = group.attrs["tlreg"]["omitted"]
    assert set(omitted) == {"a", "x/__meta"}
    assert np.array_equal(group["a/b"][...], np.zeros(3, dtype=np.float32))


def test_a_deduplicated_second_checkpoint_reads_tensors_from_the_first_ones_objects(store):
    state = {"frozen": torch.randn(300, 20), "head": torch.randn(20)}
    with AsyncCheckpointer(store) as ckpt:
        ckpt.save(state).result()
        state["head"] += 1
        second = ckpt.save(state).result()

    group = open_checkpoint(store, second)
    assert np.array_equal(group["frozen"][...], state["frozen"].numpy())
    assert np.array_equal(group["head"][...], state["head"].numpy())


def test_the_view_store_pickles_and_an_unknown_manifest_is_not_found(saved):
    store, manifest_id, state = saved
    view = pickle.loads(pickle.dumps(CheckpointStore(store, manifest_id)))
    assert view == CheckpointStore(store, manifest_id)
    array = zarr.open_array(view, path="model/head.index", mode="r")
    assert np.array_equal(array[...], state["model"]["head.index"].numpy())
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(store, "0" * 32)


def test_a_sharded_tensor_reads_as_one_global_array_assembled_from_its_shards(store):
    from dataclasses import replace

    from tlreg.ckpt.manifest import (
        ShardEntry,
        TensorEntry,
        new_manifest_id,
        read_manifest,
        shards_digest,
        write_manifest,
    )

    g = torch.arange(7 * 9, dtype=torch.float32).reshape(7, 9)
    blocks = {"b0": ((0, 0), g[:3, :5]), "b1": ((0, 5), g[:3, 5:]), "b2": ((3, 0), g[3:])}
    with AsyncCheckpointer(store) as ckpt:
        saved = read_manifest(
            store, ckpt.save({k: b.clone() for k, (_, b) in blocks.items()}).result()
        )
    shards = tuple(
        ShardEntry(o, tuple(b.shape), (e := saved.tensors[k]).object, e.offset, e.nbytes, e.hash)
        for k, (o, b) in blocks.items()
    )
    entry = TensorEntry("", 0, g.nbytes, "float32", (7, 9), shards_digest(shards), shards)
    manifest = replace(
        saved, id=new_manifest_id(), tensors={"w": entry}, tree={"w": {"$tensor": "w"}}, version=2
    )
    write_manifest(store, manifest)

    for chunk_bytes in (1 << 20, 20, 4):
        array = open_checkpoint(store, manifest.id, chunk_bytes=chunk_bytes)["w"]
        assert np.array_equal(array[...], g.numpy()), array.chunks
        assert np.array_equal(array[2:5, 3:7], g.numpy()[2:5, 3:7])
