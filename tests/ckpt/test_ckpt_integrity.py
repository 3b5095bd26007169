"""Damaged or missing data is refused on load and reported by verify()."""

from __future__ import annotations

import pytest
import torch

from tlreg.ckpt import CorruptCheckpoint, verify
from tlreg.ckpt.objects import chunk_key, meta_key


def _flip_byte(store, key: str, at: int) -> None:
    path = store.local_path(key)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


@pytest.fixture
def saved(ckpt, model_factory):
    state = {"model": model_factory().state_dict(), "step": torch.tensor(5)}
    return ckpt, ckpt.manifest(ckpt.save(state).result())


def test_a_flipped_byte_makes_load_name_the_tensor_and_verify_report_it(saved):
    ckpt, manifest = saved
    assert verify(ckpt.store, manifest.id).ok
    entry = manifest.tensors["model/1.weight"]
    _flip_byte(ckpt.store, chunk_key(entry.object, 0), entry.offset + 5)

    with pytest.raises(CorruptCheckpoint, match=r"tensor 'model/1.weight'.*does not match"):
        ckpt.load(manifest.id)
    ckpt.load(manifest.id, prefix="step")  # undamaged tensors still load on their own
    report = verify(ckpt.store, manifest.id)

    assert not report.ok
    assert report.damaged_tensors == ["model/1.weight"]
    assert report.damaged_objects == [entry.object]
    assert report.missing_objects == [] and report.missing_tensors == []
    assert report.problems == [f"damaged object {entry.object}", "damaged tensor model/1.weight"]
    assert report.to_json()["damaged_tensors"] == ["model/1.weight"]
    assert report.to_json()["ok"] is False


def test_a_missing_object_makes_load_and_verify_name_it(saved):
    ckpt, manifest = saved
    entry = manifest.tensors["model/0.bias"]
    ckpt.store.delete(meta_key(entry.object))

    with pytest.raises(
        CorruptCheckpoint, match=f"'model/0.weight' and 6 more.*{entry.object}.*missing"
    ):
        ckpt.load(manifest.id)
    report = verify(ckpt.store, manifest.id)

    assert report.missing_objects == [entry.object]
    assert "model/0.bias" in report.missing_tensors and not report.ok


def test_a_truncated_chunk_is_reported(saved):
    ckpt, manifest = saved
    (digest,) = manifest.objects
    path = ckpt.store.local_path(chunk_key(digest, 0))
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        ckpt.load(manifest.id)
    report = verify(ckpt.store, manifest.id)
    assert report.damaged_objects == [digest] and "model/3.bias" in report.damaged_tensors
