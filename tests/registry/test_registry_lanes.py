"""Lineage over lanes (schema v3): ancestors and descendants read a few lanes by index range
instead of walking every edge. Whatever the graph (branch points in the middle of a lane, forks
on one branch, merges whatever their ``kind``), the answers must be exactly those of a walk of
the edges, with every record equal to what ``get`` returns."""

from __future__ import annotations

import pickle
from collections import deque
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, text, update

from tlreg.registry import AmbiguousRef, EmptyBranch, RecordList, RefNotFound, Registry
from tlreg.registry import models as m
from tlreg.registry.migrations import lane_labels

# (id, branch, parents or None for the branch head); committed in this order.
GRAPH: list[tuple[str, str, list[str] | None]] = [
    ("m0", "main", None),
    ("m1", "main", None),
    ("m2", "main", None),
    ("m3", "main", None),
    ("s0", "side", ["m1"]),  # branch point in the middle of main's lane
    ("s1", "side", None),
    ("m4", "main", None),
    ("f0", "main", ["m2"]),  # a fork on main itself: m2 is not the end of its lane any more
    ("f1", "main", None),
    ("x0", "main", ["f1", "s1"]),  # a merge committed with the default kind ("train")
    ("x1", "main", None),
    ("y0", "side", ["s1", "m4", "m0"]),  # a three-way merge whose first parent ends its lane
    ("y1", "side", None),
    ("t0", "twin", ["y1"]),  # two branches started from the same checkpoint
    ("u0", "twin2", ["y1"]),
    ("y2", "side", None),
    ("r0", "other", None),  # a second root
    ("r1", "other", None),
]


@pytest.fixture
def lanes(registry: Registry) -> tuple[Registry, dict[str, tuple[str, ...]]]:
    parents: dict[str, tuple[str, ...]] = {}
    heads: dict[str, str | None] = {}
    for cid, branch, explicit in GRAPH:
        if branch not in heads:
            registry.create_branch(branch)
            heads[branch] = None
        record = registry.commit(
            branch, cid, step=len(parents), objects={}, parents=explicit, metrics={"n": 1.0}
        )
        head = heads[branch]
        parents[cid] = tuple(explicit) if explicit is not None else ((head,) if head else ())
        assert record.parents == parents[cid]
        heads[branch] = cid
    return registry, parents


def walk(start: str, links: dict[str, tuple[str, ...]], depth: int | None) -> dict[str, int]:
    """Shortest distances from ``start`` along ``links`` (breadth first)."""
    seen = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if depth is not None and seen[node] == depth:
            continue
        for nxt in links.get(node, ()):
            if nxt not in seen:
                seen[nxt] = seen[node] + 1
                queue.append(nxt)
    del seen[start]
    return seen


@pytest.mark.parametrize("depth", [None, 1, 2, 3, 5])
def test_lineage_is_a_walk_of_the_edges(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]], depth: int | None
) -> None:
    reg, parents = lanes
    children: dict[str, tuple[str, ...]] = {}
    for child, ps in parents.items():
        for p in ps:
            children[p] = (*children.get(p, ()), child)
    every = {r.id: r for r in reg.checkpoints()}
    order = {cid: i for i, (cid, _, _) in enumerate(GRAPH)}  # commit order = created order
    for cid in parents:
        up = walk(cid, parents, depth)
        down = walk(cid, children, depth)
        ancestors = reg.ancestors(cid, depth=depth)
        descendants = reg.descendants(cid, depth=depth)
        # Nearest first; ties: newest first going up, oldest first going down.
        assert ancestors.ids == sorted(up, key=lambda a: (up[a], -order[a]))
        assert descendants.ids == sorted(down, key=lambda d: (down[d], order[d]))
        for record in [*ancestors, *descendants]:
            assert record == every[record.id]
            assert record.parents == parents[record.id]


