"""Manifests that lie with a valid checksum (anyone who can write the store can recompute it).

Each reader refuses them in one line naming the checkpoint's manifest and the field, before it
allocates or reads anything the objects do not back; ``branch`` and ``tag`` refuse to name a
damaged checkpoint and add no row; nothing stored changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch
from faultlib import COUNTS

from tlreg.ckpt import AsyncCheckpointer, CorruptCheckpoint, open_checkpoint, verify
from tlreg.ckpt.manifest import manifest_key, read_manifest
from tlreg.ckpt.objects import chunk_key, meta_key
from tlreg.ckpt.tree import flatten_state
from tlreg.ckpt.validate import ITEMSIZE, MAX_DEPTH
from tlreg.registry import Registry
from tlreg.storage_backends import LocalStore, open_store

SQLITE = pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


DEEP = "@deep@"
"""A string that :func:`sealed` writes as JSON nested 100000 deep (json.dumps cannot)."""


def sealed(doc: dict[str, Any]) -> bytes:
    """``doc`` as a manifest file with a recomputed, valid checksum."""
    deep = b"[" * 100_000 + b"0" + b"]" * 100_000
    body = _compact({k: v for k, v in doc.items() if k != "checksum"})
    body = body.replace(_compact(DEEP), deep)
    return body[:-1] + b',"checksum":"' + blake3.blake3(body).hexdigest().encode() + b'"}'


@pytest.fixture
def imported(
    tlreg: Callable, weights_file: Path, home: Path, registry_url: str
) -> tuple[LocalStore, str, str]:
    """(store, checkpoint id, manifest id) of a checkpoint imported as branch 'base', beside
    another import 'other'."""
    assert tlreg("init").exit_code == 0
    out = tlreg("import", str(weights_file), "--name", "base", "--json").output
    checkpoint = json.loads(out)["id"]
    assert tlreg("import", str(weights_file), "--name", "other").exit_code == 0
    with Registry(registry_url) as registry:
        manifest_id = registry.get(checkpoint).manifest
    return LocalStore(home / "store"), checkpoint, manifest_id


def _doc(store: LocalStore, manifest_id: str) -> dict[str, Any]:
    return json.loads(store.get(manifest_key(manifest_id)))


def _largest(doc: dict[str, Any]) -> str:
    return max(doc["tensors"], key=lambda p: doc["tensors"][p]["nbytes"])


def _shape_disagrees(doc: dict[str, Any]) -> None:
    e = doc["tensors"][_largest(doc)]
    e["shape"] = [e["shape"][0] * 2, *e["shape"][1:]]  # nbytes still the old size


def _absurd_but_consistent(doc: dict[str, Any]) -> None:
    """Shape, nbytes and the object's listed size agree, at 4 TiB: only the store can tell."""
    e = doc["tensors"][_largest(doc)]
    e["shape"], e["offset"] = [1 << 20, 1 << 20], 0
    e["nbytes"] = (1 << 40) * ITEMSIZE[e["dtype"]]
    doc["objects"][e["object"]] = e["nbytes"]


def _deep(doc: dict[str, Any]) -> None:
    doc["metadata"] = {"x": DEEP}


def _past_the_object(doc: dict[str, Any]) -> None:
    e = doc["tensors"][_largest(doc)]
    e["offset"] = doc["objects"][e["object"]]


def _unknown_dtype(doc: dict[str, Any]) -> None:
    doc["tensors"][_largest(doc)]["dtype"] = "float96"


def _bad_path(doc: dict[str, Any]) -> None:
    path = _largest(doc)
    doc["tensors"]["model/\x1b[2Jforged\nline"] = doc["tensors"].pop(path)


CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    # name: (damage, what the one-line refusal names)
    "shape disagrees with nbytes": (_shape_disagrees, ".nbytes:"),
    "JSON nested 100000 deep": (_deep, "deeper than 64"),
    "offset past the object's end": (_past_the_object, ".offset:"),
    "unknown dtype": (_unknown_dtype, ".dtype:"),
    "control characters in a path": (_bad_path, "control character"),
    # parses (every size agrees), so show and diff work; the store's sizes give it away
    "absurd shape, consistent sizes": (_absurd_but_consistent, "bytes"),
}


