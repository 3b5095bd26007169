"""Tier state (schema v10): a checkpoint is "local" (only on the node-local tiers of its
nodes), "shared" (in the shared store) or "lost" (a node holding a local-only share is gone);
the restorable head skips lost and pruned checkpoints; runs record each rank's node. On SQLite
and PostgreSQL alike."""

from __future__ import annotations

import pickle
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from test_registry_migrations import engine_for, make_v1, stored_version

from tlreg.registry import CheckpointLost, RefNotFound, Registry, RunNotFound
from tlreg.registry import migrations as mig
from tlreg.registry.models import SCHEMA_VERSION


def make_v9(url: str) -> None:
    """A registry with data exactly as tlreg with schema version 9 left it."""
    make_v1(url, with_data=True)
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            for version in range(2, 10):
                mig.STEPS[version](conn)
            conn.execute(text("UPDATE meta SET value = '9' WHERE key = 'schema_version'"))
    finally:
        engine.dispose()


def test_upgrade_from_v9_makes_every_checkpoint_shared_and_local_commits_work(
    registry_url: str,
) -> None:
    make_v9(registry_url)
    assert Registry.upgrade(registry_url) == (9, SCHEMA_VERSION)
    assert stored_version(registry_url) == str(SCHEMA_VERSION)
    with Registry(registry_url) as reg:
        assert [(r.id, r.tier, r.nodes) for r in reg.log("main")] == [
            ("bbbb0002", "shared", ()),
            ("aaaa0001", "shared", ()),
        ]
        assert reg.runs()[0].nodes == {}
        reg.commit("main", "cccc0003", step=3, objects={"h3": 1}, tier="local", nodes=["n1"])
        reg.record_run_nodes(1, {0: "n1"})
        assert reg.local_checkpoints("main")[0].id == "cccc0003"
        assert reg.runs()[0].nodes == {0: "n1"}


def test_a_local_commit_is_visible_with_its_nodes_and_moves_the_head(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={"h1": 4})
    made = registry.commit(
        "main", "b2", step=2, objects={"h2": 8}, tier="local", nodes=["node-b", "node-a", "node-b"]
    )
    assert (made.tier, made.nodes) == ("local", ("node-a", "node-b"))
    assert registry.get_branch("main").head == "b2"
    for found in (registry.get("b2"), registry.resolve("main"), registry.log("main")[0]):
        assert (found.id, found.tier, found.nodes) == ("b2", "local", ("node-a", "node-b"))
    assert registry.get("a1").tier == "shared" and registry.get("a1").nodes == ()
    assert registry.get("b2").to_json()["tier"] == "local"
    assert registry.get("b2").to_json()["nodes"] == ["node-a", "node-b"]
    assert registry.objects_of("b2") == {"h2": 8}  # gc keeps a local checkpoint's objects


def test_ancestors_read_tier_and_nodes_with_the_other_deferred_fields(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={}, tier="local", nodes=["n1"])
    registry.commit("main", "b2", step=2, objects={})
    registry.commit("main", "c3", step=3, objects={})
    registry.mark_nodes_lost(["n1"])
    found = registry.ancestors("c3")
    shipped = pickle.loads(pickle.dumps(registry.ancestors("c3")))
    for answer in (found, shipped):
        assert [(r.id, r.tier, r.nodes) for r in answer] == [
            ("b2", "shared", ()),
            ("a1", "lost", ("n1",)),
        ]
    assert [(r.id, r.tier) for r in registry.checkpoints()] == [
        ("a1", "lost"), ("b2", "shared"), ("c3", "shared"),
    ]  # fmt: skip


def test_mark_shared_makes_a_local_checkpoint_shared_once_and_forgets_its_nodes(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={}, tier="local", nodes=["n1", "n2"])
    shared = registry.mark_shared("a1")
    assert (shared.id, shared.tier, shared.nodes) == ("a1", "shared", ())
    assert registry.mark_shared("a1") == shared  # idempotent
    assert registry.local_checkpoints("main") == []
    assert registry.mark_nodes_lost(["n1"]) == []  # a shared checkpoint is never lost


