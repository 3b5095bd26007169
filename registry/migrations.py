"""Versioned schema migrations, run the same way on SQLite and PostgreSQL.

A fresh database is created from the current models and stamped ``SCHEMA_VERSION``. An older
one is brought forward by :func:`upgrade`: every step in ``STEPS`` from its version up, all in
the caller's single transaction (both backends have transactional DDL, so a failed step leaves
the database as it was). Steps never import the current models: each one spells out the DDL of
its own version, so that later model changes cannot alter what an old step does.

Adding version N: bump ``models.SCHEMA_VERSION``, change the models, and add ``STEPS[N]``
doing exactly that change; ``test_upgraded_schema_equals_a_fresh_one`` compares the two.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from tlreg.registry import models as m
from tlreg.registry.errors import SchemaVersionError

_ID = String().with_variant(String(collation="C"), "postgresql")


def _v1_metadata() -> MetaData:
    """The version-1 schema exactly as tlreg 0.1 created it (frozen; never edit)."""
    md = MetaData()
    Table("meta", md, Column("key", AutoString, primary_key=True),
          Column("value", AutoString, nullable=False))  # fmt: skip
    Table(
        "run", md,
        Column("id", Integer, primary_key=True),
        Column("branch", AutoString, nullable=False, index=True),
        Column("config", JSON, nullable=False),
        Column("status", AutoString, nullable=False),
        Column("error", AutoString),
        Column("ray_job_id", AutoString),
        Column("created", UTCDateTime(), nullable=False),
        Column("finished", UTCDateTime()),
    )  # fmt: skip
    Table(
        "checkpoint", md,
        Column("id", _ID, primary_key=True),
        Column("branch", AutoString, nullable=False),
        Column("step", BigInteger, nullable=False),
        Column("manifest", AutoString, nullable=False),
        Column("metrics", JSON, nullable=False),
        Column("val_accuracy", Float),
        Column("logical_bytes", BigInteger, nullable=False),
        Column("new_bytes", BigInteger, nullable=False),
        Column("kind", AutoString, nullable=False),
        Column("message", AutoString),
        Column("signature", JSON),
        Column("run_id", Integer, ForeignKey("run.id"), index=True),
        Column("created", UTCDateTime(), nullable=False),
        Index("ix_checkpoint_branch_created", "branch", "created"),
    )  # fmt: skip
    Table(
        "edge", md,
        Column("child", _ID, ForeignKey("checkpoint.id"), primary_key=True),
        Column("parent", _ID, ForeignKey("checkpoint.id"), primary_key=True),
        Column("kind", AutoString, nullable=False),
        Column("position", Integer, nullable=False),
        Index("ix_edge_parent", "parent", "child"),
    )  # fmt: skip
    Table(
        "branch", md,
        Column("name", _ID, primary_key=True),
        Column("head", _ID, ForeignKey("checkpoint.id")),
        Column("base", _ID, ForeignKey("checkpoint.id")),
        Column("task", AutoString),
        Column("created", UTCDateTime(), nullable=False),
    )  # fmt: skip
    Table(
        "tag", md,
        Column("name", _ID, primary_key=True),
        Column("checkpoint", _ID, ForeignKey("checkpoint.id"), nullable=False, index=True),
        Column("created", UTCDateTime(), nullable=False),
    )  # fmt: skip
    Table(
        "object", md,
        Column("hash", _ID, primary_key=True),
        Column("nbytes", BigInteger, nullable=False),
        Column("created", UTCDateTime(), nullable=False),
    )  # fmt: skip
    Table(
        "checkpoint_object", md,
        Column("checkpoint", _ID, ForeignKey("checkpoint.id"), primary_key=True),
        Column("object", _ID, ForeignKey("object.hash"), primary_key=True),
        Index("ix_checkpoint_object_object", "object"),
    )  # fmt: skip
    Table(
        "layer_prefix", md,
        Column("checkpoint", _ID, ForeignKey("checkpoint.id"), primary_key=True),
        Column("depth", Integer, primary_key=True),
        Column("prefix", _ID, nullable=False),
        Index("ix_layer_prefix_prefix", "prefix"),
    )  # fmt: skip
    return md


def create_v1(conn: Connection) -> None:
    """Create an empty version-1 registry (for tests of the upgrade path)."""
    _v1_metadata().create_all(conn)
    conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))


def _to_v2(conn: Connection) -> None:
    """v2: garbage collection prunes checkpoints (``checkpoint.pruned``) and remembers orphans
    and keys handed out for deletion (``gc_candidate``)."""
    timestamp = UTCDateTime().compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE checkpoint ADD COLUMN pruned {timestamp}"))
    md = MetaData()
    Table(
        "gc_candidate", md,
        Column("kind", AutoString, primary_key=True),
        Column("key", _ID, primary_key=True),
        Column("first_seen", UTCDateTime(), nullable=False),
        Column("doomed", UTCDateTime()),
    )  # fmt: skip
    md.create_all(conn)


def lane_labels(
    order: Iterable[tuple[str, str]], parents: Mapping[str, Sequence[str]]
) -> tuple[dict[str, tuple[str, int]], list[tuple[str, int, str, int]]]:
    """Lane labels (schema v3) of checkpoints given as (id, branch) in an order where parents
    come first, with ``parents[id]`` in parent order: ``(labels, links)``, where ``labels[id]``
    is (lane, position) and ``links`` the (parent_lane, parent_pos, child_lane, child_pos) of
    every edge that is not a step along a lane.

    The rule ``Registry.commit`` applies: a checkpoint with one parent continues that
    parent's lane when it is committed on the branch the parent was committed on and the
    parent is still the last checkpoint of its lane; any other checkpoint (a root, a branch
    point, a merge) starts a lane named after itself.
    """
    labels: dict[str, tuple[str, int]] = {}
    branch_of: dict[str, str] = {}
    taken: set[tuple[str, int]] = set()
    links: list[tuple[str, int, str, int]] = []
    for cid, branch in order:
        ps = parents.get(cid, ())
        first = labels[ps[0]] if ps else None
        nxt = None if first is None else (first[0], first[1] + 1)
        linked: Sequence[str] = ()
        if nxt is not None and len(ps) == 1 and branch_of[ps[0]] == branch and nxt not in taken:
            label = nxt
        else:
            label, linked = (cid, 0), ps
        labels[cid] = label
        branch_of[cid] = branch
        taken.add(label)
        links += [(*labels[p], *label) for p in linked]
    return labels, links


def _to_v3(conn: Connection) -> None:
    """v3: lineage lanes (``checkpoint.lane``, ``checkpoint.lane_pos``, ``lane_link``), so that
    ancestors and descendants are range scans; existing checkpoints are labelled here."""
    id_type = _ID.compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE checkpoint ADD COLUMN lane {id_type}"))
    conn.execute(text("ALTER TABLE checkpoint ADD COLUMN lane_pos BIGINT"))
    md = MetaData()
    link = Table(
        "lane_link", md,
        Column("parent_lane", _ID, primary_key=True),
        Column("parent_pos", BigInteger, primary_key=True),
        Column("child_lane", _ID, primary_key=True),
        Column("child_pos", BigInteger, primary_key=True),
        Index("ix_lane_link_child", "child_lane", "child_pos"),
    )  # fmt: skip
    md.create_all(conn)
    # Label in topological order (oldest first among the ready ones): parents first.
    rows = conn.execute(text("SELECT id, branch, created FROM checkpoint")).all()
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for child, parent in conn.execute(
        text("SELECT child, parent FROM edge ORDER BY child, position")
    ).all():
        parents.setdefault(child, []).append(parent)
        children.setdefault(parent, []).append(child)
    info = {cid: (created, branch) for cid, branch, created in rows}
    waiting = {cid: len(parents.get(cid, ())) for cid in info}
    ready: list[tuple[Any, str]] = [(info[c][0], c) for c, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[tuple[str, str]] = []
    while ready:
        _, cid = heapq.heappop(ready)
        order.append((cid, info[cid][1]))
        for child in children.get(cid, ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (info[child][0], child))
    labels, links = lane_labels(order, parents)
    if labels:
        conn.execute(
            text("UPDATE checkpoint SET lane = :lane, lane_pos = :pos WHERE id = :id"),
            [{"id": cid, "lane": lane, "pos": pos} for cid, (lane, pos) in labels.items()],
        )
    if links:
        conn.execute(
            link.insert(),
            [
                {"parent_lane": a, "parent_pos": b, "child_lane": c, "child_pos": d}
                for a, b, c, d in links
            ],
        )
    conn.execute(text("CREATE UNIQUE INDEX ix_checkpoint_lane ON checkpoint (lane, lane_pos)"))


def _to_v4(conn: Connection) -> None:
    """v4: on PostgreSQL the unique lane index is rebuilt with INCLUDE (id, step, created), so
    that lineage walks read lanes by index-only scans; nothing changes on SQLite."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("DROP INDEX ix_checkpoint_lane"))
        conn.execute(
            text(
                "CREATE UNIQUE INDEX ix_checkpoint_lane ON checkpoint (lane, lane_pos) "
                "INCLUDE (id, step, created)"
            )
        )


