"""The tier of each checkpoint on the command line (issue 16): ``log`` marks local and lost
checkpoints with their nodes, ``show`` prints tier and nodes, ``--json`` of log/show/runs
carries them. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tlreg.registry import Registry

RAY_NODE = "c0ffee" + "0" * 50  # a Ray node id is 56 hex digits


@pytest.fixture
def base(tlreg: Callable, weights_file: Path) -> str:
    """An initialised home with an imported root branch ``base``; its head's id."""
    assert tlreg("init").exit_code == 0
    assert tlreg("import", str(weights_file), "--name", "base").exit_code == 0
    return tlreg("show", "base").output.split()[1]


def tiers(base: str, registry_url: str) -> tuple[str, str, str]:
    """On ``base``: a local checkpoint on two nodes, then one whose node is gone (lost)."""
    with Registry(registry_url) as reg:
        local = reg.commit(
            "base", "a10ca1" + "0" * 58, step=5, objects={}, tier="local", nodes=["n2", "n1"]
        )
        lost = reg.commit(
            "base", "b1057" + "0" * 59, step=10, objects={}, tier="local", nodes=[RAY_NODE]
        )
        assert [r.id for r in reg.mark_nodes_lost([RAY_NODE])] == [lost.id]
    return base, local.id, lost.id


def test_log_marks_local_and_lost_checkpoints_and_keeps_shared_lines(
    tlreg: Callable, base: str, registry_url: str
) -> None:
    (before,) = tlreg("log", "base").output.splitlines()
    _, local, lost = tiers(base, registry_url)
    result = tlreg("log", "base")
    assert result.exit_code == 0, result.output
    lost_line, local_line, shared_line = result.output.splitlines()
    assert lost_line.startswith(f"{lost[:12]}  base@10  ")
    assert f"  train  [lost: {RAY_NODE[:12]}]  (head: base)" in lost_line
    assert local_line.startswith(f"{local[:12]}  base@5  ")
    assert local_line.endswith("  train  [local: n1,n2]")
    assert shared_line == before.replace("  (head: base)", "")
    assert "[" not in shared_line


def test_log_json_carries_tier_and_nodes(tlreg: Callable, base: str, registry_url: str) -> None:
    _, local, lost = tiers(base, registry_url)
    result = tlreg("log", "base", "--json")
    assert result.exit_code == 0, result.output
    assert [(r["id"], r["tier"], r["nodes"]) for r in json.loads(result.output)] == [
        (lost, "lost", [RAY_NODE]),
        (local, "local", ["n1", "n2"]),
        (base, "shared", []),
    ]


def test_show_prints_tier_and_nodes_without_reading_a_local_manifest(
    tlreg: Callable, base: str, registry_url: str
) -> None:
    _, local, lost = tiers(base, registry_url)
    shared = tlreg("show", base)
    assert shared.exit_code == 0, shared.output
    assert "tier        shared\nnodes       -\n" in shared.output
    assert json.loads(tlreg("show", base, "--json").output)["tier"] == "shared"
    # The manifest of a local checkpoint is on a node-local tier, not in the store: the
    # lineage row is shown, and nothing is read from the store.
    shown = tlreg("show", local)
    assert shown.exit_code == 0, shown.output
    assert f"checkpoint  {local}\n" in shown.output
    assert "tier        local (on the node-local tiers of its nodes only" in shown.output
    assert "nodes       n1, n2\n" in shown.output
    doc = json.loads(tlreg("show", local, "--json").output)
    assert (doc["id"], doc["tier"], doc["nodes"]) == (local, "local", ["n1", "n2"])
    assert "tensors" not in doc
    gone = tlreg("show", lost)
    assert gone.exit_code == 0, gone.output
    assert "tier        lost (a node holding a local-only share is gone" in gone.output
    assert f"nodes       {RAY_NODE}\n" in gone.output


def test_runs_json_says_which_node_each_rank_ran_on(
    tlreg: Callable, base: str, registry_url: str
) -> None:
    with Registry(registry_url) as reg:
        run = reg.start_run("base", {})
        reg.record_run_nodes(run.id, {1: "n2", 0: "n1"})
        reg.start_run("base", {})
    result = tlreg("runs", "--json")
    assert result.exit_code == 0, result.output
    assert [r["nodes"] for r in json.loads(result.output)] == [{"0": "n1", "1": "n2"}, {}]


def test_show_of_an_unknown_checkpoint_is_one_error_line(tlreg: Callable, base: str) -> None:
    result = tlreg("show", "ffffffff0000")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: no branch, tag or checkpoint matches 'ffffffff0000'")


def test_export_and_verify_of_a_lost_checkpoint_say_lost_in_one_line(
    tlreg: Callable, base: str, registry_url: str, tmp_path: Path
) -> None:
    _, _, lost = tiers(base, registry_url)
    for args in (("export", lost, str(tmp_path / "out.safetensors")), ("verify", lost)):
        result = tlreg(*args)
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"Error: checkpoint '{lost}' is lost: "), line
    assert not (tmp_path / "out.safetensors").exists()