def test_verify_all_checks_only_checkpoints_in_the_shared_store(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={})
    registry.commit("main", "a2", step=2, objects={}, tier="local", nodes=["n1"])
    registry.commit("main", "a3", step=3, objects={}, tier="local", nodes=["n2"])
    registry.mark_nodes_lost(["n2"])
    assert registry.kept_manifests() == ["a1"]  # a local or lost one's manifest is not there
    registry.mark_shared("a2")
    assert registry.kept_manifests() == ["a1", "a2"]


def test_a_lost_checkpoint_that_was_drained_after_all_becomes_shared(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={}, tier="local", nodes=["n1"])
    assert [r.id for r in registry.mark_nodes_lost(["n1"])] == ["a1"]
    assert registry.restorable_head("main") is None
    assert registry.mark_shared("a1").tier == "shared"
    restorable = registry.restorable_head("main")
    assert restorable is not None and restorable.id == "a1"


def test_a_lost_checkpoint_is_refused_where_a_live_one_is_needed_in_one_line(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={})
    registry.commit("main", "l2", step=2, objects={}, tier="local", nodes=["n1"])
    assert registry.resolve_live("main", "restore it").id == "l2"  # local: restorable
    registry.mark_nodes_lost(["n1"])
    for call in (
        lambda: registry.resolve_live("main", "restore it"),
        lambda: registry.tag("l2", "v1"),
        lambda: registry.create_branch("side", from_ref="l2"),
    ):
        with pytest.raises(CheckpointLost) as e:
            call()
        assert str(e.value).startswith("checkpoint 'l2' is lost: ")
        assert "\n" not in str(e.value)
    assert registry.tags() == [] and [b.name for b in registry.branches()] == ["main"]
    assert registry.resolve("main").id == "l2"  # still in the lineage, as lost


