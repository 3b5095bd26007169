"""CLI test harness: an isolated tlreg home per test, driven through click's CliRunner; the
fixtures are imported by the conftest of each folder whose tests drive the CLI."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.training.examples.digits import lower

Invoke = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path, registry_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tlreg home whose registry is the parametrized backend (SQLite or PostgreSQL)."""
    home = tmp_path / "home"
    for var in ("TLREG_HOME", "TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TLREG_HOME", str(home))
    monkeypatch.setenv("TLREG_REGISTRY_URL", registry_url)
    return home


@pytest.fixture
def tlreg(home: Path) -> Invoke:
    """Run ``tlreg ARGS`` in-process and return click's Result."""

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """A safetensors file with the weights of a freshly initialised digits model."""
    path = tmp_path / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in lower.build_model(7).state_dict().items()}, str(path))
    return path


@pytest.fixture
def snapshot(home: Path, registry_url: str) -> Callable[[], dict[str, str]]:
    """A function returning everything stored: store files with hashes, registry rows."""
    return lambda: _snapshot(home, registry_url)


def _snapshot(home: Path, registry_url: str) -> dict[str, str]:
    store = home / "store"
    files = (
        {
            str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file()
        }
        if store.exists()
        else {}
    )
    registry = Registry(registry_url)
    try:
        rows = {
            "branches": repr([b.to_json() for b in registry.branches()]),
            "checkpoints": repr([c.to_json() for c in registry.checkpoints()]),
            "tags": repr([(t.name, t.checkpoint) for t in registry.tags()]),
        }
    finally:
        registry.close()
    return {**{f"file:{k}": v for k, v in files.items()}, **rows}
