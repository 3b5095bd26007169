"""Frozen tensors unchanged since the previous save are neither copied nor read."""

from __future__ import annotations

import torch

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.objects import object_prefix
from tlreg.ckpt.staging import Stager


def _frozen_backbone(model: torch.nn.Module) -> None:
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)


def _train_head(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    opt.step()


def test_second_save_with_a_frozen_backbone_copies_and_writes_no_backbone_bytes(
    ckpt, model_factory, same, monkeypatch
):
    model = model_factory()
    _frozen_backbone(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], fused=True)
    ckpt.attach_model(model)
    first = ckpt.save({"model": model.state_dict()}, step=1)
    first_manifest = ckpt.manifest(first.result())
    assert first.stats.tensors_skipped == 0

    _train_head(model, opt)  # fused Adam: the head changes without bumping _version
    copied: list[torch.Tensor] = []
    original = Stager.copy
    monkeypatch.setattr(
        Stager,
        "copy",
        lambda self, tensors, *a: (copied.extend(tensors), original(self, tensors, *a)),
    )
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    second = ckpt.save(state, step=2)
    second_manifest = ckpt.manifest(second.result())

    backbone = [f"model/{n}" for n in ("0.weight", "0.bias", "1.weight", "1.bias")]
    head = [model[3].weight, model[3].bias]
    optimizer_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values())
    head_bytes = sum(t.nbytes for t in head)
    assert second.stats.tensors_skipped == 4
    assert second.stats.bytes_copied == head_bytes + optimizer_bytes
    assert sum(t.nbytes for t in copied) == head_bytes + optimizer_bytes
    assert not any(t.data_ptr() == model[0].weight.data_ptr() for t in copied)
    for path in backbone:
        assert second_manifest.tensors[path] == first_manifest.tensors[path]
    # only the head and the optimizer state were written: one new pack, none of the backbone
    (new,) = set(second_manifest.objects) - set(first_manifest.objects)
    backbone_objects = {second_manifest.tensors[p].object for p in backbone}
    assert new not in backbone_objects
    assert second.stats.new_bytes == second_manifest.objects[new]
    same(state, ckpt.load(second_manifest.id))


def test_mutating_a_frozen_tensor_in_place_makes_it_saved_again(ckpt, model_factory, same):
    model = model_factory()
    _frozen_backbone(model)
    ckpt.attach_model(model)
    first = ckpt.manifest(ckpt.save({"model": model.state_dict()}).result())
    with torch.no_grad():
        model[0].bias.add_(1.0)  # bumps _version
    pending = ckpt.save({"model": model.state_dict()})
    second = ckpt.manifest(pending.result())
    assert pending.stats.tensors_skipped == 3
    assert pending.stats.bytes_copied == model[0].bias.nbytes + model[3].weight.nbytes + 16
    assert second.tensors["model/0.bias"] != first.tensors["model/0.bias"]
    assert second.tensors["model/0.weight"] == first.tensors["model/0.weight"]
    same({"model": model.state_dict()}, ckpt.load(second.id))


def test_frozen_parameters_given_directly_are_skipped_without_attaching(ckpt, model_factory):
    model = model_factory()
    _frozen_backbone(model)
    ckpt.save({"model": model.state_dict(keep_vars=True)}).result()
    pending = ckpt.save({"model": model.state_dict(keep_vars=True)})
    pending.result()
    # the trainable head requires grad: copied again (and deduplicated by its hash)
    assert (pending.stats.tensors_skipped, pending.stats.tensors_reused) == (4, 2)
    assert pending.stats.new_bytes == 0


def test_trainable_and_unattached_tensors_are_always_copied(ckpt, model_factory):
    model = model_factory()
    ckpt.save({"model": model.state_dict()}).result()  # no model attached: nothing is frozen
    pending = ckpt.save({"model": model.state_dict()})
    pending.result()
    assert pending.stats.tensors_skipped == 0
    assert pending.stats.bytes_copied == sum(p.nbytes for p in model.state_dict().values())


def test_a_skipped_tensor_whose_object_was_deleted_is_written_again(ckpt, model_factory, same):
    model = model_factory()
    _frozen_backbone(model)
    ckpt.attach_model(model)
    first = ckpt.manifest(ckpt.save({"model": model.state_dict()}).result())
    for digest in first.objects:
        for key in list(ckpt.store.list(object_prefix(digest))):
            ckpt.store.delete(key)  # what gc would do
    pending = ckpt.save({"model": model.state_dict()})
    second = ckpt.manifest(pending.result())
    assert pending.stats.new_bytes > 0
    same({"model": model.state_dict()}, ckpt.load(second.id))


def test_skip_unchanged_false_copies_frozen_tensors(store, model_factory):
    model = model_factory()
    _frozen_backbone(model)
    with AsyncCheckpointer(store, skip_unchanged=False) as ckpt:
        ckpt.attach_model(model)
        ckpt.save({"model": model.state_dict()}).result()
        pending = ckpt.save({"model": model.state_dict()})
        pending.result()
    assert pending.stats.tensors_skipped == 0 and pending.stats.tensors_reused == 6