def test_mark_nodes_lost_loses_only_local_checkpoints_with_a_share_on_those_nodes(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    registry.create_branch("side")
    registry.commit("main", "s1", step=1, objects={})
    registry.commit("main", "l2", step=2, objects={}, tier="local", nodes=["n1", "n2"])
    registry.commit("main", "l3", step=3, objects={}, tier="local", nodes=["n2"])
    registry.commit("side", "l4", step=4, objects={}, tier="local", nodes=["n1"])
    registry.commit("main", "l5", step=5, objects={}, tier="local", nodes=["n3"])
    lost = registry.mark_nodes_lost(iter(["n1", "gone-node"]))
    assert [(r.id, r.tier, r.nodes) for r in lost] == [
        ("l2", "lost", ("n1", "n2")),
        ("l4", "lost", ("n1",)),
    ]
    assert registry.mark_nodes_lost(["n1"]) == []  # already lost: not returned again
    assert [(r.id, r.tier) for r in registry.log("main")] == [
        ("l5", "local"), ("l3", "local"), ("l2", "lost"), ("s1", "shared"),
    ]  # fmt: skip
    assert registry.mark_nodes_lost([]) == []


def test_restorable_head_is_the_newest_first_parent_ancestor_neither_lost_nor_pruned(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    assert registry.restorable_head("main") is None  # empty branch
    registry.commit("main", "s1", step=1, objects={"h1": 1})
    registry.commit("main", "s2", step=2, objects={"h2": 1})
    registry.commit("main", "l3", step=3, objects={}, tier="local", nodes=["n1"])
    registry.commit("main", "l4", step=4, objects={}, tier="local", nodes=["n2"])
    head = registry.restorable_head("main")
    assert head is not None and (head.id, head.tier, head.nodes) == ("l4", "local", ("n2",))
    registry.mark_nodes_lost(["n2"])
    head = registry.restorable_head("main")
    assert head is not None and head.id == "l3"
    registry.mark_nodes_lost(["n1"])
    head = registry.restorable_head("main")
    assert head is not None and head.id == "s2"
    assert registry.get_branch("main").head == "l4"  # the head itself does not move


def test_restorable_head_skips_a_pruned_checkpoint(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "s1", step=1, objects={"h1": 1})
    registry.commit("main", "s2", step=2, objects={"h2": 1})
    registry.commit("main", "l3", step=3, objects={}, tier="local", nodes=["n1"])
    engine = engine_for(registry.url)
    try:
        with engine.begin() as conn:  # as garbage collection prunes it
            conn.execute(text("UPDATE checkpoint SET pruned = created WHERE id = 's2'"))
    finally:
        engine.dispose()
    registry.mark_nodes_lost(["n1"])
    head = registry.restorable_head("main")
    assert head is not None and head.id == "s1"


def test_local_checkpoints_are_the_branch_local_ones_newest_first_optionally_per_node(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    registry.create_branch("side")
    registry.commit("main", "l1", step=1, objects={}, tier="local", nodes=["n1", "n2"])
    registry.commit("main", "s2", step=2, objects={})
    registry.commit("main", "l3", step=3, objects={}, tier="local", nodes=["n2"])
    registry.commit("side", "l4", step=4, objects={}, tier="local", nodes=["n1"])
    registry.commit("main", "l5", step=5, objects={}, tier="local", nodes=["n3"])
    registry.mark_nodes_lost(["n3"])
    assert [r.id for r in registry.local_checkpoints("main")] == ["l3", "l1"]
    assert [r.id for r in registry.local_checkpoints("main", node="n1")] == ["l1"]
    assert [r.id for r in registry.local_checkpoints("main", "n2")] == ["l3", "l1"]
    assert registry.local_checkpoints("main", "n9") == []
    assert [r.nodes for r in registry.local_checkpoints("main")] == [("n2",), ("n1", "n2")]


def test_record_run_nodes_replaces_the_runs_nodes_and_runs_show_them(registry: Registry) -> None:
    registry.create_branch("main")
    run = registry.start_run("main", {"lr": 0.1})
    other = registry.start_run("main", {})
    assert run.nodes == {}
    assert registry.record_run_nodes(run.id, {0: "n1", 1: "n2"}).nodes == {0: "n1", 1: "n2"}
    registry.record_run_nodes(run.id, {1: "n3", 0: "n1"})  # a restarted worker group moved
    assert [r.nodes for r in registry.runs()] == [{0: "n1", 1: "n3"}, {}]
    assert registry.runs()[0].to_json()["nodes"] == {"0": "n1", "1": "n3"}
    summary = registry.run_summaries("main")[0]
    assert summary.to_json()["nodes"] == {"0": "n1", "1": "n3"}
    assert registry.finish_run(run.id, status="succeeded").nodes == {0: "n1", 1: "n3"}
    assert registry.finish_run(other.id, status="failed").nodes == {}


def test_bad_tier_input_is_refused_in_one_line_and_changes_nothing(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a1", step=1, objects={})
    run = registry.start_run("main", {})
    refused: list[tuple[type[Exception], object]] = [
        (ValueError, lambda: registry.commit("main", "x", step=2, objects={}, tier="lost")),
        (ValueError, lambda: registry.commit("main", "x", step=2, objects={}, tier="local")),
        (ValueError, lambda: registry.commit("main", "x", step=2, objects={}, nodes=["n1"])),
        (ValueError, lambda: registry.commit("main", "x", step=2, objects={}, tier="local",
                                             nodes="n1")),
        (RefNotFound, lambda: registry.mark_shared("nope")),
        (RefNotFound, lambda: registry.mark_shared("")),
        (RunNotFound, lambda: registry.record_run_nodes(run.id + 100, {0: "n1"})),
        (ValueError, lambda: registry.record_run_nodes(run.id, {-1: "n1"})),
        (ValueError, lambda: registry.record_run_nodes(run.id, {0: ""})),
    ]  # fmt: skip
    for error, call in refused:
        with pytest.raises(error) as e:
            call()  # type: ignore[operator]
        assert "\n" not in str(e.value)
    with pytest.raises(RefNotFound) as missing:
        registry.mark_shared("nope")
    assert str(missing.value).startswith("checkpoint 'nope' does not exist: ")
    assert [r.id for r in registry.checkpoints()] == ["a1"]
    assert registry.get_branch("main").head == "a1"
    assert registry.runs()[0].nodes == {}


class TierMachine(RuleBasedStateMachine):
    """Commits (shared or local, on random nodes), mark_shared and mark_nodes_lost in random
    order on one branch: restorable_head is always the newest checkpoint of the first-parent
    chain that is not lost. Examples share one database: names (of checkpoints, the branch
    and the nodes) carry a fresh prefix."""

    NODES = ("n1", "n2", "n3")

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.reg = registry
        self.ns = uuid.uuid4().hex[:8]
        self.branch = f"b-{self.ns}"
        self.reg.create_branch(self.branch)
        self.chain: list[str] = []  # the first-parent chain, oldest first
        self.tier: dict[str, str] = {}
        self.nodes: dict[str, set[str]] = {}

    @rule(
        local=st.booleans(),
        nodes=st.sets(st.sampled_from(NODES), min_size=1, max_size=2),
        branch_off=st.integers(min_value=0, max_value=3),
    )
    def commit(self, local: bool, nodes: set[str], branch_off: int) -> None:
        cid = f"{self.ns}-{len(self.tier):03d}"
        # Now and then commit on an older checkpoint (a resume from the restorable head):
        # the chain from the new head leaves the newer ones behind.
        parents = None
        if branch_off == 0 and len(self.chain) > 1:
            parents = [self.chain[-2]]
            self.chain = self.chain[:-1]
        self.reg.commit(
            self.branch,
            cid,
            step=len(self.tier),
            parents=parents,
            objects={},
            tier="local" if local else "shared",
            nodes=[f"{self.ns}-{n}" for n in sorted(nodes)] if local else (),
        )
        self.chain.append(cid)
        self.tier[cid] = "local" if local else "shared"
        self.nodes[cid] = set(nodes) if local else set()

    @precondition(lambda self: bool(self.tier))
    @rule(data=st.data())
    def mark_shared(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.tier)), label="checkpoint")
        assert self.reg.mark_shared(cid).tier == "shared"
        self.tier[cid] = "shared"
        self.nodes[cid] = set()

    @rule(gone=st.sets(st.sampled_from(NODES), max_size=2))
    def mark_nodes_lost(self, gone: set[str]) -> None:
        expected = sorted(c for c, t in self.tier.items() if t == "local" and self.nodes[c] & gone)
        lost = self.reg.mark_nodes_lost(f"{self.ns}-{n}" for n in gone)
        assert sorted(r.id for r in lost) == expected
        for c in expected:
            self.tier[c] = "lost"

    @invariant()
    def restorable_head_is_the_newest_non_lost_of_the_chain(self) -> None:
        alive = [c for c in self.chain if self.tier[c] != "lost"]
        found = self.reg.restorable_head(self.branch)
        assert (found.id if found else None) == (alive[-1] if alive else None)
        if found is not None:
            assert found.tier == self.tier[found.id]

    @invariant()
    def local_checkpoints_are_the_local_ones_newest_first(self) -> None:
        local = [c for c in sorted(self.tier) if self.tier[c] == "local"]
        assert [r.id for r in self.reg.local_checkpoints(self.branch)] == local[::-1]


def test_restorable_head_is_always_the_newest_non_lost_checkpoint_of_the_chain(
    registry: Registry,
) -> None:
    run_state_machine_as_test(
        lambda: TierMachine(registry),
        settings=settings(
            max_examples=12,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
