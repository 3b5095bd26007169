"""load(into=...) reads saved tensors straight into the caller's tensors, as DCP's load does."""

from __future__ import annotations

import pytest
import torch

from tlreg.ckpt import CorruptCheckpoint
from tlreg.ckpt.objects import chunk_key


def _frozen_backbone(model: torch.nn.Module) -> None:
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)


def _trained_state(model_factory, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    model = model_factory(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    model(torch.randn(8, 12)).pow(2).mean().backward()
    opt.step()
    return model, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}


def test_matching_tensors_are_filled_in_place_and_returned_bit_exact(ckpt, model_factory, same):
    _, saved = _trained_state(model_factory, seed=0)
    manifest_id = ckpt.save(saved).result()
    model, into = _trained_state(model_factory, seed=1)  # same shapes, other values
    before = {name: t.data_ptr() for name, t in into["model"].items()}

    loaded = ckpt.load(manifest_id, into=into)

    same(saved, loaded)
    for name, tensor in into["model"].items():
        assert loaded["model"][name] is tensor, name
        assert tensor.data_ptr() == before[name], name
    for index, moments in into["optimizer"]["state"].items():
        assert loaded["optimizer"]["state"][index]["exp_avg"] is moments["exp_avg"]
    # the model itself now holds the checkpoint
    same(saved["model"], model.state_dict())


def test_tensors_that_do_not_fit_load_into_new_tensors_and_leave_the_given_ones_alone(ckpt, same):
    saved = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(4, dtype=torch.float16),
        "t": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "s": torch.arange(3, dtype=torch.float32),
        "absent": torch.ones(2),
    }
    manifest_id = ckpt.save(saved).result()
    into = {
        "w": torch.zeros(4, 3),  # other shape
        "b": torch.zeros(4, dtype=torch.float32),  # other dtype
        "t": torch.zeros(3, 2, dtype=torch.int64).t(),  # right shape, not contiguous
        "s": torch.zeros(3),  # fits
    }
    untouched = {k: v.clone() for k, v in into.items() if k != "s"}

    loaded = ckpt.load(manifest_id, into=into)

    same(saved, loaded)
    assert loaded["s"] is into["s"]
    for name, before in untouched.items():
        assert loaded[name] is not into[name]
        assert torch.equal(into[name], before), name


def test_prefix_and_into_share_the_nesting_above_the_prefix(ckpt, model_factory, same):
    _, saved = _trained_state(model_factory, seed=0)
    manifest_id = ckpt.save(saved).result()
    model, _ = _trained_state(model_factory, seed=1)
    into = {"model": model.state_dict()}

    loaded = ckpt.load(manifest_id, prefix="model", into=into)

    same({"model": saved["model"]}, loaded)
    assert loaded["model"]["0.weight"] is into["model"]["0.weight"]


def test_a_frozen_tensor_loaded_in_place_is_saved_again_not_reused(ckpt, model_factory, same):
    model = model_factory(0)
    _frozen_backbone(model)
    ckpt.attach_model(model)
    other = {"model": model_factory(1).state_dict()}
    other_id = ckpt.save(other).result()
    first = ckpt.save({"model": model.state_dict()}).result()  # what a skip would reuse

    ckpt.load(other_id, into={"model": model.state_dict()})  # the frozen backbone changes
    third = ckpt.save({"model": model.state_dict()})
    manifest = ckpt.manifest(third.result())

    assert third.stats.tensors_skipped == 0
    assert manifest.tensors["model/0.weight"] != ckpt.manifest(first).tensors["model/0.weight"]
    same(other, ckpt.load(manifest.id))


def test_a_damaged_tensor_loaded_in_place_is_refused_and_the_store_is_unchanged(
    ckpt, store, model_factory
):
    _, saved = _trained_state(model_factory, seed=0)
    manifest_id = ckpt.save(saved).result()
    entry = ckpt.manifest(manifest_id).tensors["model/0.weight"]
    key = chunk_key(entry.object, 0)
    data = bytearray(store.get(key))
    data[entry.offset] ^= 0x01
    store.put(key, bytes(data))
    keys = {k: store.get(k) for k in store.list("")}
    _, into = _trained_state(model_factory, seed=1)

    with pytest.raises(CorruptCheckpoint, match=r"tensor 'model/0\.weight' .* is damaged"):
        ckpt.load(manifest_id, into=into)

    assert {k: store.get(k) for k in store.list("")} == keys


def test_a_tensor_under_two_paths_is_filled_once_and_the_other_path_loads_apart(ckpt, same):
    saved = {"embed": torch.arange(8.0), "head": torch.arange(8.0) + 100}  # untied when saved
    manifest_id = ckpt.save(saved).result()
    tied = torch.zeros(8)

    loaded = ckpt.load(manifest_id, into={"embed": tied, "head": tied})

    same(saved, loaded)
    assert loaded["embed"] is tied and loaded["head"] is not tied
