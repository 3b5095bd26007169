"""A flipped bit anywhere in a stored checkpoint is detected, named, and never loaded.

One checkpoint (packed small tensors and a solo large one) is imported through the CLI; each
trial flips one random bit of one random stored file — a chunk of an object, an object's
``zarr.json``, or the manifest — then ``tlreg verify`` must fail naming exactly what is
damaged, and ``tlreg export`` (a full restore) must refuse. The bit is flipped back and the
checkpoint verifies again.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from faultlib import COUNTS, trials
from safetensors.torch import save_file

from tlreg.ckpt import AsyncCheckpointer, CheckpointError
from tlreg.ckpt.manifest import manifest_key, read_manifest
from tlreg.ckpt.objects import chunk_key, meta_key, read_layout
from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.storage_backends import LocalStore

FLIPS = trials(short=40, long=2000)


def _tlreg(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalStore, str, str, dict[str, torch.Tensor]]:
    """A tlreg home holding one imported checkpoint: (store, checkpoint id, manifest id, the
    imported tensors)."""
    for var in ("TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TLREG_HOME", str(tmp_path / "home"))
    gen = torch.Generator().manual_seed(3)
    weights = {f"layers.{i}.weight": torch.randn(16, 16 + i, generator=gen) for i in range(24)}
    weights["head.weight"] = torch.randn(2048, 2048 + 7, generator=gen)  # > 16 MiB: solo
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    assert _tlreg("init").exit_code == 0
    out = _tlreg("import", str(path), "--name", "base", "--json")
    assert out.exit_code == 0, out.output
    checkpoint = json.loads(out.output)["id"]
    store = LocalStore(tmp_path / "home" / "store")
    registry = Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    try:
        manifest_id = registry.get(checkpoint).manifest
    finally:
        registry.close()
    return store, checkpoint, manifest_id, weights


def _flip(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _targets(store: LocalStore, manifest_id: str) -> list[tuple[str, str, int]]:
    """Every stored file of the checkpoint: (kind, key, object offset of its first byte)."""
    manifest = read_manifest(store, manifest_id)
    found = [("manifest", manifest_key(manifest_id), 0)]
    for digest in manifest.objects:
        layout = read_layout(store, digest)
        found.append(("zarr.json", meta_key(digest), 0))
        found += [("chunk", chunk_key(digest, i), i * layout.chunk) for i in range(layout.nchunks)]
    return found


def _tensors_at(store: LocalStore, manifest_id: str, key: str, position: int) -> set[str]:
    """Tensors whose bytes include object byte ``position`` of the object holding ``key``."""
    manifest = read_manifest(store, manifest_id)
    return {
        path
        for path, e in manifest.stored()
        if key.startswith(f"objects/{e.object[:2]}/{e.object[2:4]}/{e.object}/")
        and e.offset <= position < e.offset + e.nbytes
    }


def test_any_flipped_bit_is_named_by_verify_and_refused_by_restore(
    imported: tuple[LocalStore, str, str, dict[str, torch.Tensor]],
) -> None:
    store, checkpoint, manifest_id, weights = imported
    targets = _targets(store, manifest_id)
    rng = random.Random(1124)
    tally: Counter[str] = Counter()
    for trial in range(FLIPS):
        kind, key, base = targets[0] if trial % 4 == 0 else rng.choice(targets)
        path = Path(store.local_path(key) or "")
        offset, bit = rng.randrange(path.stat().st_size), rng.randrange(8)
        expected = _tensors_at(store, manifest_id, key, base + offset) if kind == "chunk" else None
        _flip(path, offset, bit)
        tally["bit flips"] += 1
        try:
            checked = _tlreg("verify", checkpoint, "--json")
            assert checked.exit_code != 0, f"flip of bit {bit} at {key}+{offset} not detected"
            if kind == "manifest":
                assert checked.output.startswith("Error: ") and manifest_id in checked.output
                assert checked.output.count("\n") == 1, checked.output
            else:
                report = json.loads(checked.stdout)
                digest = key.split("/")[3]
                assert digest in report["damaged_objects"], report
                if expected is not None:  # the exact tensors, or none for padding bytes
                    assert set(report["damaged_tensors"]) == expected, (key, offset, report)
            tally[f"corruptions detected ({kind})"] += 1
            if kind == "zarr.json" or expected == set():
                # Padding between packed tensors, or object metadata: verify reports the object;
                # a restore checks every tensor's own hash, so it either refuses or returns
                # every tensor intact (a chunk size that grew past the object reads the same).
                try:
                    with AsyncCheckpointer(store) as engine:
                        state = engine.load(manifest_id)
                except CheckpointError:
                    tally[f"restores refused ({kind})"] += 1
                    continue
                assert all(torch.equal(state["model"][k], v) for k, v in weights.items())
                tally[f"restores intact despite damage outside tensor bytes ({kind})"] += 1
                continue
            restored = _tlreg("export", checkpoint, str(path.parent / "out.safetensors"))
            assert restored.exit_code != 0 and restored.output.startswith("Error: ")
            assert restored.output.count("\n") == 1, restored.output
            with AsyncCheckpointer(store) as engine, pytest.raises(CheckpointError):
                engine.load(manifest_id)
        finally:
            _flip(path, offset, bit)
    assert _tlreg("verify", checkpoint).exit_code == 0
    COUNTS.update({f"bit flips: {k}": v for k, v in tally.items()})
    COUNTS["bit flips: undetected"] += 0
