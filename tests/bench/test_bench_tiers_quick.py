"""``bench/tier_bench.py --quick``: the node-local tier benchmark runs end to end against the
S3 server, prints its four tables, and its raw results have the shape the tables are built
from (the figures themselves are not asserted: a quick run measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from tier_bench import HEADINGS, MLPERF_METHODS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """The printed tables and the raw results of one ``tier_bench.py --quick`` run."""
    root = tmp_path_factory.mktemp("tier-bench")
    out = root / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "tier_bench.py"),
            *("--quick", "--dir", str(root)),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_tier_benchmark_prints_every_table_in_order(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    printed, results = quick_run
    headings = [line.split(":")[0] for line in printed.splitlines() if line.startswith("## ")]
    assert headings == list(HEADINGS)
    assert results["quick"] is True
    assert len(results["elapsed_s"]) == 4


def test_quick_tier_benchmark_times_both_completion_points_of_each_save(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    t1 = quick_run[1]["t1"]
    assert len(t1["local_s"]) == len(t1["shared_durable_s"]) == len(t1["direct_s"]) == 1
    # local-safe comes first: committed (drained) completes after local on the same save
    assert 0 < t1["local_s"][0] <= t1["shared_durable_s"][0]
    assert t1["ratio"] == [t1["local_s"][0] / t1["shared_durable_s"][0]]


def test_quick_tier_benchmark_restores_each_tier_from_its_own_bytes(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    results = quick_run[1]
    nbytes = results["t1"]["bytes"]
    for table in ("t2", "t2b"):
        tiers = results[table]["tiers"]
        # the local tier served every byte, the shared tier none; and the other way round
        read = tiers["shared"]["shared"]
        assert read >= nbytes, table  # the state's tensors, and a few bytes of its scalars
        assert tiers["shared"] == {"shared": read}, table
        assert tiers["local"]["local"] == read, table
        assert tiers["local"].get("shared", 0) == tiers["local"].get("peer", 0) == 0, table
    assert sorted(results["t2"]["times"]) == ["local", "shared"]
    assert sorted(results["t2b"]["times"]) == ["local", "none", "shared"]
    assert all(len(v) == 1 for v in results["t2b"]["times"].values())


def test_quick_tier_benchmark_trains_plain_and_checkpointing_phases_in_turn(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    rows = quick_run[1]["t3"]["rows"]
    assert [r["method"] for r in rows] == ["local every 5, shared every 10", "no tier, S3 every 5"]
    for r in rows:  # P C P: one checkpointing phase between two plain ones
        assert len(r["plain_s"]) == 2 and len(r["step_s"]) == len(r["slowdown"]) == 1
        assert r["checkpoints"] == 1


def test_quick_tier_benchmark_mlperf_table_takes_the_slowest_rank(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    t4 = quick_run[1]["t4"]
    assert t4["ranks"] == 2
    assert [r["method"] for r in t4["rows"]] == list(MLPERF_METHODS)
    assert len({r["bytes"] for r in t4["rows"]}) == 1  # the same shares for every method
    for r in t4["rows"]:
        assert len(r["write_rank_s"]) == len(r["read_rank_s"]) == 2
        assert r["write_s"] == max(r["write_rank_s"]) and r["read_s"] == max(r["read_rank_s"])
        assert r["write_gbps"] == pytest.approx(r["bytes"] / r["write_s"] / 1e9)
        assert r["write_fastest_gbps"] >= r["write_gbps"]
        assert r["read_fastest_gbps"] >= r["read_gbps"]
