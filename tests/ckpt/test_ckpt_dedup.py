"""Tensor-level dedup: bytes already in the store are never written again."""

from __future__ import annotations

import torch

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.objects import meta_key, object_prefix
from tlreg.ckpt.staging import align


def _objects_on_disk(store) -> set[str]:
    return {key.split("/")[3] for key in store.list("objects") if key.endswith("zarr.json")}


def test_second_save_with_unchanged_backbone_writes_only_the_changed_tensors(
    ckpt, model_factory, same
):
    model = model_factory()
    first = ckpt.save({"model": model.state_dict()}, step=1)
    first_manifest = ckpt.manifest(first.result())
    with torch.no_grad():  # fine-tune the head only
        model[3].weight.add_(0.5)
        model[3].bias.sub_(0.5)

    second = ckpt.save({"model": model.state_dict()}, step=2)
    second_manifest = ckpt.manifest(second.result())

    head = [model[3].weight, model[3].bias]
    assert second.stats.new_bytes == sum(align(t.nbytes) for t in head) == 256 + 64
    assert second.stats.objects_written == 1
    assert (second.stats.tensors, second.stats.tensors_reused) == (6, 4)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert second_manifest.tensors[f"model/{name}"] == first_manifest.tensors[f"model/{name}"]
    assert (
        second_manifest.tensors["model/3.bias"].object
        != first_manifest.tensors["model/3.bias"].object
    )
    assert len(second_manifest.objects) == 2  # the old pack (backbone) and the new one
    same({"model": model.state_dict()}, ckpt.load(second_manifest.id))

    third = ckpt.save({"model": model.state_dict()}, step=3)
    third.result()
    assert (third.stats.new_bytes, third.stats.objects_written) == (0, 0)


def test_ten_thousand_small_tensors_make_a_handful_of_objects(ckpt, same):
    state = {"model": {f"layer{i}.scale": torch.full((8,), float(i)) for i in range(10_000)}}
    pending = ckpt.save(state)
    manifest = ckpt.manifest(pending.result())
    assert len(manifest.tensors) == 10_000
    assert len(manifest.objects) == 1 == len(_objects_on_disk(ckpt.store))
    assert pending.stats.new_bytes == 10_000 * 64
    same(state, ckpt.load(manifest.id))


def test_remember_lets_a_new_checkpointer_skip_an_earlier_checkpoints_tensors(store, model_factory):
    model = model_factory()
    with AsyncCheckpointer(store) as ckpt:
        base_id = ckpt.save({"model": model.state_dict()}).result()
    with torch.no_grad():
        model[3].bias.fill_(1.0)
    with AsyncCheckpointer(store) as branch:
        branch.remember(base_id)
        pending = branch.save({"model": model.state_dict()})
        pending.result()
    assert pending.stats.new_bytes == align(model[3].bias.nbytes)


def test_loading_seeds_the_dedup_index(store, model_factory):
    with AsyncCheckpointer(store) as ckpt:
        base_id = ckpt.save({"model": model_factory().state_dict()}).result()
    with AsyncCheckpointer(store) as branch:
        state = branch.load(base_id, prefix="model")
        pending = branch.save(state)
        pending.result()
    assert (pending.stats.new_bytes, pending.stats.tensors_reused) == (0, 6)


def test_large_tensors_dedup_by_name_even_without_an_index(store, monkeypatch):
    monkeypatch.setattr("tlreg.ckpt.persist.SOLO_BYTES", 1024)
    big = torch.randn(1000)
    with AsyncCheckpointer(store) as one:
        first = one.save({"w": big})
        first.result()
    with AsyncCheckpointer(store) as other:  # knows nothing about the first save
        second = other.save({"w": big, "again": big.clone()})
        manifest = other.manifest(second.result())
    assert first.stats.new_bytes == 4000 and second.stats.new_bytes == 0
    assert (
        manifest.tensors["w"].object
        == manifest.tensors["again"].object
        == manifest.tensors["w"].hash
    )


def test_an_object_deleted_since_is_written_again(ckpt, same):
    state = {"a": torch.arange(100)}
    first = ckpt.manifest(ckpt.save(state).result())
    (digest,) = first.objects
    for key in list(ckpt.store.list(object_prefix(digest))):
        ckpt.store.delete(key)  # what gc would do once nothing references it
    pending = ckpt.save(state)
    second = ckpt.manifest(pending.result())
    assert pending.stats.new_bytes == 832 and ckpt.store.exists(meta_key(digest))
    same(state, ckpt.load(second.id))
