"""Architecture signatures, the best stored ancestor, and partial transfer into a new model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.training import Checkpointer, signature
from tlreg.training.examples.digits import DigitsTask, every, lower
from tlreg.training.signature import prefix_tensor_names

narrow = DigitsTask(name="narrow", classes=lower.classes, channels=8)


def test_signature_has_one_entry_per_layer_and_ignores_values() -> None:
    a, b = lower.build_model(0), lower.build_model(1)
    assert len(signature(a)) == 3  # two convolutions and the head
    assert signature(a) == signature(b)
    assert signature(every.build_model(0))[:2] == signature(a)[:2]
    assert signature(every.build_model(0))[2] != signature(a)[2]
    assert signature(narrow.build_model(0))[0] != signature(a)[0]
    assert prefix_tensor_names(a, 2) == {
        "features.1.weight",
        "features.1.bias",
        "features.3.weight",
        "features.3.bias",
    }


def _commit(registry: Registry, store: str, branch: str, model: torch.nn.Module, acc: float) -> str:
    registry.create_branch(branch)
    with Checkpointer(branch, registry=registry, store=store) as ckpt:
        return ckpt.save(1, model=model, metrics={"val_accuracy": acc}).result()


def test_best_for_branches_from_the_longest_matching_architecture_and_transfers_exactly_it(
    registry: Registry, registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "store")
    ancestor = lower.build_model(0)
    best = _commit(registry, store, "lower", ancestor, 0.9)
    _commit(registry, store, "lower-worse", lower.build_model(2), 0.5)
    _commit(registry, store, "narrow", narrow.build_model(0), 0.99)

    monkeypatch.setenv("TLREG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TLREG_REGISTRY_URL", registry_url)
    monkeypatch.setenv("TLREG_STORE_URL", store)
    invoke: Callable = CliRunner().invoke
    result = invoke(cli, ["branch", "all", "--best-for", "tlreg.training.examples.digits:every"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        f"best ancestor {best[:12]} (lower@1) shares 2 of 3 layers"
    )
    branch = registry.get_branch("all")
    assert branch.head == best and branch.task == "tlreg.training.examples.digits:every"

    model = every.build_model(5)
    head_before = model.head.weight.clone()
    with Checkpointer("all", registry=registry, store=store) as ckpt:
        ckpt.restore(model=model)
        report = ckpt.last_restore
    assert report.matched_layers == 2 and not report.resumed
    assert sorted(report.transferred) == sorted(prefix_tensor_names(ancestor, 2))
    assert sorted(report.skipped) == ["head.bias", "head.weight"]
    for name in report.transferred:
        assert torch.equal(model.state_dict()[name], ancestor.state_dict()[name])
    assert torch.equal(model.head.weight, head_before)


def test_diff_lists_exactly_the_tensors_that_changed(
    registry: Registry, registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "store")
    model = lower.build_model(0)
    registry.create_branch("b")
    with Checkpointer("b", registry=registry, store=store) as ckpt:
        first = ckpt.save(1, model=model).result()
        with torch.no_grad():
            model.head.bias.add_(1)
        second = ckpt.save(2, model=model).result()
    monkeypatch.setenv("TLREG_REGISTRY_URL", registry_url)
    monkeypatch.setenv("TLREG_STORE_URL", store)
    monkeypatch.setenv("TLREG_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["diff", first, second, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [(c["path"], c["status"], c["detail"]) for c in doc["changes"]] == [
        ("model/head.bias", "changed", "values")
    ]
    assert doc["unchanged"] == len(model.state_dict()) - 1 + 1  # + the unchanged RNG state
    text = CliRunner().invoke(cli, ["diff", first, second]).output.splitlines()
    assert text[0] == "M model/head.bias  20 B  values"
