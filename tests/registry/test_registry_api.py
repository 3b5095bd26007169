"""The registry's public contract, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import math
import pickle
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tlreg.registry import (
    AmbiguousRef,
    BranchExists,
    BranchNotFound,
    CheckpointExists,
    CheckpointRecord,
    EmptyBranch,
    HeadMoved,
    InvalidName,
    RefNotFound,
    Registry,
    RegistryError,
    RunNotFound,
    TagExists,
    UnsupportedDatabase,
)
from tlreg.registry.models import SCHEMA_VERSION


def commit(
    reg: Registry,
    branch: str,
    cid: str,
    *,
    objects: Mapping[str, int] | None = None,
    step: int = 0,
    **kwargs: Any,
) -> CheckpointRecord:
    return reg.commit(branch, cid, step=step, objects=objects or {}, **kwargs)


def ids(records: list[CheckpointRecord]) -> list[str]:
    return [r.id for r in records]


def snapshot(reg: Registry) -> tuple[Any, ...]:
    """Everything the public API can see, to prove a failed call changed nothing."""
    return (
        reg.checkpoints(),
        reg.branches(),
        reg.tags(),
        reg.runs(),
        {b.name: reg.branch_bytes(b.name) for b in reg.branches()},
    )


@pytest.fixture
def diamond(registry: Registry) -> Registry:
    """main: a <- b <- d(merge of b, c); side: branched at b, c."""
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001", step=1)
    commit(registry, "main", "bbbb0002", step=2)
    registry.create_branch("side", from_ref="main")
    commit(registry, "side", "cccc0003", step=3)
    commit(registry, "main", "dddd0004", step=4, parents=["bbbb0002", "cccc0003"], kind="merge")
    return registry


# -- opening -------------------------------------------------------------------------------


def test_new_registry_records_schema_version(registry: Registry) -> None:
    assert registry.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_reopening_a_registry_keeps_its_data(registry_url: str) -> None:
    with Registry(registry_url) as first:
        first.create_branch("main")
        commit(first, "main", "aaaa0001")
    with Registry(registry_url) as second:
        assert second.resolve("main").id == "aaaa0001"
        assert second.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_set_meta_replaces_the_value_and_missing_keys_are_none(registry: Registry) -> None:
    assert registry.get_meta("store_url") is None
    registry.set_meta("store_url", "file:///a")
    registry.set_meta("store_url", "s3://bucket/b")
    assert registry.get_meta("store_url") == "s3://bucket/b"


def test_sqlite_url_creates_the_file_and_its_parents_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "registry.db"
    with Registry(f"sqlite:///{path}") as reg:
        reg.create_branch("main")
    assert path.is_file()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_unsupported_database_url_is_refused() -> None:
    with pytest.raises(UnsupportedDatabase, match="mysql"):
        Registry("mysql://root@localhost/db")


def test_registry_pickles_by_url(registry: Registry) -> None:
    registry.create_branch("main")
    clone = pickle.loads(pickle.dumps(registry))
    try:
        assert clone.url == registry.url
        assert [b.name for b in clone.branches()] == ["main"]
    finally:
        clone.close()


# -- branches ------------------------------------------------------------------------------


def test_create_branch_without_ref_is_an_empty_root(registry: Registry) -> None:
    branch = registry.create_branch("main", task="digits")
    assert (branch.name, branch.head, branch.base, branch.task) == ("main", None, None, "digits")
    assert registry.get_branch("main") == branch
    assert registry.log("main") == []


@pytest.mark.parametrize("ref", ["main", "v1", "bbbb0002", "bbbb"])
def test_branch_from_branch_tag_or_checkpoint_points_at_its_start(
    registry: Registry, ref: str
) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    commit(registry, "main", "bbbb0002")
    registry.tag("bbbb0002", "v1")
    branch = registry.create_branch("feature", from_ref=ref, task="t2")
    assert (branch.head, branch.base, branch.task) == ("bbbb0002", "bbbb0002", "t2")
    assert registry.resolve("feature").id == "bbbb0002"


def test_branch_from_unknown_ref_is_refused_and_creates_nothing(registry: Registry) -> None:
    with pytest.raises(RefNotFound, match="nope"):
        registry.create_branch("feature", from_ref="nope")
    assert registry.branches() == []


def test_duplicate_branch_name_is_refused(registry: Registry) -> None:
    first = registry.create_branch("main", task="a")
    with pytest.raises(BranchExists, match="'main' already exists"):
        registry.create_branch("main", task="b")
    assert registry.branches() == [first]


def test_branches_are_sorted_by_name(registry: Registry) -> None:
    for name in ["zeta", "alpha", "team/mid"]:
        registry.create_branch(name)
    assert [b.name for b in registry.branches()] == ["alpha", "team/mid", "zeta"]


def test_delete_branch_removes_the_name_but_keeps_its_checkpoints(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    registry.delete_branch("main")
    assert registry.branches() == []
    assert registry.get("aaaa0001").branch == "main"
    with pytest.raises(BranchNotFound, match="'main' does not exist"):
        registry.get_branch("main")
    with pytest.raises(BranchNotFound):
        registry.delete_branch("main")


def test_unknown_branch_raises_branch_not_found_with_next_step(registry: Registry) -> None:
    with pytest.raises(BranchNotFound) as info:
        registry.log("nope")
    assert str(info.value) == "branch 'nope' does not exist: list branches with 'tlreg branches'"


# -- commit, log, resolve ------------------------------------------------------------------


def test_commit_moves_the_head_and_log_is_newest_first(registry: Registry) -> None:
    registry.create_branch("main")
    first = commit(registry, "main", "aaaa0001", step=10, metrics={"loss": 0.5})
    second = commit(registry, "main", "bbbb0002", step=20, message="more")
    assert first.parents == ()
    assert second.parents == ("aaaa0001",)
    assert (second.branch, second.step, second.manifest, second.message, second.kind) == (
        "main",
        20,
        "bbbb0002",
        "more",
        "train",
    )
    assert registry.get_branch("main").head == "bbbb0002"
    assert ids(registry.log("main")) == ["bbbb0002", "aaaa0001"]
    assert ids(registry.log("main", limit=1)) == ["bbbb0002"]
    assert registry.get("aaaa0001") == first
    assert registry.get("aaaa0001").metrics == {"loss": 0.5}


def test_commit_to_unknown_branch_is_refused(registry: Registry) -> None:
    with pytest.raises(BranchNotFound):
        commit(registry, "nope", "aaaa0001")
    assert registry.checkpoints() == []


def test_commit_with_unknown_parent_is_refused_and_changes_nothing(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    before = snapshot(registry)
    with pytest.raises(RefNotFound, match="'ffff9999'"):
        commit(registry, "main", "bbbb0002", parents=["aaaa0001", "ffff9999"], objects={"o": 5})
    assert snapshot(registry) == before


def test_duplicate_checkpoint_id_is_refused_and_changes_nothing(registry: Registry) -> None:
    registry.create_branch("main")
    registry.create_branch("other")
    commit(registry, "main", "aaaa0001")
    before = snapshot(registry)
    with pytest.raises(CheckpointExists, match="'aaaa0001'"):
        commit(registry, "other", "aaaa0001", objects={"fresh": 9})
    assert snapshot(registry) == before
    # The object insert was rolled back too: it is still new to the registry.
    assert commit(registry, "other", "bbbb0002", objects={"fresh": 9}).new_bytes == 9


def test_invalid_commit_kind_is_refused(registry: Registry) -> None:
    registry.create_branch("main")
    with pytest.raises(ValueError, match="kind 'bogus'"):
        commit(registry, "main", "aaaa0001", kind="bogus")


def test_resolve_branch_tag_full_id_and_unique_prefix(diamond: Registry) -> None:
    diamond.tag("cccc0003", "v1")
    assert diamond.resolve("main").id == "dddd0004"
    assert diamond.resolve("side").id == "cccc0003"
    assert diamond.resolve("v1").id == "cccc0003"
    assert diamond.resolve("aaaa0001").id == "aaaa0001"
    assert diamond.resolve("bbbb").id == "bbbb0002"


def test_resolve_prefers_a_branch_over_a_tag_of_the_same_name(diamond: Registry) -> None:
    diamond.tag("aaaa0001", "side")
    assert diamond.resolve("side").id == "cccc0003"


def test_ambiguous_prefix_lists_every_candidate(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "abcd0001")
    commit(registry, "main", "abcd0002")
    with pytest.raises(AmbiguousRef) as info:
        registry.resolve("abcd")
    assert str(info.value) == (
        "ref 'abcd' is a prefix of several checkpoints (abcd0001, abcd0002): type more characters"
    )
    with pytest.raises(AmbiguousRef):
        registry.resolve("abcd000")


def test_prefix_shorter_than_four_or_unknown_ref_is_not_found(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "abcd0001")
    for ref in ["abc", "zzzz", "abcd0001x", ""]:
        with pytest.raises(RefNotFound):
            registry.resolve(ref)


def test_prefix_with_like_wildcards_matches_literally(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "ab_d0001")
    commit(registry, "main", "abxd0002")
    assert registry.resolve("ab_d").id == "ab_d0001"
    with pytest.raises(RefNotFound):
        registry.resolve("ab%d")


def test_resolving_an_empty_branch_names_the_branch(registry: Registry) -> None:
    registry.create_branch("fresh")
    with pytest.raises(EmptyBranch, match="branch 'fresh' has no checkpoint yet"):
        registry.resolve("fresh")
    with pytest.raises(EmptyBranch):
        registry.create_branch("child", from_ref="fresh")


def test_get_requires_the_full_id(diamond: Registry) -> None:
    with pytest.raises(RefNotFound, match="'aaaa'"):
        diamond.get("aaaa")


# -- lineage -------------------------------------------------------------------------------


def test_parents_and_edge_kinds_are_exact(diamond: Registry) -> None:
    assert diamond.get("aaaa0001").parents == ()
    assert diamond.get("bbbb0002").parents == ("aaaa0001",)
    assert diamond.get("cccc0003").parents == ("bbbb0002",)
    assert diamond.get("dddd0004").parents == ("bbbb0002", "cccc0003")
    assert diamond.get("dddd0004").kind == "merge"
    kinds = {
        cid: [(e.parent, e.kind, e.position) for e in diamond.edges(cid)]
        for cid in ["aaaa0001", "bbbb0002", "cccc0003", "dddd0004"]
    }
    assert kinds == {
        "aaaa0001": [],
        "bbbb0002": [("aaaa0001", "continue", 0)],
        "cccc0003": [("bbbb0002", "branch", 0)],
        "dddd0004": [("bbbb0002", "merge", 0), ("cccc0003", "merge", 1)],
    }


def test_second_commit_after_a_branch_point_continues(diamond: Registry) -> None:
    commit(diamond, "side", "eeee0005")
    assert [(e.parent, e.kind) for e in diamond.edges("eeee0005")] == [("cccc0003", "continue")]


def test_log_follows_first_parents_across_the_branch_point(diamond: Registry) -> None:
    assert ids(diamond.log("main")) == ["dddd0004", "bbbb0002", "aaaa0001"]
    assert ids(diamond.log("side")) == ["cccc0003", "bbbb0002", "aaaa0001"]
    assert ids(diamond.log("main", limit=2)) == ["dddd0004", "bbbb0002"]
    assert diamond.log("main", limit=0) == []


def test_ancestors_are_every_ancestor_nearest_first(diamond: Registry) -> None:
    assert ids(diamond.ancestors("dddd0004")) == ["cccc0003", "bbbb0002", "aaaa0001"]
    assert ids(diamond.ancestors("side")) == ["bbbb0002", "aaaa0001"]
    assert diamond.ancestors("aaaa0001") == []


def test_descendants_are_every_descendant_nearest_first(diamond: Registry) -> None:
    assert ids(diamond.descendants("aaaa0001")) == ["bbbb0002", "cccc0003", "dddd0004"]
    assert ids(diamond.descendants("bbbb0002")) == ["cccc0003", "dddd0004"]
    assert diamond.descendants("main") == []


def test_lineage_orders_by_distance_before_age(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    commit(registry, "main", "bbbb0002")
    commit(registry, "main", "cccc0003")
    registry.create_branch("late", from_ref="aaaa0001")
    commit(registry, "late", "dddd0004")
    # dddd0004 is the newest but one edge away; cccc0003 is older but two edges away.
    assert ids(registry.descendants("aaaa0001")) == ["bbbb0002", "dddd0004", "cccc0003"]
    commit(registry, "main", "eeee0005", parents=["cccc0003", "dddd0004"], kind="merge")
    # Nearest first; at equal distance the newest first.
    assert ids(registry.ancestors("eeee0005")) == ["dddd0004", "cccc0003", "bbbb0002", "aaaa0001"]


def test_children_are_the_direct_children(diamond: Registry) -> None:
    assert ids(diamond.children("bbbb0002")) == ["cccc0003", "dddd0004"]
    assert ids(diamond.children("cccc0003")) == ["dddd0004"]
    assert diamond.children("dddd0004") == []


def test_checkpoints_lists_every_checkpoint_oldest_first(diamond: Registry) -> None:
    assert ids(diamond.checkpoints()) == ["aaaa0001", "bbbb0002", "cccc0003", "dddd0004"]


def test_depth_stops_the_walk_that_many_edges_away(diamond: Registry) -> None:
    assert ids(diamond.ancestors("dddd0004", depth=1)) == ["cccc0003", "bbbb0002"]
    assert ids(diamond.descendants("aaaa0001", depth=1)) == ["bbbb0002"]
    assert ids(diamond.descendants("aaaa0001", depth=2)) == ["bbbb0002", "cccc0003", "dddd0004"]
    assert diamond.ancestors("dddd0004", depth=0) == []


def test_lineage_records_equal_get_field_for_field(diamond: Registry) -> None:
    # The lineage reads build records from raw rows; get() goes through the ORM. Every field
    # must agree: merge parents in order, non-finite metrics, signatures, runs, pruned times.
    run = diamond.start_run("side", {"lr": 0.1})
    commit(
        diamond, "side", "eeee0005", objects={"o": 3}, metrics={"loss": math.nan,
        "val_accuracy": 0.5, "gain": -math.inf}, signature=["x", "y"], message="note",
        run_id=run.id, logical_bytes=10,
    )  # fmt: skip
    diamond.create_branch("dead", from_ref="aaaa0001")
    commit(diamond, "dead", "ffff0006", objects={"f": 1})
    diamond.delete_branch("dead")
    diamond.apply_gc(diamond.gc_plan())

    def as_json(records: list[CheckpointRecord]) -> list[dict[str, Any]]:
        return [r.to_json() for r in records]

    every = diamond.checkpoints()
    assert as_json(every) == as_json([diamond.get(r.id) for r in every])
    assert [r.id for r in every if r.pruned is not None] == ["ffff0006"]
    for records in (
        diamond.ancestors("eeee0005"),
        diamond.descendants("aaaa0001"),
        diamond.log("main"),
        diamond.children("bbbb0002"),
    ):
        assert records
        assert as_json(records) == as_json([diamond.get(r.id) for r in records])


# -- compare-and-swap ----------------------------------------------------------------------


def test_stale_expected_head_raises_head_moved_and_changes_nothing(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    commit(registry, "main", "bbbb0002")
    before = snapshot(registry)
    with pytest.raises(HeadMoved) as info:
        commit(registry, "main", "cccc0003", expected_head="aaaa0001", objects={"o": 7})
    assert str(info.value) == (
        "branch 'main' moved: expected head 'aaaa0001', found 'bbbb0002': "
        "resolve the branch again and retry the commit"
    )
    assert (info.value.branch, info.value.expected, info.value.actual) == (
        "main",
        "aaaa0001",
        "bbbb0002",
    )
    assert snapshot(registry) == before
    assert (
        commit(registry, "main", "cccc0003", expected_head="bbbb0002", objects={"o": 7}).new_bytes
        == 7
    )


def test_expected_head_none_means_the_branch_must_be_empty(registry: Registry) -> None:
    registry.create_branch("main")
    assert commit(registry, "main", "aaaa0001", expected_head=None).parents == ()
    with pytest.raises(HeadMoved, match="expected head \\(empty\\), found 'aaaa0001'"):
        commit(registry, "main", "bbbb0002", expected_head=None)
    assert ids(registry.checkpoints()) == ["aaaa0001"]


# -- bytes and dedup -----------------------------------------------------------------------


def test_new_bytes_counts_each_object_once_across_checkpoints(registry: Registry) -> None:
    registry.create_branch("main")
    registry.create_branch("other")
    a = commit(registry, "main", "aaaa0001", objects={"x": 100, "y": 20}, logical_bytes=120)
    b = commit(registry, "main", "bbbb0002", objects={"x": 100, "z": 3}, logical_bytes=103)
    c = commit(registry, "other", "cccc0003", objects={"x": 100, "y": 20, "z": 3})
    d = commit(registry, "other", "dddd0004", objects={})
    assert [a.new_bytes, b.new_bytes, c.new_bytes, d.new_bytes] == [120, 3, 0, 0]
    assert registry.get("bbbb0002").new_bytes == 3
    assert registry.branch_bytes("main") == (223, 123)
    assert registry.branch_bytes("other") == (0, 0)


# -- tags ----------------------------------------------------------------------------------


def test_tag_names_a_checkpoint_and_duplicates_are_refused(diamond: Registry) -> None:
    tag = diamond.tag("side", "v1")
    assert (tag.name, tag.checkpoint) == ("v1", "cccc0003")
    with pytest.raises(TagExists, match="tag 'v1' already exists"):
        diamond.tag("main", "v1")
    assert diamond.tags() == [tag]
    diamond.tag("aaaa", "v0")
    assert [(t.name, t.checkpoint) for t in diamond.tags()] == [
        ("v0", "aaaa0001"),
        ("v1", "cccc0003"),
    ]


def test_delete_tag_keeps_the_checkpoint(diamond: Registry) -> None:
    diamond.tag("side", "v1")
    diamond.delete_tag("v1")
    assert diamond.tags() == []
    assert diamond.get("cccc0003").id == "cccc0003"
    with pytest.raises(RefNotFound, match="tag 'v1' does not exist"):
        diamond.delete_tag("v1")


def test_invalid_tag_name_is_refused(diamond: Registry) -> None:
    with pytest.raises(InvalidName, match="invalid tag name 'v 1'"):
        diamond.tag("main", "v 1")
    assert diamond.tags() == []


# -- best ancestor -------------------------------------------------------------------------


def test_best_ancestor_picks_the_longest_shared_prefix(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001", signature=["conv", "relu", "fc10"])
    commit(registry, "main", "bbbb0002", signature=["conv", "relu", "conv", "fc10"])
    commit(registry, "main", "cccc0003", signature=["lstm"])
    commit(registry, "main", "dddd0004")  # no signature: never a candidate
    found = registry.best_ancestor(["conv", "relu", "conv", "fc2"])
    assert found is not None
    assert (found[0].id, found[1]) == ("bbbb0002", 3)
    found = registry.best_ancestor(["conv", "relu", "fc10", "extra"])
    assert found is not None
    assert (found[0].id, found[1]) == ("aaaa0001", 3)
    found = registry.best_ancestor(["lstm", "fc"])
    assert found is not None
    assert (found[0].id, found[1]) == ("cccc0003", 1)
    assert registry.best_ancestor(["gru"]) is None
    assert registry.best_ancestor([]) is None


def test_best_ancestor_breaks_ties_by_val_accuracy_then_newest(registry: Registry) -> None:
    registry.create_branch("main")
    sig = ["embed", "block", "head"]
    commit(registry, "main", "aaaa0001", signature=sig, metrics={"val_accuracy": 0.7})
    commit(registry, "main", "bbbb0002", signature=sig, metrics={"val_accuracy": 0.9})
    commit(registry, "main", "cccc0003", signature=sig, metrics={"val_accuracy": 0.8})
    commit(registry, "main", "dddd0004", signature=sig)
    found = registry.best_ancestor(["embed", "block", "other"])
    assert found is not None
    assert (found[0].id, found[1]) == ("bbbb0002", 2)

    registry.create_branch("plain")
    commit(registry, "plain", "eeee0005", signature=["x", "y"])
    commit(registry, "plain", "ffff0006", signature=["x", "y"])
    found = registry.best_ancestor(["x", "y"])
    assert found is not None
    assert (found[0].id, found[1]) == ("ffff0006", 2)


# -- runs ----------------------------------------------------------------------------------


def test_run_lifecycle(registry: Registry) -> None:
    registry.create_branch("main")
    registry.create_branch("other")
    run = registry.start_run("main", {"lr": 0.1, "layers": (1, 2)}, ray_job_id="raysubmit_1")
    assert (run.branch, run.status, run.error, run.finished) == ("main", "running", None, None)
    assert run.config == {"lr": 0.1, "layers": [1, 2]}
    ckpt = commit(registry, "main", "aaaa0001", run_id=run.id)
    assert registry.get(ckpt.id).run_id == run.id
    done = registry.finish_run(run.id, status="succeeded")
    assert (done.id, done.status, done.ray_job_id) == (run.id, "succeeded", "raysubmit_1")
    assert done.finished is not None and done.finished >= done.created
    failed = registry.finish_run(registry.start_run("other", {}).id, status="failed", error="OOM")
    assert (failed.status, failed.error) == ("failed", "OOM")
    assert [r.id for r in registry.runs()] == [run.id, failed.id]
    assert registry.runs("main") == [done]
    assert registry.runs("nope") == []


def test_runs_refuse_unknown_ids_branches_and_statuses(registry: Registry) -> None:
    registry.create_branch("main")
    with pytest.raises(RunNotFound, match="run 999 does not exist"):
        registry.finish_run(999, status="failed")
    with pytest.raises(BranchNotFound):
        registry.start_run("nope", {})
    run = registry.start_run("main", {})
    with pytest.raises(ValueError, match="'done'"):
        registry.finish_run(run.id, status="done")
    with pytest.raises(RunNotFound):
        commit(registry, "main", "aaaa0001", run_id=999)
    assert registry.checkpoints() == []
    assert registry.runs() == [run]


# -- datetimes, JSON, errors ---------------------------------------------------------------


def test_every_datetime_is_aware_utc(registry: Registry) -> None:
    start = datetime.now(timezone.utc) - timedelta(seconds=5)
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001")
    registry.tag("main", "v1")
    run = registry.finish_run(registry.start_run("main", {}).id, status="succeeded")
    stamps = [
        registry.get_branch("main").created,
        registry.resolve("main").created,
        registry.log("main")[0].created,
        registry.tags()[0].created,
        registry.runs()[0].created,
        run.finished,
    ]
    for stamp in stamps:
        assert stamp is not None
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert start <= stamp <= datetime.now(timezone.utc) + timedelta(seconds=5)


def test_to_json_is_json_safe_and_complete(diamond: Registry) -> None:
    record = diamond.resolve("main")
    data = json.loads(json.dumps(record.to_json(), allow_nan=False))
    assert {
        "id",
        "branch",
        "step",
        "parents",
        "created",
        "metrics",
        "manifest",
        "logical_bytes",
        "new_bytes",
        "kind",
    } <= set(data)
    assert data["parents"] == ["bbbb0002", "cccc0003"]
    assert datetime.fromisoformat(data["created"]) == record.created
    branch = json.loads(json.dumps(diamond.get_branch("side").to_json()))
    assert (branch["name"], branch["head"], branch["base"]) == ("side", "cccc0003", "bbbb0002")


def test_non_finite_metrics_round_trip(registry: Registry) -> None:
    registry.create_branch("main")
    commit(registry, "main", "aaaa0001", metrics={"loss": math.nan, "grad": math.inf, "acc": 1})
    metrics = registry.get("aaaa0001").metrics
    assert math.isnan(metrics["loss"]) and metrics["grad"] == math.inf and metrics["acc"] == 1.0
    assert registry.get("aaaa0001").to_json()["metrics"] == {
        "loss": "NaN",
        "grad": "Infinity",
        "acc": 1.0,
    }


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (BranchNotFound("branch 'x' does not exist"), LookupError),
        (RefNotFound("no ref"), LookupError),
        (AmbiguousRef("two"), LookupError),
        (EmptyBranch("empty"), LookupError),
        (RunNotFound("run 1"), LookupError),
        (BranchExists("exists"), FileExistsError),
        (TagExists("exists"), FileExistsError),
        (CheckpointExists("exists"), FileExistsError),
        (InvalidName("bad"), ValueError),
        (HeadMoved("moved", branch="b", expected="x", actual="y"), RegistryError),
    ],
)
def test_errors_subclass_their_builtin_and_pickle(error: Exception, builtin: type) -> None:
    assert isinstance(error, RegistryError) and isinstance(error, builtin)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error) and str(clone) == str(error)
    assert getattr(clone, "__dict__", {}) == getattr(error, "__dict__", {})
