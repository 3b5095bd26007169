"""Every statement behind the lineage queries finds its rows through an index: each one is
captured as it runs and EXPLAINed on the same backend (PostgreSQL with sequential scans
disabled, so a Seq Scan left in the plan means no index could serve it)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from tlreg.registry import Registry

TABLES = "checkpoint|edge|branch|tag|layer_prefix|checkpoint_object|object|gc_candidate"
FULL_SCAN = {
    "sqlite": re.compile(rf"\bSCAN ({TABLES})\b(?! USING (COVERING )?INDEX)"),
    "postgresql": re.compile(rf"Seq Scan on ({TABLES})\b"),
}


@contextmanager
def captured(reg: Registry) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (with their parameters) the registry runs inside the block."""
    seen: list[tuple[str, Any]] = []

    def listen(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if re.match(r"\s*(SELECT|WITH|INSERT|UPDATE|DELETE)\b", statement, re.IGNORECASE):
            seen.append((statement, params))

    engine = reg._engine
    event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listen)


def full_scans(reg: Registry, statements: list[tuple[str, Any]]) -> list[str]:
    """The plan lines of ``statements`` that read a whole registry table."""
    dialect = reg._engine.dialect.name
    bad: list[str] = []
    with reg._engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor()
        if dialect == "postgresql":
            cursor.execute("SET enable_seqscan = off")
        for statement, params in statements:
            if "pg_advisory" in statement:
                continue
            if isinstance(params, list):  # executemany: one row's parameters show the plan
                params = params[0]
            prefix = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN "
            cursor.execute(prefix + statement, params)
            plan = "\n".join(str(row[-1]) for row in cursor.fetchall())
            bad += [line for line in plan.splitlines() if FULL_SCAN[dialect].search(line)]
        if dialect == "postgresql":
            cursor.execute("RESET enable_seqscan")
        cursor.close()
    return bad


@pytest.fixture
def populated(registry: Registry) -> Registry:
    registry.create_branch("main")
    for i in range(30):
        registry.commit(
            "main",
            f"main{i:04d}",
            step=i,
            objects={f"o{i}": 1, "shared": 2},
            signature=["a", "b", f"c{i % 3}"],
            metrics={"val_accuracy": i / 30},
        )
    registry.create_branch("side", from_ref="main0010")
    for i in range(10):
        registry.commit("side", f"side{i:04d}", step=i, objects={f"s{i}": 1})
    registry.commit("side", "feed1234abcd", step=10, objects={})
    registry.tag("main0005", "v1")
    return registry


QUERIES: dict[str, Callable[[Registry], object]] = {
    "resolve-branch": lambda r: r.resolve("main"),
    "resolve-tag": lambda r: r.resolve("v1"),
    "resolve-id": lambda r: r.resolve("main0003"),
    "resolve-prefix": lambda r: r.resolve("feed12"),
    "get": lambda r: r.get("main0007"),
    "log": lambda r: r.log("side", limit=50),
    "ancestors": lambda r: r.ancestors("side0009"),
    "descendants": lambda r: r.descendants("main0002"),
    "children": lambda r: r.children("main0010"),
    "edges": lambda r: r.edges("side0000"),
    "common_ancestor": lambda r: r.common_ancestor("main", "side"),
    "best_ancestor": lambda r: r.best_ancestor(["a", "b", "c1", "d"]),
    "objects_of": lambda r: r.objects_of("main0004"),
    "create_branch": lambda r: r.create_branch("new", from_ref="side0003"),
    "commit": lambda r: r.commit("side", "side9999", step=1, objects={"shared": 2, "n": 1}),
    "tag": lambda r: r.tag("main0001", "v0"),
}


def test_lineage_queries_use_indexes(populated: Registry) -> None:
    scans = {}
    for name, query in QUERIES.items():
        with captured(populated) as statements:
            query(populated)
        assert statements, f"nothing was captured for {name}"
        scans[name] = full_scans(populated, statements)
    assert scans == {name: [] for name in QUERIES}
