"""The whole path through the real CLI: init -> import -> branch -> train on Ray -> lineage
-> export, on PostgreSQL: the other tests of tests/e2e train on Ray with SQLite, and the
registry's own tests run every query on both backends, so a SQLite copy of this test (two
more Ray training runs) would prove nothing new."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlreg.ckpt import AsyncCheckpointer, read_manifest
from tlreg.storage_backends import open_store
from tlreg.training.examples.digits import lower

UPPER = "tlreg.training.examples.digits:upper"

pytestmark = pytest.mark.slow


@pytest.mark.postgres
@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_branch_train_on_ray_then_resume_keeps_exact_lineage_and_frozen_weights(
    tmp_path: Path, make_cluster_shell: Callable[..., Any], registry_url: str
) -> None:
    shell = make_cluster_shell(registry_url)
    tlreg = shell.tlreg

    weights = tmp_path / "ancestor.safetensors"
    ancestor = {k: v.contiguous() for k, v in lower.build_model(3).state_dict().items()}
    save_file(ancestor, str(weights))
    tlreg("init")
    root = json.loads(tlreg("import", str(weights), "--name", "base", "--json"))
    tlreg("branch", "upper-head", "base", "--task", UPPER)

    def train(steps: int) -> dict:
        """Feature extraction on 2 Ray workers: only the head trains."""
        args = f"train upper-head --workers 2 --steps {steps} --checkpoint-every 10"
        return json.loads(shell.run(*args.split(), "--freeze", "features.*", "--json"))

    summary = train(20)
    assert summary["status"] == "succeeded"
    assert summary["transferred_from"] == root["id"]
    assert sorted(summary["frozen"]) == sorted(k for k in ancestor if k.startswith("features."))
    assert sorted(summary["skipped"]) == ["head.bias", "head.weight"]
    assert [c["step"] for c in summary["checkpoints"]] == [10, 20]

    # Resume: a second run continues from the head at step 20.
    resumed = train(30)
    assert resumed["resumed_from"] == summary["checkpoints"][-1]["id"]
    assert [c["step"] for c in resumed["checkpoints"]] == [30]

    runs = json.loads(tlreg("runs", "upper-head", "--json"))
    assert [(r["id"], r["status"], r["config"]["steps"]) for r in runs] == [
        (summary["run_id"], "succeeded", 20),
        (resumed["run_id"], "succeeded", 30),
    ]
    assert [(r["steps"], r["checkpoints"], r["kept"]) for r in runs] == [(20, 2, 2), (30, 1, 1)]
    # Every evaluation of both runs is stored: the branch's curve is the two runs joined.
    [curve] = json.loads(tlreg("compare", "upper-head", "-m", "val_accuracy", "--json"))["rows"]
    evals = summary["evals"] + resumed["evals"]
    assert (curve["evaluations"], curve["final_step"]) == (len(evals), 30)
    assert curve["final"] == pytest.approx(evals[-1]["metric"])
    log = json.loads(tlreg("log", "upper-head", "--json"))
    assert [(c["branch"], c["step"]) for c in log] == [
        ("upper-head", 30),
        ("upper-head", 20),
        ("upper-head", 10),
        ("base", 0),
    ]
    ids = [c["id"] for c in log]
    assert [c["parents"] for c in log] == [[ids[1]], [ids[2]], [ids[3]], []]
    assert all("val_accuracy" in c["metrics"] for c in log[:3])

    lineage = json.loads(tlreg("lineage", "base", "--json"))
    assert lineage["edges"] == sorted([[ids[3], ids[2]], [ids[2], ids[1]], [ids[1], ids[0]]])
    tree = tlreg("lineage", "base").splitlines()
    # The branch hangs under its branch point; its chain continues straight down.
    assert [line[: 3 + 12] for line in tree] == [
        ids[3][:12] + "  b",
        "└─ " + ids[2][:12],
        "   " + ids[1][:12],
        "   " + ids[0][:12],
    ]
    assert tree[0].endswith("<-") and "upper-head@30" in tree[3]

    # Frozen features are bit-identical to the ancestor and cost zero new bytes.
    out = tmp_path / "head.safetensors"
    tlreg("export", "upper-head", str(out))
    exported = load_file(str(out))
    for name, tensor in ancestor.items():
        if name.startswith("features."):
            assert torch.equal(exported[name].view(torch.int32), tensor.view(torch.int32)), name
    assert not torch.equal(exported["head.weight"], ancestor["head.weight"])
    store = open_store(shell.store_url)
    root_objects = set(read_manifest(store, root["manifest"]).objects)
    for c in log[:3]:
        manifest = read_manifest(store, c["manifest"])
        for path, entry in manifest.tensors.items():
            if path.startswith("model/features."):
                assert entry.object in root_objects, path
    # What export wrote is exactly what the head checkpoint stores.
    stored = AsyncCheckpointer(store).load(log[0]["manifest"], prefix="model")["model"]
    assert stored.keys() == exported.keys()
    for name, tensor in stored.items():
        assert torch.equal(tensor.view(torch.int32), exported[name].view(torch.int32)), name
