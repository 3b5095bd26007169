"""Nothing read from a store or a user's file is ever unpickled.

Statically: no tlreg module imports a pickle-family module (one reviewed exception), and every
``torch.load`` passes ``weights_only=True``. Dynamically: every read path — the CLI's show,
log, lineage, diff, verify and export, a restore, ``AsyncCheckpointer.load`` and the zarr
view — runs with unpickling made impossible. And a ``.pt`` file whose pickle would run code
is refused on import without running it.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tlreg.ckpt
from tlreg.ckpt import AsyncCheckpointer, open_checkpoint
from tlreg.registry import Registry
from tlreg.storage_backends import LocalStore
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower

PACKAGES = ("ckpt", "registry", "storage_backends", "training", "cli")
PICKLE_FAMILY = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}
REVIEWED: dict[str, str] = {}
"""Package modules allowed a pickle-family import, with the reason (none: the store pickling
conformance tests live in tests/storage/store_pickling.py)."""


def _sources() -> Iterator[tuple[str, ast.Module]]:
    root = Path(tlreg.ckpt.__file__).resolve().parent.parent  # the repository (package-dir map)
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            yield str(path.relative_to(root)), ast.parse(path.read_text(), str(path))


def test_no_module_imports_a_pickle_family_module_and_torch_load_is_weights_only() -> None:
    offenders, loads = [], 0
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {(node.module or "").split(".")[0]}
            else:
                modules = set()
            if modules & PICKLE_FAMILY and name not in REVIEWED:
                offenders.append(f"{name}:{node.lineno} imports {sorted(modules)}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                loads += 1
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    offenders.append(f"{name}:{node.lineno} torch.load without weights_only=True")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                offenders.append(f"{name}:{node.lineno} allow_pickle")
    assert offenders == []
    assert loads >= 1  # the scan does see the weights importer's torch.load


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Make every unpickling entry point raise; returns how many times one was attempted."""
    attempts = 0

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        raise AssertionError("unpickling attempted on a read path")

    class Refused(pickle.Unpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", refuse)
    return lambda: attempts


def test_every_read_path_works_with_unpickling_impossible(
    tlreg: Callable, weights_file: Path, home: Path, registry_url: str, no_unpickling: Callable
) -> None:
    tlreg("init")
    base = json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)
    tlreg("branch", "next", "base")
    model = lower.build_model(1)
    store = LocalStore(home / "store")
    with (
        Registry(registry_url) as registry,
        Checkpointer("next", registry=registry, store=store) as ckpt,
    ):
        ckpt.save(1, model=model).result()
        fresh = lower.build_model(2)
        ckpt.restore(model=fresh)
        assert all(
            torch.equal(a, b)
            for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
        )
        manifest = registry.resolve("next").manifest
    for args in (
        ("show", "next"),
        ("log", "next"),
        ("lineage", "base"),
        ("diff", "base", "next"),
        ("verify", "next"),
        ("export", "next", str(home / "out.safetensors")),
    ):
        result = tlreg(*args)
        assert result.exit_code == 0, (args, result.output)
    with AsyncCheckpointer(store) as engine:
        state = engine.load(manifest)
    weight = "features.1.weight"
    assert torch.equal(state["model"][weight], model.state_dict()[weight])
    array = open_checkpoint(store, manifest)[f"model/{weight}"]
    assert torch.equal(torch.from_numpy(array[...]), model.state_dict()[weight])
    assert base["id"] != manifest
    assert no_unpickling() == 0


def _evil_torch_file(path: Path, marker: Path) -> None:
    """A torch zip file whose data.pkl calls ``builtins.exec`` when unpickled."""
    payload = f"open({str(marker)!r}, 'w').write('pwned')"

    class Exec:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (payload,))

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(Exec(), protocol=2)
            dst.writestr(item, data)


def test_a_torch_file_that_would_run_code_is_refused_without_running_it(
    tlreg: Callable, tmp_path: Path, snapshot: Callable
) -> None:
    tlreg("init")
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _evil_torch_file(evil, marker)
    before = snapshot()
    result = tlreg("import", str(evil), "--name", "evil")
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    assert result.output.count("\n") == 1 and "evil.pt" in result.output
    assert not marker.exists()
    assert snapshot() == before
