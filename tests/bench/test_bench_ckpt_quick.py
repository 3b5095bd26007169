"""``make bench BENCH_ARGS=--quick``: the checkpoint benchmark runs end to end, every method
of every table measured (none failed), on one small state, and its frozen-backbone table
shows tlreg's second checkpoint writing only the head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from ckpt_bench import METHODS, RESTORES  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The printed tables and the raw results of one ``ckpt_bench.py --quick`` run."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "results.json"
    args = ["--quick", "--dir", str(root), "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "ckpt_bench.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_benchmark_prints_every_table_and_no_method_fails(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    printed, results = quick_run
    headings = [line.split(":")[0] for line in printed.splitlines() if line.startswith("## ")]
    assert headings == [
        "## 1. Save",
        "## 1b. Restore",
        "## 2. Training loop",
        "## 2b. Thread vs process writer, interleaved in one process",
        "## 3. Frozen backbone",
    ]
    assert "failed" not in printed

    t1 = results["t1"]
    assert [r["method"] for r in t1] == list(METHODS)
    assert len({r["bytes"] for r in t1}) == 1  # the same state for every method
    for r in t1:
        assert len(r["stall"]) == len(r["durable"]) == len(r["copy"]) == 1, r["method"]
        assert r["durable"][0] >= r["stall"][0] > 0, r["method"]
    assert list(results["restore"]) == list(RESTORES)
    for label, times in results["restore"].items():
        assert sorted(times) == ["cold", "cold faults", "warm", "warm faults"], label
        assert len(times["cold"]) == len(times["warm"]) == 1, label
    assert [r["method"] for r in results["t2"]] == list(METHODS)
    assert all(len(r["step_s"]) == 1 and r["checkpoints"] > 0 for r in results["t2"])
    assert [r["method"] for r in results["t2b"]] == [
        "tlreg eager (thread writer)",
        "tlreg eager (process writer)",
    ]


def test_quick_benchmark_frozen_backbone_costs_tlreg_only_the_head(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    rows = {r["method"]: r for r in quick_run[1]["t3"]}
    assert list(rows) == ["torch.save", "dcp.save", "safetensors", "tlreg eager"]
    tlreg = rows.pop("tlreg eager")
    # the head's bytes, plus its objects' zarr.json documents and the manifest
    assert tlreg["head_bytes"] <= tlreg["second"] < tlreg["head_bytes"] + (64 << 10)
    for name, r in rows.items():  # the peers write the whole state again
        assert r["second"] >= r["bytes"], name
