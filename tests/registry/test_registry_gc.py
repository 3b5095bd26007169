"""Lineage-aware garbage collection, lowest common ancestors and merges."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tlreg.registry import (
    BeingCollected,
    CheckpointPruned,
    GcPlan,
    NotCollectable,
    Registry,
)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def commit(reg: Registry, branch: str, cid: str, objects: dict[str, int], **kwargs: object):  # type: ignore[no-untyped-def]
    return reg.commit(branch, cid, step=0, objects=objects, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def forked(registry: Registry) -> Registry:
    """main: a <- b <- c (head), tag 'v1' on a; exp: branched at b, d <- e; dead: branched at a,
    f, then deleted. Objects: 'shared' everywhere, one own object per checkpoint."""
    registry.create_branch("main")
    for cid in ("a", "b", "c"):
        commit(registry, "main", f"ck-{cid}", {"shared": 100, f"o-{cid}": 1})
    registry.tag("ck-a", "v1")
    registry.create_branch("exp", from_ref="ck-b")
    for cid in ("d", "e"):
        commit(registry, "exp", f"ck-{cid}", {"shared": 100, f"o-{cid}": 1})
    registry.create_branch("dead", from_ref="ck-a")
    commit(registry, "dead", "ck-f", {"shared": 100, "o-f": 1, "only-f": 7})
    registry.delete_branch("dead")
    return registry


def test_gc_without_keep_last_prunes_only_what_no_live_branch_or_tag_reaches(
    forked: Registry,
) -> None:
    plan = forked.gc_plan(now=T0)
    assert plan.prune == ("ck-f",)
    assert plan.objects == (("o-f", 1), ("only-f", 7))
    assert plan.nbytes == 8
    assert (plan.orphan_objects, plan.orphan_manifests, plan.waiting) == ((), (), 0)


def test_gc_keep_last_keeps_heads_bases_tags_and_the_newest_per_branch(forked: Registry) -> None:
    plan = forked.gc_plan(keep_last=1, now=T0)
    # kept: heads ck-c, ck-e; exp's base ck-b; dead is gone; tag v1 on ck-a.
    assert plan.prune == ("ck-d", "ck-f")
    assert plan.objects == (("o-d", 1), ("o-f", 1), ("only-f", 7))
    assert forked.gc_plan(keep_last=2, now=T0).prune == ("ck-f",)


def test_apply_gc_prunes_and_lineage_stays_whole(forked: Registry) -> None:
    done = forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))
    assert done.prune == ("ck-d", "ck-f")
    pruned = forked.resolve("ck-d")
    assert pruned.pruned is not None and pruned.pruned.tzinfo is not None
    assert json.loads(json.dumps(pruned.to_json()))["pruned"] == pruned.pruned.isoformat()
    assert forked.resolve("ck-c").pruned is None
    assert [r.id for r in forked.log("exp")] == ["ck-e", "ck-d", "ck-b", "ck-a"]
    assert [r.id for r in forked.descendants("ck-a")] == ["ck-b", "ck-f", "ck-c", "ck-d", "ck-e"]
    # Planned again, nothing more to prune; the doomed objects are planned until forgotten.
    again = forked.gc_plan(keep_last=1, now=T0)
    assert again.prune == ()
    assert again.objects == done.objects


def test_forget_objects_after_deletion_drops_them_and_is_idempotent(forked: Registry) -> None:
    done = forked.apply_gc(forked.gc_plan(now=T0))
    assert forked.objects_of("ck-f") == {"o-f": 1, "only-f": 7, "shared": 100}
    forked.forget_objects([h for h, _ in done.objects])
    forked.forget_objects([h for h, _ in done.objects])
    assert forked.objects_of("ck-f") == {"shared": 100}
    assert forked.gc_plan(now=T0).objects == ()
    # A later save may write and commit the same content again; it counts as new bytes.
    assert commit(forked, "main", "ck-g", {"only-f": 7}).new_bytes == 7


def test_forget_objects_refuses_a_live_object_and_changes_nothing(forked: Registry) -> None:
    forked.apply_gc(forked.gc_plan(now=T0))
    with pytest.raises(NotCollectable, match=r"^object 'shared' was not handed out by apply_gc"):
        forked.forget_objects(["o-f", "shared"])
    assert forked.objects_of("ck-f") == {"o-f": 1, "only-f": 7, "shared": 100}


def test_commit_referencing_a_doomed_object_is_refused_until_forgotten(forked: Registry) -> None:
    forked.apply_gc(forked.gc_plan(now=T0))
    head = forked.get_branch("main")
    with pytest.raises(BeingCollected, match=r"references store keys .*\(only-f\): save .*"):
        commit(forked, "main", "ck-g", {"shared": 100, "only-f": 7})
    assert forked.get_branch("main") == head
    forked.forget_objects(["o-f", "only-f"])
    assert commit(forked, "main", "ck-g", {"shared": 100, "only-f": 7}).new_bytes == 7


def test_apply_gc_keeps_what_became_live_after_planning(forked: Registry) -> None:
    plan = forked.gc_plan(keep_last=1, now=T0)
    forked.tag("ck-d", "keep-me")  # ck-d is now tagged ...
    commit(forked, "main", "ck-g", {"only-f": 7})  # ... and only-f referenced again
    done = forked.apply_gc(plan)
    assert done.prune == ("ck-f",)
    assert done.objects == (("o-f", 1),)


def test_pruned_checkpoints_cannot_be_branched_from_or_tagged(forked: Registry) -> None:
    forked.apply_gc(forked.gc_plan(now=T0))
    with pytest.raises(CheckpointPruned, match=r"^checkpoint 'ck-f' was pruned .*cannot branch"):
        forked.create_branch("revive", from_ref="ck-f")
    with pytest.raises(CheckpointPruned, match=r"cannot tag it 'x'"):
        forked.tag("ck-f", "x")
    assert [b.name for b in forked.branches()] == ["exp", "main"]
    assert [t.name for t in forked.tags()] == ["v1"]


def test_best_ancestor_skips_pruned_checkpoints(registry: Registry) -> None:
    registry.create_branch("a")
    registry.commit("a", "deep", step=0, objects={}, signature=["x", "y", "z"])
    registry.delete_branch("a")
    registry.create_branch("b")
    registry.commit("b", "shallow", step=0, objects={}, signature=["x", "q"])
    found = registry.best_ancestor(["x", "y", "z"])
    assert found is not None and (found[0].id, found[1]) == ("deep", 3)
    registry.apply_gc(registry.gc_plan(now=T0))
    found = registry.best_ancestor(["x", "y", "z"])
    assert found is not None and (found[0].id, found[1]) == ("shallow", 1)


def test_orphans_are_deleted_only_after_the_grace_period(forked: Registry) -> None:
    store = {"shared", "o-a", "lost-1", "lost-2"}
    manifests = {"ck-a", "ck-c", "crashed"}
    first = forked.gc_plan(now=T0, grace=HOUR, store_objects=store, store_manifests=manifests)
    assert (first.orphan_objects, first.orphan_manifests, first.waiting) == ((), (), 3)
    # lost-2 is committed meanwhile: forgotten as a candidate, never deleted.
    commit(forked, "main", "ck-g", {"lost-2": 3})
    later = T0 + HOUR
    second = forked.gc_plan(now=later, grace=HOUR, store_objects=store, store_manifests=manifests)
    assert second.orphan_objects == ("lost-1",)
    assert second.orphan_manifests == ("crashed",)
    assert second.waiting == 0
    # Seen again later, a key left the store in between: its clock starts over.
    forked.gc_plan(now=later, store_objects=store - {"lost-1"})
    third = forked.gc_plan(now=later + HOUR / 2, grace=HOUR, store_objects=store)
    assert (third.orphan_objects, third.orphan_manifests, third.waiting) == ((), ("crashed",), 1)


def test_orphan_protocol_dooms_then_forgets(forked: Registry) -> None:
    forked.gc_plan(now=T0, store_objects=["lost"], store_manifests=["crashed"])
    plan = forked.gc_plan(now=T0 + 2 * HOUR, grace=HOUR)
    done = forked.apply_gc(plan)
    assert (done.orphan_objects, done.orphan_manifests) == (("lost",), ("crashed",))
    with pytest.raises(BeingCollected, match="crashed"):
        forked.commit("main", "crashed", step=9, objects={})
    # A crash here: the next plan still hands the doomed keys out, without waiting.
    assert forked.gc_plan(now=T0).orphan_objects == ("lost",)
    forked.forget_objects(["lost"], manifests=["crashed"])
    after = forked.gc_plan(now=T0 + 3 * HOUR, grace=HOUR)
    assert (after.orphan_objects, after.orphan_manifests, after.waiting) == ((), (), 0)
    assert forked.commit("main", "crashed", step=9, objects={}).id == "crashed"


def test_gc_plan_refuses_bad_arguments(registry: Registry) -> None:
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        registry.gc_plan(keep_last=0)
    with pytest.raises(ValueError, match="grace must not be negative"):
        registry.gc_plan(grace=-HOUR)
    with pytest.raises(ValueError, match="timezone-aware"):
        registry.gc_plan(now=datetime(2025, 1, 1))


def test_gc_plan_to_json_is_json_safe(forked: Registry) -> None:
    plan = forked.gc_plan(keep_last=1, now=T0, grace=HOUR)
    assert isinstance(plan, GcPlan)
    assert json.loads(json.dumps(plan.to_json())) == {
        "created": "2025-01-01T00:00:00+00:00",
        "keep_last": 1,
        "grace_seconds": 3600.0,
        "prune": ["ck-d", "ck-f"],
        "objects": [
            {"hash": "o-d", "nbytes": 1},
            {"hash": "o-f", "nbytes": 1},
            {"hash": "only-f", "nbytes": 7},
        ],
        "nbytes": 9,
        "orphan_objects": [],
        "orphan_manifests": [],
        "waiting": 0,
        "abandoned": 0,
        "repacked": [],
    }


# -- repacking: candidates and relocation --------------------------------------------------


def test_repack_candidates_are_objects_both_pruned_and_kept_checkpoints_reference(
    forked: Registry,
) -> None:
    assert forked.repack_candidates() == {}  # nothing pruned yet
    forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))  # prunes ck-d and ck-f
    # 'shared' is referenced by pruned ck-d/ck-f and by the kept ck-a, ck-b, ck-c, ck-e
    assert forked.repack_candidates() == {"shared": (100, ["ck-a", "ck-b", "ck-c", "ck-e"])}


def test_relocate_points_kept_checkpoints_at_the_new_objects(forked: Registry) -> None:
    forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))
    users = forked.repack_candidates()["shared"][1]
    assert forked.relocate([("shared", users, {"new-1": 40, "new-2": 10})]) == ["shared"]
    assert forked.objects_of("ck-c") == {"o-c": 1, "new-1": 40, "new-2": 10}
    assert "shared" in forked.objects_of("ck-d")  # a pruned checkpoint keeps its references
    plan = forked.gc_plan(keep_last=1, now=T0)
    assert ("shared", 100) in plan.objects
    assert forked.repack_candidates() == {}


def test_relocate_skips_an_object_a_checkpoint_the_repack_did_not_read_references(
    forked: Registry,
) -> None:
    forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))
    users = forked.repack_candidates()["shared"][1]
    # a save committed after the repack read the manifests, deduplicated against 'shared'
    commit(forked, "main", "ck-g", {"shared": 100, "o-g": 1})
    assert forked.relocate([("shared", users, {"new": 40})]) == []
    assert "shared" in forked.objects_of("ck-c") and "new" not in forked.objects_of("ck-c")
    assert forked.relocate([("shared", [*users, "ck-g"], {"new": 40})]) == ["shared"]
    assert forked.objects_of("ck-g") == {"o-g": 1, "new": 40}


def test_relocate_refuses_a_target_that_gc_is_deleting(forked: Registry) -> None:
    done = forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))  # dooms o-d, o-f, only-f
    users = forked.repack_candidates()["shared"][1]
    assert ("o-d", 1) in done.objects
    assert forked.relocate([("shared", users, {"o-d": 1})]) == []
    assert "shared" in forked.objects_of("ck-c")


# -- lowest common ancestor and merges ------------------------------------------------------


def test_common_ancestor_of_two_branches_is_the_branch_point(forked: Registry) -> None:
    lca = forked.common_ancestor("main", "exp")
    assert lca is not None and lca.id == "ck-b"
    assert forked.common_ancestor("ck-e", "ck-f") == forked.get("ck-a")
    assert forked.common_ancestor("ck-a", "ck-c") == forked.get("ck-a")  # an ancestor itself
    assert forked.common_ancestor("main", "main") == forked.get("ck-c")


def test_common_ancestor_of_unrelated_roots_is_none(registry: Registry) -> None:
    registry.create_branch("x")
    registry.create_branch("y")
    commit(registry, "x", "root-x", {})
    commit(registry, "y", "root-y", {})
    assert registry.common_ancestor("x", "y") is None


def test_merge_is_one_checkpoint_with_both_lineages(forked: Registry) -> None:
    merged = commit(forked, "main", "ck-m", {"o-m": 1}, parents=["ck-c", "ck-e"], kind="merge")
    assert merged.parents == ("ck-c", "ck-e")
    assert [r.id for r in forked.ancestors("ck-m")] == ["ck-e", "ck-c", "ck-d", "ck-b", "ck-a"]
    assert {r.id for r in forked.descendants("ck-d")} == {"ck-e", "ck-m"}
    # Both merged lines are now common history: the LCA with exp's head is that head.
    assert forked.common_ancestor("ck-m", "exp") == forked.get("ck-e")
    # Deleting exp breaks nothing: its checkpoints stay reachable through the merge.
    forked.delete_branch("exp")
    assert forked.gc_plan(now=T0).prune == ("ck-f",)


def test_criss_cross_merge_picks_a_lowest_common_ancestor(registry: Registry) -> None:
    # root <- x1, root <- y1; x2 = merge(x1, y1); y2 = merge(y1, x1): x1 and y1 are both
    # lowest common ancestors of x2 and y2; root is common but not lowest.
    registry.create_branch("x")
    commit(registry, "x", "root", {})
    registry.create_branch("y", from_ref="root")
    commit(registry, "x", "x1", {})
    commit(registry, "y", "y1", {})
    commit(registry, "x", "x2", {}, parents=["x1", "y1"], kind="merge")
    commit(registry, "y", "y2", {}, parents=["y1", "x1"], kind="merge")
    lca = registry.common_ancestor("x2", "y2")
    assert lca is not None and lca.id in {"x1", "y1"}
    assert registry.common_ancestor("x2", "y1") == registry.get("y1")


def test_a_commit_naming_a_repacked_object_also_references_where_its_bytes_went(
    forked: Registry,
) -> None:
    forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))
    users = forked.repack_candidates()["shared"][1]
    assert forked.relocate([("shared", users, {"new": 40})]) == ["shared"]
    # a save that deduplicated against 'shared' before the repack deleted it commits now
    commit(forked, "main", "late", {"shared": 100, "o-late": 1})
    assert forked.objects_of("late") == {"shared": 100, "o-late": 1, "new": 40}
    # repacked again: the chain is followed
    forked.apply_gc(forked.gc_plan(keep_last=1, now=T0))
    forked.relocate([("new", ["ck-a", "ck-b", "ck-c", "ck-e", "late"], {"newer": 20})])
    commit(forked, "main", "later", {"shared": 100})
    assert forked.objects_of("later") == {"shared": 100, "new": 40, "newer": 20}
