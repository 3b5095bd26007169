"""A fuzzer of manifests that lie with a valid checksum, over every field, on every reader.

A manifest's checksum is integrity, not authentication: whoever can write the store can
recompute it. Hypothesis takes a real checkpoint's manifest, mutates one to three of its
fields (shapes, sizes, offsets, objects, dtypes, hashes, ids, paths, the tree, shards,
nesting, any field replaced by any JSON), recomputes the checksum and writes it in place of
the original. Then ``tlreg show``, ``diff``, ``verify`` and ``export``, an
``AsyncCheckpointer.load`` and the zarr view (every array read) run on it, on the local store
and on the S3 server. Each either works or refuses in one line (a ``CheckpointError`` in the
API, ``Error: ...`` and exit 1 in the CLI) naming the checkpoint's manifest when the manifest
is what is wrong; never a traceback; no single allocation larger than all the store's objects
together (``torch.empty``, the restore's page-aligned buffers, ``numpy.zeros`` and the view's
``bytearray``s are watched); and nothing in the store or the registry changes.

``make test`` runs 12 examples on the local store and 6 on S3; ``make stress``
(``TLREG_STRESS=1``) 400 and 100.
The counts (examples, each field mutated, manifests refused and accepted) are printed at the
end of the run.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
import torch
import zarr
from click.testing import Result
from faultlib import COUNTS, STRESS, trials
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import tlreg.ckpt.restore as restore_module
import tlreg.ckpt.view as view_module
from tlreg.ckpt import AsyncCheckpointer, CheckpointError, open_checkpoint
from tlreg.ckpt.manifest import manifest_key, read_manifest
from tlreg.ckpt.validate import ITEMSIZE
from tlreg.ckpt.verify import quick_check
from tlreg.registry import Registry
from tlreg.storage_backends import Store, open_store

EXAMPLES = {"local": trials(short=12, long=400), "s3": trials(short=6, long=100)}
"""Examples per store (a request to the S3 server costs more than a file)."""

FIELDS = (
    "shape",
    "nbytes",
    "offset",
    "object",
    "dtype",
    "hash",
    "objects",
    "consistent lie",
    "shards",
    "nesting",
    "id",
    "path",
    "tree",
    "step/created/version/format/metadata",
    "any field, any JSON",
)
"""What the fuzzer mutates; each is counted when drawn."""

DEEP = "@deep@"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
sizes = st.one_of(
    st.integers(min_value=-2, max_value=64),
    st.integers(min_value=0, max_value=2**70),
    st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64]),
)
hexes = st.text(alphabet="0123456789abcdef", min_size=0, max_size=70)


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def sealed(doc: dict[str, Any], depth: int) -> bytes:
    """``doc`` with a recomputed checksum; the string :data:`DEEP` becomes ``depth`` nested
    lists (written as text: json.dumps itself cannot nest that deep)."""
    body = _compact({k: v for k, v in doc.items() if k != "checksum"})
    body = body.replace(_compact(DEEP), b"[" * depth + b"0" + b"]" * depth)
    return body[:-1] + b',"checksum":"' + blake3.blake3(body).hexdigest().encode() + b'"}'


def _mutate(data: st.DataObject, doc: dict[str, Any], other: dict[str, Any]) -> str:
    """Apply one drawn mutation to ``doc`` in place; returns the field mutated."""
    field = data.draw(st.sampled_from(FIELDS), label="field")
    tensors: dict[str, Any] = doc["tensors"]
    path = data.draw(st.sampled_from(sorted(tensors)), label="tensor") if tensors else None
    entry: dict[str, Any] = tensors[path] if path is not None else {}
    digests = sorted(doc["objects"]) + sorted(other["objects"])
    if field == "shape" and path:
        entry["shape"] = data.draw(
            st.lists(st.integers(min_value=-1, max_value=2**66), max_size=70)
            | st.lists(st.integers(min_value=0, max_value=8), max_size=4)
        )
    elif field == "nbytes" and path:
        entry["nbytes"] = data.draw(sizes)
    elif field == "offset" and path:
        entry["offset"] = data.draw(sizes)
    elif field == "object" and path:
        entry["object"] = data.draw(st.sampled_from(["", *digests]) | hexes)
    elif field == "dtype" and path:
        entry["dtype"] = data.draw(st.sampled_from(sorted(ITEMSIZE)) | st.text(max_size=12))
    elif field == "hash" and path:
        entry["hash"] = data.draw(hexes | st.sampled_from(digests))
    elif field == "objects" and doc["objects"]:
        digest = data.draw(st.sampled_from(sorted(doc["objects"])))
        how = data.draw(st.sampled_from(["size", "drop", "add"]))
        if how == "size":
            doc["objects"][digest] = data.draw(sizes)
        elif how == "drop":
            del doc["objects"][digest]
        else:
            doc["objects"][data.draw(hexes)] = data.draw(sizes)
    elif field == "consistent lie" and path and entry["object"]:
        # every size in the manifest agrees, at up to 2**41 times the truth: only the store
        # (its listing and sizes) can tell
        factor = data.draw(st.sampled_from([2, 3, 1 << 10, 1 << 20, 1 << 41]))
        entry["shape"] = (
            [entry["shape"][0] * factor, *entry["shape"][1:]] if entry["shape"] else [factor]
        )
        entry["nbytes"] *= factor
        entry["offset"] = 0
        doc["objects"][entry["object"]] = max(doc["objects"][entry["object"]], entry["nbytes"])
    elif field == "shards" and path and entry["object"] and entry["shape"]:
        # the tensor as row blocks of its own bytes: sometimes exact, sometimes overlapping,
        # gapped, out of order or outside the tensor
        rows, row = entry["shape"][0], entry["nbytes"] // max(entry["shape"][0], 1)
        cuts = sorted({*data.draw(st.lists(st.integers(0, rows), max_size=4)), 0, rows})
        shards = [
            {
                "offsets": [a] + [0] * (len(entry["shape"]) - 1),
                "shape": [b - a, *entry["shape"][1:]],
                "object": entry["object"],
                "offset": entry["offset"] + a * row,
                "nbytes": (b - a) * row,
                "hash": entry["hash"],
            }
            for a, b in itertools.pairwise(cuts)
        ]
        if data.draw(st.booleans(), label="break the tiling") and shards:
            victim = data.draw(st.sampled_from(shards))
            victim[data.draw(st.sampled_from(["offsets", "shape"]))][0] += data.draw(
                st.integers(-2, 2)
            )
        entry.update(object="", offset=0, shards=shards)
        doc["version"] = data.draw(st.sampled_from([2, 2, 1]))
        if data.draw(st.booleans(), label="digest the shard list"):
            digest = [[s["offsets"], s["shape"], s["hash"]] for s in shards]
            entry["hash"] = blake3.blake3(_compact(digest)).hexdigest()
    elif field == "nesting":
        where = data.draw(st.sampled_from(["metadata", "tree", "entry", "objects"]))
        if where == "metadata":
            doc["metadata"] = {"deep": DEEP}
        elif where == "tree":
            doc["tree"] = {"model": DEEP}
        elif where == "entry" and path:
            entry["shape"] = DEEP
        else:
            doc["objects"] = {"x": DEEP}
    elif field == "id":
        doc["id"] = data.draw(hexes | st.text(max_size=40) | st.sampled_from([other["id"]]))
    elif field == "path" and path:
        new = data.draw(st.text(max_size=30) | st.sampled_from(sorted(other["tensors"])))
        tensors[new] = tensors.pop(path)
        if data.draw(st.booleans(), label="rename in the tree too"):
            doc["tree"] = json.loads(
                _compact(doc["tree"]).replace(_compact(path), _compact(new)).decode()
            )
    elif field == "tree":
        node = data.draw(
            json_values
            | st.builds(
                lambda t, v: {t: v},
                st.sampled_from(
                    [
                        "$tensor",
                        "$tuple",
                        "$dict",
                        "$odict",
                        "$float",
                        "$bytes",
                        "$size",
                        "$dtype",
                        "$pickle",
                    ]
                ),
                json_values,
            )
        )
        tree = doc["tree"] if isinstance(doc["tree"], dict) else {}
        doc["tree"] = data.draw(st.sampled_from([node, {"model": node}, {**tree, "x": node}]))
    elif field == "step/created/version/format/metadata":
        key = data.draw(st.sampled_from(["step", "created", "version", "format", "metadata"]))
        doc[key] = data.draw(json_values)
    else:
        target = data.draw(st.sampled_from(["doc", "entry"] if path else ["doc"]))
        holder = doc if target == "doc" else entry
        key = data.draw(st.sampled_from(sorted(holder)) | st.text(max_size=8))
        holder[key] = data.draw(json_values)
        field = "any field, any JSON"
    return field


class AllocationWatch:
    """Records every watched allocation larger than ``limit`` bytes and refuses it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.oversized: list[int] = []

    def check(self, nbytes: int) -> None:
        if nbytes > self.limit:
            self.oversized.append(nbytes)
            raise MemoryError(f"watched allocation of {nbytes} bytes > {self.limit}")