def test_lanes_are_the_labels_migrations_compute(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    reg, parents = lanes
    with reg._engine.connect() as conn:
        stored = {
            cid: (lane, pos)
            for cid, lane, pos in conn.execute(text("SELECT id, lane, lane_pos FROM checkpoint"))
        }
        links = set(
            conn.execute(
                text("SELECT parent_lane, parent_pos, child_lane, child_pos FROM lane_link")
            ).all()
        )
    labels, expected_links = lane_labels([(c, b) for c, b, _ in GRAPH], parents)
    assert stored == labels
    assert links == set(expected_links)
    # Spot checks of the rule: main's first lane runs m0..m4; the fork, the branch point, the
    # merges and the twins start lanes of their own; a child of a merge continues its lane.
    assert [stored[c] for c in ("m0", "m1", "m2", "m3", "m4")] == [("m0", i) for i in range(5)]
    assert stored["f0"] == ("f0", 0) and stored["f1"] == ("f0", 1)
    assert stored["s0"] == ("s0", 0) and stored["s1"] == ("s0", 1)
    assert stored["x0"] == ("x0", 0) and stored["x1"] == ("x0", 1)
    assert stored["y0"] == ("y0", 0) and stored["y2"] == ("y0", 2)
    assert stored["t0"] == ("t0", 0) and stored["u0"] == ("u0", 0)
    assert ("m0", 1, "s0", 0) in links and ("s0", 1, "x0", 0) in links


def test_a_merge_with_the_default_kind_keeps_all_its_parents(registry: Registry) -> None:
    registry.create_branch("main")
    registry.commit("main", "a", step=0, objects={})
    registry.create_branch("side", from_ref="a")
    registry.commit("side", "b", step=1, objects={})
    merged = registry.commit("main", "c", step=2, objects={}, parents=["a", "b"])
    assert merged.kind == "train" and merged.parents == ("a", "b")
    registry.commit("main", "d", step=3, objects={})
    assert [(r.id, r.parents) for r in registry.descendants("a")] == [
        ("b", ("a",)),
        ("c", ("a", "b")),
        ("d", ("c",)),
    ]
    assert [(r.id, r.parents) for r in registry.ancestors("d")] == [
        ("c", ("a", "b")),
        ("b", ("a",)),
        ("a", ()),
    ]


def test_a_record_list_behaves_like_a_list(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    reg, _ = lanes
    found = reg.descendants("m0")
    assert isinstance(found, RecordList)
    records = [reg.get(cid) for cid in found.ids]
    assert len(found) == len(records) > 5
    assert found == records and records == found and found == tuple(records)
    assert found != records[:-1] and found != [*records[1:], records[0]]
    assert found[0] == records[0] and found[-1] == records[-1]
    assert found[1:4] == records[1:4] and found[::-2] == records[::-2]
    assert list(found) == records and found.ids == [r.id for r in records]
    assert repr(found) == repr(records)
    with pytest.raises(IndexError):
        found[len(records)]
    with pytest.raises(IndexError):
        found[-len(records) - 1]
    with pytest.raises(TypeError):
        hash(found)
    again = pickle.loads(pickle.dumps(found))
    assert isinstance(again, RecordList) and again == records
    empty = reg.ancestors("m0")
    assert not empty and empty == [] and len(empty) == 0 and empty.ids == []
    assert reg.descendants("m0", depth=0) == []


def _statements(reg: Registry) -> list[str]:
    """Every SQL statement the registry's engine runs from now on."""
    seen: list[str] = []
    event.listen(reg._engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_lineage_reads_the_structure_and_defers_the_rest_to_one_batch(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    reg, parents = lanes
    found = reg.descendants("m0")
    seen = _statements(reg)
    assert len(found) > 5 and found.ids and not seen  # the call read the structure already
    first = found[3]
    deferred = [sql for sql in seen if "c.manifest" in sql]
    assert len(deferred) == 1  # every record's deferred fields, one statement here
    assert first == reg.get(first.id) and first.parents == parents[first.id]
    seen.clear()
    assert list(found) == [reg.get(cid) for cid in found.ids]
    assert not [sql for sql in seen if "c.manifest" in sql]  # read once per list
    again = reg.descendants("m0")  # nothing is cached across calls
    seen.clear()
    assert again == found and len([sql for sql in seen if "c.manifest" in sql]) == 1
    # A bounded walk that enters one lane twice (m4 and m0, not m1..m3): the deferred read
    # covers exactly its rows.
    bounded = reg.ancestors("y0", depth=1)
    assert sorted(bounded.ids) == ["m0", "m4", "s1"]
    assert list(bounded) == [reg.get(cid) for cid in bounded.ids]


def test_deferred_fields_are_those_at_first_access(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    reg, _ = lanes
    found = reg.ancestors("y2")
    accessed = reg.ancestors("y2")
    assert all(record.pruned is None for record in accessed)
    plan = reg.gc_plan(keep_last=1)
    reg.apply_gc(plan)
    pruned = set(plan.prune) & set(found.ids)
    assert pruned  # GC pruned part of this lineage between the call and the first access
    assert list(found) == [reg.get(cid) for cid in found.ids]
    assert {record.id for record in found if record.pruned is not None} == pruned
    assert all(record.pruned is None for record in accessed)  # read before GC, kept


def test_a_pickled_record_list_carries_its_deferred_fields(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    reg, _ = lanes
    blob = pickle.dumps(reg.descendants("m1"))  # nothing accessed yet: pickling reads them
    expected = [reg.get(cid) for cid in reg.descendants("m1").ids]
    seen = _statements(reg)
    again = pickle.loads(blob)
    assert again == expected and not seen


def test_a_vanished_row_is_a_clear_error() -> None:
    # Checkpoint rows are never deleted; should one be (a restored or edited database), the
    # first access says so instead of building a wrong record.
    gone = RecordList([("ck-gone", "main", 0, "ck-gone", 0, None, None)], load=lambda rows: {})
    assert gone.ids == ["ck-gone"] and len(gone) == 1
    with pytest.raises(RefNotFound, match=r"1 checkpoint\(s\) of this lineage .*\(ck-gone\)"):
        gone[0]
    with pytest.raises(ValueError, match="deferred columns"):
        RecordList([("ck", "main", 0, "ck", 0, None, None)])


def _set_created(reg: Registry, times: dict[str, datetime]) -> None:
    with reg._engine.begin() as conn:
        for cid, when in times.items():
            conn.execute(update(m.Checkpoint).where(m.Checkpoint.id == cid).values(created=when))


def _two_branches_and_their_merge(registry: Registry) -> None:
    """Root r; branch x: k1 k2 k3, branch y: c1 c2 (ids not in commit order); z merges k3, c2."""
    registry.create_branch("main")
    registry.commit("main", "r", step=0, objects={})
    registry.create_branch("x", from_ref="r")
    registry.create_branch("y", from_ref="r")
    for cid in ("k1", "k2", "k3"):
        registry.commit("x", cid, step=1, objects={})
    for cid in ("c1", "c2"):
        registry.commit("y", cid, step=1, objects={})
    registry.commit("x", "z", step=2, objects={}, parents=["k3", "c2"])


def test_ties_across_lanes_are_decided_by_time_then_id(registry: Registry) -> None:
    # Two branches off one root and their merge, committed so that id order is not commit
    # order; then every time made equal, so that rows of different lanes at one distance tie
    # on ``created`` and the id decides (ascending, in both directions).
    _two_branches_and_their_merge(registry)
    same = datetime(2025, 1, 1, tzinfo=UTC)
    _set_created(registry, {cid: same for cid in ("r", "k1", "k2", "k3", "c1", "c2", "z")})
    assert registry.descendants("r").ids == ["c1", "k1", "c2", "k2", "k3", "z"]
    assert registry.ancestors("z").ids == ["c2", "k3", "c1", "k2", "k1", "r"]
    assert registry.ancestors("z", depth=2).ids == ["c2", "k3", "c1", "k2"]
    assert registry.descendants("r", depth=2).ids == ["c1", "k1", "c2", "k2"]
    # Times decide before ids: one microsecond later sorts after (down) / before (up).
    _set_created(registry, {"c1": same + timedelta(microseconds=1)})
    assert registry.descendants("r").ids == ["k1", "c1", "c2", "k2", "k3", "z"]
    _set_created(registry, {"k2": same + timedelta(microseconds=2)})
    assert registry.ancestors("z").ids == ["c2", "k3", "k2", "c1", "k1", "r"]
    for found in (registry.descendants("r"), registry.ancestors("z")):
        assert list(found) == [registry.get(cid) for cid in found.ids]


def test_ancestor_ties_with_times_of_another_shape(registry: Registry) -> None:
    # Times stored as text of another shape than the registry writes (SQLite: no fraction)
    # still order newest first, as the database compares them.
    if registry._dialect != "sqlite":
        pytest.skip("stored time text is SQLite's")
    registry.create_branch("main")
    registry.commit("main", "r", step=0, objects={})
    registry.create_branch("x", from_ref="r")
    registry.commit("x", "a", step=1, objects={})
    registry.create_branch("y", from_ref="r")
    registry.commit("y", "b", step=1, objects={})
    registry.commit("y", "c", step=2, objects={}, parents=["b", "a"])
    with registry._engine.begin() as conn:
        conn.execute(text("UPDATE checkpoint SET created = '2025-01-01 00:00:01' WHERE id = 'b'"))
        conn.execute(
            text("UPDATE checkpoint SET created = '2025-01-01 00:00:01.500000' WHERE id = 'a'")
        )
    assert registry.ancestors("c").ids == ["a", "b", "r"]  # '...01.5' > '...01' as text
    assert registry.descendants("r").ids == ["b", "a", "c"]
    # One length, two shapes: the text decides where it first differs (a digit here).
    with registry._engine.begin() as conn:
        conn.execute(
            text("UPDATE checkpoint SET created = '2025-01-01 00:00:02.00000Z' WHERE id = 'b'")
        )
        conn.execute(
            text("UPDATE checkpoint SET created = '2025-01-01 00:00:01.000000' WHERE id = 'a'")
        )
    assert registry.ancestors("c").ids == ["b", "a", "r"]
    assert registry.descendants("r").ids == ["a", "b", "c"]


def test_lineage_resolves_a_ref_as_resolve_does(
    lanes: tuple[Registry, dict[str, tuple[str, ...]]],
) -> None:
    # The lineage statement resolves branches, tags and ids itself; prefixes and errors take
    # the path of resolve. A name that is a branch and a checkpoint id is the branch.
    reg, _ = lanes
    reg.tag("s1", "release")
    by_id = reg.ancestors("y1").ids
    assert reg.ancestors("side").ids == reg.ancestors("y2").ids
    assert reg.ancestors("release").ids == reg.ancestors("s1").ids == ["s0", "m1", "m0"]
    reg.create_branch("y1", from_ref="m3")  # a branch named like a checkpoint: the branch wins
    assert reg.ancestors("y1").ids == ["m2", "m1", "m0"] != by_id
    assert reg.descendants("y1", depth=1).ids == ["m4"]
    reg.commit("main", "ab0123456789", step=99, objects={})
    assert reg.ancestors("ab0123").ids == reg.ancestors("ab0123456789").ids
    assert reg.descendants("ab01", depth=3).ids == []
    reg.commit("main", "ab0199", step=100, objects={})
    with pytest.raises(AmbiguousRef):
        reg.descendants("ab01")
    reg.create_branch("empty")
    with pytest.raises(EmptyBranch):
        reg.ancestors("empty")
    for missing in ("nope", "", "no\x00pe", "ab0"):
        with pytest.raises(RefNotFound):
            reg.descendants(missing)
    reg.create_branch("release", from_ref="m0")  # a branch and a tag of one name: the branch
    assert reg.descendants("release", depth=1).ids == ["m1", "y0"]


def test_ties_with_times_on_both_sides_of_2000(registry: Registry) -> None:
    # PostgreSQL sends times in their binary form (microseconds since 2000): earlier times
    # are negative and still order as times.
    _two_branches_and_their_merge(registry)
    same = datetime(2025, 1, 1, tzinfo=UTC)
    _set_created(registry, {cid: same for cid in ("r", "k3", "c2", "z")})
    _set_created(
        registry,
        {
            "c1": datetime(1999, 6, 1, 12, 0, 0, 5, tzinfo=UTC),
            "k1": datetime(2001, 6, 1, tzinfo=UTC),
            "k2": datetime(1998, 1, 1, tzinfo=UTC),
        },
    )
    assert registry.descendants("r").ids == ["c1", "k1", "k2", "c2", "k3", "z"]
    assert registry.ancestors("z").ids == ["c2", "k3", "c1", "k2", "r", "k1"]
    _set_created(registry, {"k2": datetime(1999, 6, 1, 12, 0, 0, 5, tzinfo=UTC)})
    assert registry.ancestors("z").ids == ["c2", "k3", "c1", "k2", "r", "k1"]  # tie: by id
    _set_created(registry, {"k1": datetime(1999, 6, 1, tzinfo=UTC)})
    assert registry.descendants("r").ids == ["k1", "c1", "k2", "c2", "k3", "z"]
