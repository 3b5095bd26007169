"""Config hygiene (issue 19): init's own --store/--registry, absolute store paths, no memory://
home, the store checked against the registry on every command, one-line errors instead of
tracebacks, and pruned checkpoints called pruned. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomllib
import torch

from tlreg.registry import Registry
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower


def _error(result: object, *needles: str) -> str:
    """The one ``Error:`` line of a refused command (exit 1, no traceback)."""
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    for needle in needles:
        assert needle in lines[0], out
    return lines[0]


def _toml(home: Path) -> dict[str, str]:
    return tomllib.loads((home / "tlreg.toml").read_text())["tlreg"]


def test_init_takes_store_and_registry_after_the_command_as_the_readme_shows(
    tlreg: Callable, home: Path, tmp_path: Path, registry_url: str
) -> None:
    store = tmp_path / "my-store"
    result = tlreg("init", "--store", str(store), "--registry", registry_url)
    assert result.exit_code == 0, result.output
    assert _toml(home)["store_url"] == str(store)
    assert store.is_dir()


def test_relative_store_paths_are_saved_absolute(
    tlreg: Callable, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tlreg("init", "--store", "./rel/store").exit_code == 0
    assert _toml(home)["store_url"] == str(tmp_path / "rel" / "store")
    # a command run from another folder uses the same store, not ./rel/store under it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert tlreg("branches").exit_code == 0
    assert not (elsewhere / "rel").exists()


def test_file_url_with_a_relative_path_is_saved_absolute(
    tlreg: Callable, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tlreg("--store", "file://relative/path", "init").exit_code == 0
    assert _toml(home)["store_url"] == str(tmp_path / "relative" / "path")


def test_a_memory_store_is_refused_as_a_homes_store(tlreg: Callable, home: Path) -> None:
    _error(tlreg("init", "--store", "memory://x"), "memory://x", "directory path")
    assert not (home / "tlreg.toml").exists()


def test_every_command_refuses_a_store_the_registry_does_not_record(
    tlreg: Callable, home: Path, tmp_path: Path, weights_file: Path
) -> None:
    assert tlreg("init").exit_code == 0
    other = tmp_path / "other"
    _error(
        tlreg("--store", str(other), "import", str(weights_file), "--name", "base"),
        f"records store '{home / 'store'}'",
        str(other),
    )
    assert not other.exists()
    _error(tlreg("--store", str(other), "branches"), "records store")
    assert tlreg("import", str(weights_file), "--name", "base").exit_code == 0


def test_other_spellings_of_the_recorded_store_are_the_same_store(
    tlreg: Callable, home: Path, weights_file: Path
) -> None:
    assert tlreg("init").exit_code == 0
    store = home / "store"
    for spelling in (f"{store}/", f"file://{store}", f"{store}/.", f"{store}/../store"):
        assert tlreg("--store", spelling, "branches").exit_code == 0, spelling
    assert (
        tlreg("--store", f"file://{store}/", "import", str(weights_file), "--name", "b").exit_code
        == 0
    )


def test_a_memory_store_inside_an_fsspec_chain_is_refused_too(tlreg: Callable, home: Path) -> None:
    _error(tlreg("init", "--store", "simplecache::memory://x"), "memory://x", "directory path")
    assert not (home / "tlreg.toml").exists()


def test_an_http_store_is_one_error_line(tlreg: Callable, home: Path) -> None:
    _error(tlreg("init", "--store", "http://127.0.0.1:9/store"), "http://127.0.0.1:9/store")
    assert not (home / "tlreg.toml").exists()


@pytest.fixture
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    """A store folder behind a read-only bind mount (root ignores file modes)."""
    store = tmp_path / "ro-store"
    store.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)], check=False)
    if mounted.returncode != 0:
        pytest.skip("needs mount --bind (root)")
    try:
        (store / "probe").write_text("x")
    except OSError:
        pass
    else:
        subprocess.run(["umount", str(store)], check=True)
        pytest.skip("bind mount is not read-only here")
    yield store
    subprocess.run(["umount", str(store)], check=True)


def test_import_into_a_read_only_store_is_one_error_line(
    tlreg: Callable, read_only_store: Path, weights_file: Path, registry_url: str
) -> None:
    result = tlreg("--store", str(read_only_store), "import", str(weights_file), "--name", "b")
    _error(result, str(read_only_store))
    registry = Registry(registry_url)
    try:
        assert registry.branches() == []
    finally:
        registry.close()


def test_the_readme_init_example_runs_as_a_console_script(tmp_path: Path) -> None:
    """``tlreg init --store PATH`` through the installed entry point (click parsing included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLREG_")}
    env["TLREG_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-m", "tlreg.cli", "init", "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"store     {tmp_path / 's'}" in proc.stdout


def _pruned_branch(home: Path, registry_url: str) -> list[str]:
    """Branch b with 3 checkpoints, the middle one pruned by ``tlreg gc --keep-last 1``."""
    registry = Registry(registry_url)
    registry.create_branch("b")
    model = lower.build_model(0)
    ids = []
    with Checkpointer("b", registry=registry, store=str(home / "store")) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.head.bias.add_(1.0)
            ids.append(ckpt.save(step, model=model).result())
    registry.tag(ids[0], "first")
    registry.close()
    return ids


def test_a_pruned_checkpoint_is_called_pruned_with_its_gc_date_everywhere(
    tlreg: Callable, home: Path, registry_url: str, tmp_path: Path
) -> None:
    assert tlreg("init").exit_code == 0
    ids = _pruned_branch(home, registry_url)
    assert tlreg("gc", "--keep-last", "1", "--grace", "0s").exit_code == 0
    registry = Registry(registry_url)
    when = registry.get(ids[1]).pruned
    registry.close()
    assert when is not None
    date = f"{when:%Y-%m-%d %H:%M}"
    for args in (
        ("export", ids[1], str(tmp_path / "out.safetensors")),
        ("verify", ids[1]),
        ("diff", ids[1], ids[2]),
        ("branch", "from-pruned", ids[1]),
        ("tag", "v-pruned", ids[1]),
    ):
        line = _error(tlreg(*args), "pruned by garbage collection on", date)
        assert "damaged" not in line and "verify()" not in line
    assert not (tmp_path / "out.safetensors").exists()
    assert "from-pruned" not in tlreg("branches").output
    assert "v-pruned" not in tlreg("tag").output
    shown = tlreg("show", ids[1])
    assert shown.exit_code == 0
    assert f"pruned      {date} UTC by garbage collection" in shown.output
    log = tlreg("log", "b").output.splitlines()
    assert f"(pruned {when:%Y-%m-%d})" in log[1] and ids[1][:12] in log[1]
    assert "pruned" not in log[0] + log[2]
    lineage = tlreg("lineage", ids[1]).output.splitlines()
    assert [line for line in lineage if "[pruned" in line] == [
        line for line in lineage if ids[1][:12] in line
    ]
    assert f"[pruned {when:%Y-%m-%d}]" in lineage[1]
    with (
        pytest.raises(Exception, match="pruned by garbage collection"),
        Checkpointer.for_branch("b", home=home) as ckpt,
    ):
        ckpt.restore(checkpoint=ids[1], model=lower.build_model(0))