def _watch(monkeypatch: pytest.MonkeyPatch, watch: AllocationWatch) -> None:
    real_empty, real_zeros, real_aligned = torch.empty, np.zeros, restore_module.page_aligned_empty

    def empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        dims = size[0] if len(size) == 1 and isinstance(size[0], tuple | list) else size
        dtype = kwargs.get("dtype") or torch.get_default_dtype()
        watch.check(int(np.prod([int(d) for d in dims], dtype=object)) * dtype.itemsize)
        return real_empty(*size, **kwargs)

    def zeros(shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> Any:
        dims = shape if isinstance(shape, tuple | list) else (shape,)
        watch.check(int(np.prod([int(d) for d in dims], dtype=object)) * np.dtype(dtype).itemsize)
        return real_zeros(shape, dtype, *args, **kwargs)

    def aligned(nbytes: int) -> torch.Tensor:
        watch.check(nbytes)
        return real_aligned(nbytes)

    def buffer(size: Any = 0, *args: Any) -> bytearray:
        if type(size) is int:
            watch.check(size)
        return bytearray(size, *args)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(np, "zeros", zeros)
    monkeypatch.setattr(restore_module, "page_aligned_empty", aligned)
    monkeypatch.setattr(view_module, "bytearray", buffer, raising=False)


def _contents(store: Store, registry_url: str) -> dict[str, str]:
    """Everything stored (each store key's content hash) and every registry row."""
    state = {f"key:{k}": blake3.blake3(store.get(k)).hexdigest() for k in sorted(store.list(""))}
    with Registry(registry_url) as registry:
        state["branches"] = repr([b.to_json() for b in registry.branches()])
        state["checkpoints"] = repr([c.to_json() for c in registry.checkpoints()])
        state["tags"] = repr([(t.name, t.checkpoint) for t in registry.tags()])
    return state


def _arrays(group: zarr.Group) -> Iterator[zarr.Array]:
    for _, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            yield member


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return str(request.getfixturevalue("s3_bucket_url"))
    return str(tmp_path / "store")


@pytest.mark.timeout(3600 if STRESS else 600)
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_manifests_lying_in_any_field_are_refused_in_one_line_and_change_nothing(
    tlreg: Callable[..., Result],
    weights_file: Path,
    tmp_path: Path,
    registry_url: str,
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind = "s3" if store_url.startswith("s3://") else "local"
    assert tlreg("--store", store_url, "init").exit_code == 0
    for name in ("base", "other"):
        result = tlreg("import", str(weights_file), "--name", name, "--json")
        assert result.exit_code == 0, result.output
    with Registry(registry_url) as registry:
        checkpoint = registry.resolve("base")
        other_id = registry.resolve("other").manifest
    manifest_id = checkpoint.manifest
    store = open_store(store_url)
    key = manifest_key(manifest_id)
    original = store.get(key)
    doc0 = json.loads(original)
    other = json.loads(store.get(manifest_key(other_id)))
    watch = AllocationWatch(sum(store.size(k) for k in store.list("objects")))
    out = tmp_path / "export" / "out.safetensors"

    def refused_in_one_line(result: Result, args: tuple[str, ...]) -> None:
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (
            args,
            result.output,
        )

    @settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # no shrinking: each example runs six readers, and the draws are printed anyway
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        doc = json.loads(original)
        fields = []
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            try:
                fields.append(_mutate(data, doc, other))
            except (TypeError, KeyError, IndexError, AttributeError, ValueError):
                pass  # an earlier mutation left no such structure: nothing to mutate there
        depth = data.draw(st.sampled_from([1, 40, 70, 1000, 100_000]), label="nesting depth")
        raw = sealed(doc, depth)
        store.put(key, raw)
        try:
            before = _contents(store, registry_url)
            try:
                read_manifest(store, manifest_id)
                parses = True
            except CheckpointError as e:
                assert "\n" not in str(e) and manifest_id in str(e), str(e)
                parses = False
            try:
                quick_check(store, manifest_id)
                valid = True
            except CheckpointError as e:
                assert "\n" not in str(e) and manifest_id in str(e), str(e)
                valid = False
            for args in (
                ("show", "base", "--tensors", "--json"),
                ("diff", "other", "base"),
                ("verify", "base"),
                ("export", "base", str(out)),
            ):
                result = tlreg(*args)
                if not parses:  # every reader refuses it in one line, naming the manifest
                    refused_in_one_line(result, args)
                    assert manifest_id in result.output, (args, result.output)
                elif args[0] in ("show", "diff"):  # they read nothing but the manifest
                    assert result.exit_code == 0, (args, result.output)
                elif args[0] == "verify" and result.exit_code == 1:
                    assert "damaged" in result.output or result.output.count("\n") == 1, (
                        result.output
                    )
                elif result.exit_code != 0:
                    refused_in_one_line(result, args)
            with AsyncCheckpointer(store) as engine:
                try:
                    state = engine.load(manifest_id)
                    assert isinstance(state, dict)
                except CheckpointError as e:
                    assert "\n" not in str(e)
            try:
                for array in _arrays(open_checkpoint(store, manifest_id)):
                    array[...]
            except CheckpointError as e:
                assert "\n" not in str(e)
            assert watch.oversized == []
            assert _contents(store, registry_url) == before
        finally:
            store.put(key, original)
            out.unlink(missing_ok=True)
        COUNTS[f"manifest fuzz ({kind}): examples"] += 1
        COUNTS[f"manifest fuzz ({kind}): {'accepted' if valid else 'refused'}"] += 1
        for field in fields:
            COUNTS[f"manifest fuzz ({kind}): {field} mutated"] += 1

    _watch(monkeypatch, watch)
    fuzz()
    assert doc0 == json.loads(store.get(key))
    COUNTS[f"manifest fuzz ({kind}): failures"] += 0
