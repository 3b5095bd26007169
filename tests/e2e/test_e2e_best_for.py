"""Partial transfer on Ray: a 10-class model branches from the stored 5-class model that
shares the most layers, and trains with exactly those layers transferred and frozen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower

pytestmark = pytest.mark.slow


def test_best_for_branch_trains_a_new_architecture_with_the_matching_layers_frozen(
    tmp_path: Path,
) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store_url = str(tmp_path / "store")
    env = {
        **os.environ,
        "TLREG_HOME": str(tmp_path / "home"),
        "TLREG_REGISTRY_URL": registry_url,
        "TLREG_STORE_URL": store_url,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    runner = CliRunner(env={k: v for k, v in env.items() if k.startswith("TLREG")})
    assert runner.invoke(cli, ["init"]).exit_code == 0
    registry = Registry(registry_url)
    registry.create_branch("lower", task="tlreg.training.examples.digits:lower")
    ancestor = lower.build_model(0)
    with Checkpointer("lower", registry=registry, store=store_url) as ckpt:
        ancestor_id = ckpt.save(10, model=ancestor, metrics={"val_accuracy": 0.9}).result()

    result = runner.invoke(
        cli, ["branch", "all", "--best-for", "tlreg.training.examples.digits:every"]
    )
    assert result.exit_code == 0, result.output
    assert "shares 2 of 3 layers" in result.output

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlreg.cli",
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
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
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