@SQLITE
@pytest.mark.parametrize("case", list(CASES))
def test_a_lying_manifest_is_refused_in_one_line_naming_the_field_and_nothing_changes(
    tlreg: Callable, imported: tuple[LocalStore, str, str], snapshot: Callable, case: str
) -> None:
    store, checkpoint, manifest_id = imported
    damage, named = CASES[case]
    doc = _doc(store, manifest_id)
    damage(doc)
    store.put(manifest_key(manifest_id), sealed(doc))
    parses = case == "absurd shape, consistent sizes"
    before = snapshot()
    out = store.root.parent / "out.safetensors"
    runs = {
        "show": ("show", checkpoint, "--tensors"),
        "diff": ("diff", "other", checkpoint),
        "verify": ("verify", checkpoint),
        "export": ("export", checkpoint, str(out)),
        "branch": ("branch", "copy", checkpoint),
        "tag": ("tag", "v1", checkpoint),
    }
    for command, args in runs.items():
        result = tlreg(*args)
        if parses and command in ("show", "diff"):
            assert result.exit_code == 0, (args, result.output)
            continue
        assert result.exit_code == 1, (args, result.output)
        if parses and command == "verify":
            # verify reads the objects and reports each finding, one per line
            assert "damaged object" in result.output, result.output
            continue
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (
            args,
            result.output,
        )
        assert manifest_id in result.output and named in result.output, (args, result.output)
        COUNTS["bad input: lying manifests refused in one line"] += 1
    assert snapshot() == before
    assert not out.exists()


@SQLITE
def test_a_lying_size_is_refused_before_the_restore_allocates_it(
    imported: tuple[LocalStore, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, manifest_id = imported
    doc = _doc(store, manifest_id)
    _absurd_but_consistent(doc)
    store.put(manifest_key(manifest_id), sealed(doc))
    stored = sum(p.stat().st_size for p in (store.root / "objects").rglob("*") if p.is_file())
    asked: list[int] = []
    real_empty = torch.empty

    def counting_empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        dims = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
        asked.append(int(torch.Size(dims).numel()))
        return real_empty(*size, **kwargs)

    import tlreg.ckpt.restore as restore

    monkeypatch.setattr(restore.torch, "empty", counting_empty)
    monkeypatch.setattr(restore, "page_aligned_empty", lambda n: asked.append(n))
    with AsyncCheckpointer(store) as engine, pytest.raises(CorruptCheckpoint) as refused:
        engine.load(manifest_id)
    assert "holds at most" in str(refused.value) and "\n" not in str(refused.value)
    assert all(n <= stored for n in asked), (asked, stored)
    with pytest.raises(CorruptCheckpoint, match="not the 4398046511104 bytes"):
        open_checkpoint(store, manifest_id)


@pytest.mark.parametrize(
    "damage",
    ["manifest fails validation", "object zarr.json deleted", "chunk deleted", "chunk cut short"],
)
@pytest.mark.parametrize("registry_url", ["sqlite", "postgres"], indirect=True)
def test_branch_and_tag_refuse_a_damaged_checkpoint_and_add_no_rows(
    tlreg: Callable, imported: tuple[LocalStore, str, str], snapshot: Callable, damage: str
) -> None:
    store, checkpoint, manifest_id = imported
    manifest = read_manifest(store, manifest_id)
    digest = max(manifest.objects, key=lambda d: manifest.objects[d])
    if damage == "manifest fails validation":
        doc = _doc(store, manifest_id)
        _shape_disagrees(doc)
        store.put(manifest_key(manifest_id), sealed(doc))
    elif damage == "object zarr.json deleted":
        store.delete(meta_key(digest))
    elif damage == "chunk deleted":
        store.delete(chunk_key(digest, 0))
    else:
        path = store.root / chunk_key(digest, 0)
        os.truncate(path, path.stat().st_size // 2)
    before = snapshot()
    for args in (
        ("branch", "copy", "base"),
        ("branch", "copy2", checkpoint),
        ("tag", "v1", "base"),
    ):
        result = tlreg(*args)
        assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
        assert result.output.count("\n") == 1, result.output
        expected = manifest_id if damage == "manifest fails validation" else digest
        assert expected in result.output, result.output
    assert snapshot() == before
    COUNTS["bad input: branch/tag of a damaged checkpoint refused"] += 3


@SQLITE
def test_branch_and_tag_of_an_intact_checkpoint_still_work(
    tlreg: Callable, imported: tuple[LocalStore, str, str]
) -> None:
    _, checkpoint, _ = imported
    assert tlreg("branch", "copy", "base").exit_code == 0
    assert tlreg("tag", "v1", checkpoint).exit_code == 0
    assert tlreg("show", "v1").exit_code == 0


@SQLITE
def test_verify_takes_a_store_url_like_the_rest_of_the_api(
    imported: tuple[LocalStore, str, str],
) -> None:
    store, _, manifest_id = imported
    for url in (str(store.root), f"file://{store.root}"):
        report = verify(url, manifest_id)
        assert report.ok and report.checked_bytes > 0


@SQLITE
def test_a_torch_file_that_would_run_code_is_refused_naming_the_file_and_why(
    tlreg: Callable, tmp_path: Path
) -> None:
    class Runs:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Runs()}, evil)
    assert tlreg("init").exit_code == 0
    result = tlreg("import", str(evil), "--name", "evil")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: refused {evil}: loading it would run code"), (
        result.output
    )
    assert f"its pickle calls {os.system.__module__}.system" in result.output


