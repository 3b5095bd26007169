"""gc planning on a large registry with nothing to delete reads the refs, not the lineage:
a bounded number of statements, none of which scans the checkpoint, edge or object tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, text

from tlreg.registry import Registry
from tlreg.registry import models as m

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
# Tables whose size is the registry's: a plan on an unchanged registry must not scan them.
BIG = ("checkpoint", "edge", "object", "checkpoint_object")


def grow(reg: Registry, branch: str, n: int) -> None:
    """Append ``n`` checkpoints to ``branch``'s first-parent chain in bulk (the rows commit
    writes: checkpoint, edge, lane link, one object of its own and one shared), and move
    its head."""
    engine = reg._engine.execution_options(tlreg_write=True)
    with engine.begin() as conn:
        head, lane, pos = conn.execute(
            text(
                "SELECT c.id, c.lane, c.lane_pos FROM branch b JOIN checkpoint c "
                "ON c.id = b.head WHERE b.name = :b"
            ),
            {"b": branch},
        ).one()
        first = conn.execute(text("SELECT count(*) FROM checkpoint")).scalar_one()
        rows, edges, objects, refs = [], [], [], []
        parent = head
        for i in range(n):
            me = f"{branch}-{first + i:07d}"
            created = T0 + timedelta(seconds=first + i)
            rows.append(
                {"id": me, "branch": branch, "step": first + i, "manifest": me, "metrics": {},
                 "val_accuracy": None, "logical_bytes": 2, "new_bytes": 1, "kind": "train",
                 "message": None, "signature": None, "run_id": None, "created": created,
                 "pruned": None, "lane": f"{branch}-{first:07d}", "lane_pos": i}
            )  # fmt: skip
            edges.append({"child": me, "parent": parent, "kind": "continue", "position": 0})
            objects.append({"hash": f"own-{me}", "nbytes": 1, "created": created})
            refs += [{"checkpoint": me, "object": f"own-{me}"}, {"checkpoint": me, "object": "s"}]
            parent = me
        conn.execute(m.Checkpoint.__table__.insert(), rows)
        # each batch is a lane of its own, linked to where it continues from (as commit does)
        conn.execute(
            m.LaneLink.__table__.insert(),
            {"parent_lane": lane, "parent_pos": pos, "child_lane": rows[0]["lane"],
             "child_pos": 0},
        )  # fmt: skip
        conn.execute(m.Edge.__table__.insert(), edges)
        conn.execute(m.Object.__table__.insert(), objects)
        conn.execute(m.CheckpointObject.__table__.insert(), refs)
        conn.execute(
            text("UPDATE branch SET head = :h WHERE name = :b"), {"h": parent, "b": branch}
        )
        if reg._dialect == "postgresql":
            conn.execute(text("ANALYZE"))


@contextmanager
def statements(reg: Registry) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the registry's engine runs inside the block, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, stmt: str, params: Any, context: Any, many: bool) -> None:
        seen.append((stmt, params))

    event.listen(reg._engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(reg._engine, "before_cursor_execute", record)


def full_scans(reg: Registry, stmt: str, params: Any) -> list[str]:
    """The registry-sized tables the database's plan for ``stmt`` reads in full."""
    with reg._engine.connect() as conn:
        raw = conn.exec_driver_sql
        if reg._dialect == "postgresql":
            (plan,) = raw("EXPLAIN (FORMAT JSON) " + stmt, params).one()
            nodes = json.loads(plan) if isinstance(plan, str) else plan
            found: list[str] = []

            def walk(node: dict[str, Any]) -> None:
                if node.get("Node Type") == "Seq Scan" and node["Relation Name"] in BIG:
                    found.append(node["Relation Name"])
                for child in node.get("Plans", []):
                    walk(child)

            walk(nodes[0]["Plan"])
            return found
        rows = raw("EXPLAIN QUERY PLAN " + stmt, params).all()
        # "SCAN t" reads every row; "SEARCH t USING ... INDEX" looks rows up.
        return [
            str(mt.group(1))
            for row in rows
            if (mt := re.match(r"SCAN (\w+)", str(row[-1]))) and mt.group(1) in BIG
        ]


@pytest.fixture
def big(registry: Registry) -> Registry:
    """main: 1,500 checkpoints; exp: 500 more off main's 10th; a tag on main's first."""
    registry.create_branch("main")
    registry.commit("main", "root", step=0, objects={"s": 1})
    registry.tag("root", "v1")
    grow(registry, "main", 10)
    registry.create_branch("exp", from_ref="main")
    grow(registry, "main", 1_490)
    grow(registry, "exp", 500)
    return registry


@pytest.mark.parametrize("keep_last", [None, 5])
def test_gc_plan_on_an_unchanged_registry_reads_only_the_refs(
    big: Registry, keep_last: int | None
) -> None:
    if keep_last is None:
        first = big.gc_plan(keep_last=None, now=T0)
        assert (first.prune, first.objects) == ((), ())
    else:  # keep_last prunes: apply it, forget the objects, then there is nothing left
        done = big.apply_gc(big.gc_plan(keep_last=keep_last, now=T0))
        # all but the newest keep_last on main and on exp, exp's base and the tagged root
        assert len(done.prune) == 2_001 - 2 * keep_last - 2
        big.forget_objects([h for h, _ in done.objects])
        first = big.gc_plan(keep_last=keep_last, now=T0)
        assert (first.prune, first.objects) == ((), ())
    with statements(big) as walked:
        again = big.gc_plan(keep_last=keep_last, now=T0)
    assert (again.prune, again.objects, again.orphan_objects, again.waiting) == ((), (), (), 0)
    selects = [(s, p) for s, p in walked if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert not any("RECURSIVE" in s.upper() for s, _ in walked), walked
    assert len(walked) <= 12, [s for s, _ in walked]
    assert {s: full_scans(big, s, p) for s, p in selects} == {s: [] for s, _ in selects}


def test_a_change_to_the_refs_or_a_gc_makes_the_next_plan_walk_again(big: Registry) -> None:
    assert big.gc_plan(now=T0).prune == ()
    big.create_branch("dead", from_ref="root")
    grow(big, "dead", 3)
    assert big.gc_plan(now=T0).prune == ()  # the new branch's head is kept
    big.delete_branch("dead")
    plan = big.gc_plan(now=T0)
    assert plan.prune == ("dead-0002001", "dead-0002002", "dead-0002003")
    assert big.gc_plan(now=T0).prune == plan.prune  # a plan that prunes is not remembered
    big.apply_gc(plan)
    # apply_gc pruned behind the refs' back: its objects are found although no ref moved
    after = big.gc_plan(now=T0)
    assert (after.prune, [h for h, _ in after.objects]) == (
        (),
        ["own-dead-0002001", "own-dead-0002002", "own-dead-0002003"],
    )
    big.forget_objects([h for h, _ in after.objects])
    assert big.gc_plan(now=T0).objects == ()
    big.delete_tag("v1")  # root stays: main's ancestor
    assert big.gc_plan(now=T0).prune == ()
    big.delete_branch("exp")
    assert len(big.gc_plan(now=T0).prune) == 500
