"""Partial transfer on Ray: a 10-class model branches from the stored 5-class model that
shares the most layers, and trains with exactly those layers transferred and frozen."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower

pytestmark = pytest.mark.slow


def test_best_for_branch_trains_a_new_architecture_with_the_matching_layers_frozen(
    tmp_path: Path,
    make_cluster_shell: Callable[..., Any],
) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store_url = str(tmp_path / "store")
    shell = make_cluster_shell(registry_url, store_url)
    shell.tlreg("init")
    registry = Registry(registry_url)
    registry.create_branch("lower", task="tlreg.training.examples.digits:lower")
    ancestor = lower.build_model(0)
    with Checkpointer("lower", registry=registry, store=store_url) as ckpt:
        ancestor_id = ckpt.save(10, model=ancestor, metrics={"val_accuracy": 0.9}).result()

    every = "tlreg.training.examples.digits:every"
    assert "shares 2 of 3 layers" in shell.tlreg("branch", "all", "--best-for", every)
    out = shell.run(
        "train",
        "all",
        "--workers",
        "2",
        "--steps",
        "10",
        "--checkpoint-every",
        "5",
        "--freeze",
        "features.*",
        "--json",
    )
    summary = json.loads(out)
    features = sorted(k for k in ancestor.state_dict() if k.startswith("features."))
    assert summary["transferred_from"] == ancestor_id
    assert summary["matched_layers"] == 2
    assert sorted(summary["transferred"]) == features
    assert sorted(summary["skipped"]) == ["head.bias", "head.weight"]

    log = registry.log("all")
    assert [(r.branch, r.step) for r in log] == [("all", 10), ("all", 5), ("lower", 10)]
    store = open_store(store_url)
    head = AsyncCheckpointer(store).load(log[0].manifest, prefix="model")["model"]
    assert head["head.weight"].shape == (10, 512)
    for name in features:
        assert torch.equal(
            head[name].view(torch.int32), ancestor.state_dict()[name].view(torch.int32)
        )
    ancestor_objects = set(read_manifest(store, ancestor_id).objects)
    for record in log[:2]:
        manifest = read_manifest(store, record.manifest)
        assert all(manifest.tensors[f"model/{n}"].object in ancestor_objects for n in features)
    registry.close()