def test_a_state_nested_too_deep_for_a_manifest_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    state: Any = {"w": torch.ones(1)}
    for _ in range(MAX_DEPTH):
        state = {"a": state}
    with pytest.raises(TypeError, match="deep"):
        flatten_state(state)
    with (
        AsyncCheckpointer(str(tmp_path / "store")) as engine,
        pytest.raises(TypeError, match="deep"),
    ):
        engine.save(state)
    assert not (tmp_path / "store" / "manifests").exists() or not list(
        (tmp_path / "store" / "manifests").iterdir()
    )


def test_a_key_with_control_characters_round_trips_under_an_escaped_path(tmp_path: Path) -> None:
    state = {"model": {"a\nb\x1b": torch.arange(4.0), "a\\x0ab\\x1b": torch.ones(2)}}
    with AsyncCheckpointer(str(tmp_path / "store")) as engine:
        manifest_id = engine.save(state).result()
        loaded = engine.load(manifest_id)
        paths = list(engine.manifest(manifest_id).tensors)
    assert paths == ["model/a\\x0ab\\x1b", "model/a\\x0ab\\x1b~1"]
    assert list(loaded["model"]) == list(state["model"])
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)


def test_the_itemsize_of_every_stored_dtype_is_torchs() -> None:
    from tlreg.ckpt.dtypes import DTYPES

    assert set(DTYPES) <= set(ITEMSIZE)
    for name, dtype in DTYPES.items():
        assert ITEMSIZE[name] == dtype.itemsize, name


@pytest.mark.s3
@SQLITE
def test_on_s3_a_lying_manifest_or_a_lost_chunk_is_refused_by_every_command(
    tlreg: Callable, weights_file: Path, registry_url: str, s3_bucket_url: str, tmp_path: Path
) -> None:
    assert tlreg("--store", s3_bucket_url, "init").exit_code == 0
    checkpoint = json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)[
        "id"
    ]
    with Registry(registry_url) as registry:
        manifest_id = registry.get(checkpoint).manifest
    store = open_store(s3_bucket_url)
    original = store.get(manifest_key(manifest_id))
    out = tmp_path / "out.safetensors"
    doc = json.loads(original)
    _absurd_but_consistent(doc)
    store.put(manifest_key(manifest_id), sealed(doc))
    for args in (("export", "base", str(out)), ("branch", "copy", "base"), ("tag", "v1", "base")):
        result = tlreg(*args)
        assert result.exit_code == 1 and result.output.count("\n") == 1, (args, result.output)
        assert result.output.startswith("Error: ") and manifest_id in result.output
    store.put(manifest_key(manifest_id), original)
    digest = next(iter(json.loads(original)["objects"]))
    store.delete(chunk_key(digest, 0))
    for args in (("branch", "copy", "base"), ("tag", "v1", "base")):
        result = tlreg(*args)
        assert result.exit_code == 1 and digest in result.output, (args, result.output)
    with Registry(registry_url) as registry:
        assert [b.name for b in registry.branches()] == ["base"] and not registry.tags()
    assert not out.exists()


@SQLITE
def test_export_of_tied_weights_writes_each_name_and_of_no_model_refuses_in_one_line(
    tlreg: Callable, imported: tuple[LocalStore, str, str], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    store, checkpoint, manifest_id = imported
    original = store.get(manifest_key(manifest_id))
    doc = json.loads(original)
    path = _largest(doc)
    doc["tree"]["model"]["tied.weight"] = {"$tensor": path}
    store.put(manifest_key(manifest_id), sealed(doc))
    out = tmp_path / "tied.safetensors"
    result = tlreg("export", checkpoint, str(out))
    assert result.exit_code == 0, result.output
    exported = load_file(str(out))
    assert torch.equal(exported["tied.weight"], exported[path.removeprefix("model/")])
    for tree in ({"extra": doc["tree"]["extra"]}, {"model": [doc["tree"]["model"][path[6:]]]}):
        doc["tree"] = tree
        store.put(manifest_key(manifest_id), sealed(doc))
        result = tlreg("export", checkpoint, str(tmp_path / "none.safetensors"))
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "no model tensors to export" in result.output
    assert not (tmp_path / "none.safetensors").exists()


@SQLITE
def test_an_unterminated_string_of_escaped_quotes_is_refused_at_once(
    tlreg: Callable, imported: tuple[LocalStore, str, str], snapshot: Callable
) -> None:
    """200 KB of \\" after an open quote: a regex scan of it took minutes (quadratic); JSON's
    own parser refuses it in one pass."""
    store, checkpoint, manifest_id = imported
    store.put(manifest_key(manifest_id), b'{"format": "' + b'\\"' * 100_000)
    before = snapshot()
    result = tlreg("show", checkpoint)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: ") and "is not valid JSON" in result.output
    assert snapshot() == before
