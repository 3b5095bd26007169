"""Weight files that are truncated or lie about their contents are refused in one line.

Hypothesis cuts a real safetensors file at any byte and rewrites its JSON header with wrong
offsets, shapes and dtypes; ``tlreg import`` either imports exactly the tensors the file
really holds or refuses in one line naming the file, and a refusal changes nothing stored.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from faultlib import COUNTS, trials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

EXAMPLES = trials(short=40, long=800)
TENSORS = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
GOOD = save(TENSORS)


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]))


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _refused_or_exact(tlreg: Callable, snapshot: Callable, path: Path, content: bytes) -> None:
    path.write_bytes(content)
    before = snapshot()
    result = tlreg("import", str(path), "--name", "fresh", "--json")
    if result.exit_code == 0:
        # accepted only if the file is a faithful safetensors file: then it must round-trip
        exported = path.with_suffix(".out")
        assert tlreg("export", "fresh", str(exported)).exit_code == 0
        from safetensors.torch import load as st_load

        assert {k: v.tolist() for k, v in st_load(exported.read_bytes()).items()} == {
            k: v.tolist() for k, v in st_load(content).items()
        }
        assert tlreg("branch", "-d", "fresh").exit_code == 0
        COUNTS["bad input: rewritten safetensors headers imported exactly"] += 1
        return
    out = result.output
    assert result.exit_code == 1 and out.startswith("Error: ") and out.count("\n") == 1, out
    assert path.name in out, out
    assert snapshot() == before
    COUNTS["bad input: rewritten safetensors headers refused"] += 1


@pytest.fixture
def ready(tlreg: Callable) -> None:
    assert tlreg("init").exit_code == 0


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cut=st.integers(min_value=0, max_value=len(GOOD) - 1))
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_a_safetensors_file_cut_anywhere_is_refused_changing_nothing(
    tlreg: Callable, ready: None, snapshot: Callable, tmp_path: Path, cut: int
) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(GOOD[:cut])
    before = snapshot()
    result = tlreg("import", str(path), "--name", "fresh")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "cut.safetensors" in result.output
    assert snapshot() == before
    COUNTS["bad input: truncated safetensors files refused"] += 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tensor=st.sampled_from(["a", "b"]),
    field=st.sampled_from(["data_offsets", "shape", "dtype"]),
    value=st.one_of(
        st.lists(st.integers(min_value=-(2**63), max_value=2**64), max_size=3),
        st.sampled_from(["F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "F32"]),
        st.integers(),
        st.none(),
    ),
)
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_a_header_that_lies_is_refused_or_the_import_is_exact(
    tlreg: Callable,
    ready: None,
    snapshot: Callable,
    tmp_path: Path,
    tensor: str,
    field: str,
    value: object,
) -> None:
    header = _header(GOOD)
    body = GOOD[8 + struct.unpack("<Q", GOOD[:8])[0] :]
    header[tensor][field] = value
    _refused_or_exact(tlreg, snapshot, tmp_path / "lies.safetensors", _with_header(header, body))