def _to_v5(conn: Connection) -> None:
    """v5: evaluation curves (``metric_point``: run, metric, step, value, wall time)."""
    md = MetaData()
    Table("run", md, Column("id", Integer, primary_key=True))
    Table(
        "metric_point", md,
        Column("run_id", Integer, ForeignKey("run.id"), primary_key=True),
        Column("metric", _ID, primary_key=True),
        Column("step", BigInteger, primary_key=True),
        Column("value", Float),
        Column("wall_time", UTCDateTime(), nullable=False),
        Column("elapsed_s", Float),
    )  # fmt: skip
    md.tables["metric_point"].create(conn)


def _to_v6(conn: Connection) -> None:
    """v6: a branch has at most one live run (``branch_lease``: holder, heartbeat, expiry)."""
    md = MetaData()
    Table(
        "branch_lease", md,
        Column("branch", _ID, primary_key=True),
        Column("token", AutoString, nullable=False),
        Column("run_id", Integer),
        Column("holder", AutoString, nullable=False),
        Column("host", AutoString, nullable=False),
        Column("pid", Integer, nullable=False),
        Column("acquired", UTCDateTime(), nullable=False),
        Column("heartbeat", UTCDateTime(), nullable=False),
        Column("expires", UTCDateTime(), nullable=False),
    )  # fmt: skip
    md.create_all(conn)


