"""The on-disk format: plain Zarr v3 objects, a versioned manifest, clear errors."""

from __future__ import annotations

import json
import os
import pickle

import blake3
import pytest
import torch
import zarr

from tlreg.ckpt import (
    AsyncCheckpointer,
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    Manifest,
    UnsupportedFormat,
    read_manifest,
)
from tlreg.ckpt.dtypes import DTYPES
from tlreg.ckpt.manifest import VERSION, manifest_key, new_manifest_id
from tlreg.ckpt.objects import ObjectLayout, object_prefix


def _from_zarr(store, entry) -> torch.Tensor:
    array = zarr.open_array(store.local_path(object_prefix(entry.object)), mode="r")
    raw = torch.from_numpy(array[entry.offset : entry.offset + entry.nbytes].copy())
    return raw.view(DTYPES[entry.dtype]).reshape(entry.shape)


def test_objects_open_with_plain_zarr_and_slices_equal_the_tensors(ckpt, model_factory, same):
    model = model_factory()
    state = {"model": model.state_dict(), "half": torch.randn(7, 3).to(torch.bfloat16)}
    manifest = ckpt.manifest(ckpt.save(state).result())

    from_zarr = {path: _from_zarr(ckpt.store, e) for path, e in manifest.tensors.items()}

    expected = {f"model/{k}": v for k, v in state["model"].items()} | {"half": state["half"]}
    same(expected, from_zarr)
    for digest, nbytes in manifest.objects.items():
        array = zarr.open_array(ckpt.store.local_path(object_prefix(digest)), mode="r")
        assert array.shape == (nbytes,) and array.dtype == "uint8"
        assert array.compressors == ()


def test_multi_chunk_objects_with_a_partial_last_chunk_read_back_through_zarr(
    store, monkeypatch, same
):
    monkeypatch.setattr("tlreg.ckpt.objects.CHUNK_BYTES", 1000)
    monkeypatch.setattr("tlreg.ckpt.persist.SOLO_BYTES", 3000)
    monkeypatch.setattr("tlreg.ckpt.persist.PACK_BYTES", 2500)
    state = {
        "solo": torch.arange(1201, dtype=torch.int32),  # 4804 bytes: 5 chunks of 961
        "packed": [torch.randn(501), torch.randn(77, dtype=torch.float64), torch.arange(9)],
    }
    with AsyncCheckpointer(store) as ckpt:
        manifest = ckpt.manifest(ckpt.save(state).result())
        same(state, ckpt.load(manifest.id))
    solo = manifest.tensors["solo"]
    assert solo.object == solo.hash and manifest.objects[solo.object] == 4804
    chunk_dir = store.local_path(f"{object_prefix(solo.object)}/c")
    assert sorted(os.listdir(chunk_dir)) == ["0", "1", "2", "3", "4"]
    assert {os.path.getsize(f"{chunk_dir}/{c}") for c in os.listdir(chunk_dir)} == {961}
    for path, entry in manifest.tensors.items():
        got = _from_zarr(store, entry)
        want = state["solo"] if path == "solo" else state["packed"][int(path.split("/")[1])]
        same(want, got)
    # the solo tensor, and two packs of at most 2500 bytes (the first in 3 chunks of 683)
    assert sorted(manifest.objects.values()) == [768, 2048, 4804]


@pytest.mark.parametrize("nbytes", [1, 63, 64, 999, 1000, 1001, 4804, 123_457])
def test_object_layout_pads_the_last_chunk_by_less_than_one_byte_per_chunk(nbytes):
    layout = ObjectLayout.plan(nbytes, target=1000)
    assert layout.chunk <= 1000
    assert 0 <= layout.nchunks * layout.chunk - nbytes < layout.nchunks
    meta = json.loads(layout.zarr_json())
    assert meta["shape"] == [nbytes] and meta["codecs"] == [{"name": "bytes"}]
    assert ObjectLayout.from_zarr_json(layout.zarr_json(), name="x") == layout


def test_manifest_records_shape_dtype_hash_objects_and_aware_utc_time(ckpt):
    manifest_id = ckpt.save({"a": torch.ones(2, 3, dtype=torch.float16)}, step=7).result()
    raw = json.loads(ckpt.store.get(manifest_key(manifest_id)))
    assert (raw["format"], raw["version"], raw["id"], raw["step"]) == (
        "tlreg.manifest",
        1,
        manifest_id,
        7,
    )
    entry = raw["tensors"]["a"]
    assert (entry["dtype"], entry["shape"], entry["nbytes"], entry["offset"]) == (
        "float16",
        [2, 3],
        12,
        0,
    )
    assert raw["objects"] == {entry["object"]: 64}
    manifest = read_manifest(ckpt.store, manifest_id)
    assert manifest.created.utcoffset().total_seconds() == 0
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.logical_bytes == 12


def test_manifest_ids_are_unique_32_hex_and_sort_by_creation():
    ids = [new_manifest_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and ids == sorted(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_manifest_from_a_newer_version_is_refused(ckpt):
    manifest_id = ckpt.save({"a": torch.ones(1)}).result()
    raw = json.loads(ckpt.store.get(manifest_key(manifest_id)))
    raw["version"] = VERSION + 1
    del raw["checksum"]  # a newer tlreg writes an intact file: checksummed as this one does
    raw["checksum"] = blake3.blake3(json.dumps(raw, separators=(",", ":")).encode()).hexdigest()
    ckpt.store.put(manifest_key(manifest_id), json.dumps(raw, separators=(",", ":")).encode())
    with pytest.raises(UnsupportedFormat, match=r"newer tlreg.*upgrade"):
        read_manifest(ckpt.store, manifest_id)
    with AsyncCheckpointer(ckpt.store) as fresh, pytest.raises(UnsupportedFormat):
        fresh.load(manifest_id)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"format": "tlreg.manifest", "version": 1}'],
)
def test_a_malformed_manifest_raises_corrupt_checkpoint_naming_it(store, content):
    manifest_id = new_manifest_id()
    store.put(manifest_key(manifest_id), content)
    with pytest.raises(CorruptCheckpoint, match=f"manifest {manifest_id}"):
        read_manifest(store, manifest_id)


def test_a_missing_manifest_raises_checkpoint_not_found_naming_id_and_store(ckpt):
    missing = new_manifest_id()
    with pytest.raises(CheckpointNotFound, match=f"{missing} in {ckpt.store.url}") as info:
        ckpt.load(missing)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFound, match="not a checkpoint manifest id"):
        ckpt.remember("../etc/passwd")


@pytest.mark.parametrize(
    "cls", [CheckpointError, CheckpointNotFound, CorruptCheckpoint, UnsupportedFormat]
)
def test_errors_pickle_with_their_message(cls):
    error = cls("manifest abc in file:///x is damaged; restore it")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls and str(again) == str(error)
