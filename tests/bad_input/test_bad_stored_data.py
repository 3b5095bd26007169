"""Stored data that is malformed, from a newer tlreg, or not a checkpoint at all.

Commands that read a manifest (verify, export, diff) refuse it in one line naming the
checkpoint's manifest, and nothing stored changes. ``Manifest.from_json`` raises only
tlreg's own checkpoint errors, whatever bytes or JSON it is given (hypothesis).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
from faultlib import COUNTS, trials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlreg.ckpt import CheckpointError, Manifest
from tlreg.ckpt.manifest import VERSION, manifest_key
from tlreg.registry import Registry
from tlreg.storage_backends import LocalStore

EXAMPLES = trials(short=200, long=5000)


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _sealed(doc: dict[str, Any]) -> bytes:
    """``doc`` as a manifest file with a valid checksum (what a tlreg would write)."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return _compact({**body, "checksum": blake3.blake3(_compact(body)).hexdigest()})


@pytest.fixture
def imported(
    tlreg: Callable, weights_file: Path, home: Path, registry_url: str
) -> tuple[LocalStore, str, str]:
    """(store, checkpoint id, manifest id) of a checkpoint imported as branch 'base'."""
    tlreg("init")
    checkpoint = json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)[
        "id"
    ]
    tlreg("import", str(weights_file), "--name", "other")
    with Registry(registry_url) as registry:
        manifest_id = registry.get(checkpoint).manifest
    return LocalStore(home / "store"), checkpoint, manifest_id


def _newer(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["version"] = VERSION + 1
    doc["tensors"] = {"new/layout": {"kind": "something this tlreg cannot know"}}
    return _sealed(doc)


CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "not json": (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
    "json list": (lambda raw: b"[]", "not valid JSON"),
    "another format": (lambda raw: _sealed({"format": "zarr", "version": 1}), "not a tlreg"),
    "no checksum": (lambda raw: raw.replace(b',"checksum":', b',"checkxum":'), "checksum"),
    "missing tensors (checksummed)": (
        lambda raw: _sealed({k: v for k, v in json.loads(raw).items() if k != "tensors"}),
        "malformed",
    ),
    "negative object size (checksummed)": (
        lambda raw: _sealed(
            {**json.loads(raw), "objects": {h: -1 for h in json.loads(raw)["objects"]}}
        ),
        "malformed",
    ),
    "newer format version": (_newer, "newer tlreg"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_manifest_is_refused_in_one_line_by_every_reader(
    tlreg: Callable, imported: tuple[LocalStore, str, str], snapshot: Callable, case: str
) -> None:
    store, checkpoint, manifest_id = imported
    damage, expected = CASES[case]
    store.put(manifest_key(manifest_id), damage(store.get(manifest_key(manifest_id))))
    before = snapshot()
    for args in (
        ("verify", checkpoint),
        ("export", checkpoint, str(store.root.parent / "out.safetensors")),
        ("diff", "other", checkpoint),
    ):
        result = tlreg(*args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert manifest_id in result.output and expected in result.output, result.output
    assert snapshot() == before
    assert not (store.root.parent / "out.safetensors").exists()
    COUNTS["bad input: damaged manifests refused (verify, export, diff)"] += 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_manifest_parsing_of_any_bytes_raises_only_checkpoint_errors(data: bytes) -> None:
    try:
        Manifest.from_json(data, name="manifest x")
    except CheckpointError as e:
        assert str(e).startswith("manifest x") and "\n" not in str(e)
        COUNTS["bad input: random manifest bytes refused"] += 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    changes=st.dictionaries(
        st.sampled_from(
            ["format", "version", "id", "step", "created", "metadata", "tree", "tensors", "objects"]
        ),
        json_values,
        min_size=1,
        max_size=3,
    )
)
def test_a_checksummed_manifest_with_any_fields_replaced_parses_or_is_refused_cleanly(
    changes: dict[str, Any],
) -> None:
    """Even an intact file (valid checksum) with nonsense fields is a CheckpointError."""
    doc: dict[str, Any] = {
        "format": "tlreg.manifest",
        "version": 1,
        "id": "0" * 32,
        "step": 3,
        "created": "2026-11-24T00:00:00+00:00",
        "metadata": {},
        "tree": {"w": {"tensor": "w"}},
        "tensors": {
            "w": {
                "object": "a" * 64,
                "offset": 0,
                "nbytes": 4,
                "dtype": "float32",
                "shape": [1],
                "hash": "b" * 64,
            }
        },
        "objects": {"a" * 64: 64},
        **changes,
    }
    try:
        manifest = Manifest.from_json(_sealed(doc), name="manifest x")
    except CheckpointError as e:
        assert str(e).startswith("manifest x") and "\n" not in str(e)
        return
    assert Manifest.from_json(manifest.to_bytes()) == manifest