def _to_v7(conn: Connection) -> None:
    """v7: an index on checkpoint (created, id), for pages of the newest checkpoints."""
    conn.execute(text("CREATE INDEX ix_checkpoint_created ON checkpoint (created, id)"))


def _to_v8(conn: Connection) -> None:
    """v8: ``object_move`` (old, new): where a repack copied an object's live bytes."""
    md = MetaData()
    Table(
        "object_move", md,
        Column("old", _ID, primary_key=True),
        Column("new", _ID, primary_key=True),
    )  # fmt: skip
    md.create_all(conn)


def _to_v9(conn: Connection) -> None:
    """v9: a partial index on the pruned checkpoints (where repack planning starts)."""
    conn.execute(
        text("CREATE INDEX ix_checkpoint_pruned ON checkpoint (pruned) WHERE pruned IS NOT NULL")
    )


def _to_v10(conn: Connection) -> None:
    """v10: tiers. ``checkpoint.tier`` ("local", "shared" or "lost"; existing checkpoints are
    "shared"), ``checkpoint_node`` (the nodes holding a checkpoint's local shares) and
    ``run_node`` (the node each rank of a run ran on)."""
    text_type = AutoString().compile(dialect=conn.dialect)
    conn.execute(
        text(f"ALTER TABLE checkpoint ADD COLUMN tier {text_type} NOT NULL DEFAULT 'shared'")
    )
    conn.execute(
        text("CREATE INDEX ix_checkpoint_tier ON checkpoint (branch, tier) WHERE tier <> 'shared'")
    )
    md = MetaData()
    Table("run", md, Column("id", Integer, primary_key=True))
    Table("checkpoint", md, Column("id", _ID, primary_key=True))
    Table(
        "checkpoint_node", md,
        Column("checkpoint_id", _ID, ForeignKey("checkpoint.id"), primary_key=True),
        Column("node_id", _ID, primary_key=True),
        Index("ix_checkpoint_node_node", "node_id"),
    )  # fmt: skip
    Table(
        "run_node", md,
        Column("run_id", Integer, ForeignKey("run.id"), primary_key=True),
        Column("rank", Integer, primary_key=True),
        Column("node_id", AutoString, nullable=False),
    )  # fmt: skip
    md.tables["checkpoint_node"].create(conn)
    md.tables["run_node"].create(conn)


STEPS: dict[int, Callable[[Connection], None]] = {
    2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5, 6: _to_v6, 7: _to_v7, 8: _to_v8, 9: _to_v9,
    10: _to_v10,
}  # fmt: skip
"""``STEPS[n]`` migrates a version ``n - 1`` database to version ``n``."""

assert sorted(STEPS) == list(range(2, m.SCHEMA_VERSION + 1)), "a migration step is missing"


def stored_version(conn: Connection) -> int | None:
    """The schema version recorded in the database; None when it holds no registry yet."""
    if not inspect(conn).has_table("meta"):
        return None
    value = conn.execute(
        select(m.Meta.value).where(m.Meta.key == "schema_version")
    ).scalar_one_or_none()
    if value is None:
        raise SchemaVersionError(
            "the database has a 'meta' table but no schema_version: it was not created by "
            "tlreg; point the registry URL at an empty database"
        )
    return int(value)


def create_latest(conn: Connection) -> None:
    """Create every table of the current schema and stamp its version."""
    m.metadata.create_all(conn, tables=m.tables())
    conn.execute(
        m.Meta.__table__.insert(), {"key": "schema_version", "value": str(m.SCHEMA_VERSION)}
    )


def upgrade(conn: Connection) -> tuple[int, int]:
    """Migrate the database to ``SCHEMA_VERSION`` inside the caller's transaction.

    Returns (from_version, to_version); from_version is 0 when the database was empty (the
    latest schema is created). Raises SchemaVersionError for a database newer than this tlreg.
    """
    found = stored_version(conn)
    if found is None:
        create_latest(conn)
        return 0, m.SCHEMA_VERSION
    if found > m.SCHEMA_VERSION:
        raise newer_error("the registry", found)
    for version in range(found + 1, m.SCHEMA_VERSION + 1):
        STEPS[version](conn)
    conn.execute(
        m.Meta.__table__.update()
        .where(m.Meta.__table__.c.key == "schema_version")
        .values(value=str(m.SCHEMA_VERSION))
    )
    return found, m.SCHEMA_VERSION


def newer_error(what: str, found: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"{what} has schema version {found}, newer than this tlreg supports "
        f"({m.SCHEMA_VERSION}): upgrade tlreg"
    )


def older_error(what: str, found: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"{what} has schema version {found}, older than this tlreg's ({m.SCHEMA_VERSION}): "
        "back it up, then run 'tlreg upgrade'"
    )
