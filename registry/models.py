"""SQLModel table models: the registry's schema (DESIGN §5).

These are internal; the public API returns the frozen records of :mod:`tlreg.registry.records`.
Datetimes are timezone-aware UTC (``UTCDateTime``: PostgreSQL stores ``timestamptz``; SQLite
stores UTC text and gets the zone back on read).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, String, text
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime

SCHEMA_VERSION = 10
"""Bumped with every schema change; stored in ``meta`` under ``schema_version``. Each bump comes
with a step in :mod:`tlreg.registry.migrations` that brings the previous version here."""

# Checkpoint ids are compared byte-wise so that a prefix is a contiguous btree range on both
# backends (SQLite's default BINARY collation; "C" on PostgreSQL, whatever the database's).
ID_TYPE = String().with_variant(String(collation="C"), "postgresql")

metadata = SQLModel.metadata


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Meta(SQLModel, table=True):
    """Small key/value table: schema version, the store URL the CLI configured, ..."""

    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class Run(SQLModel, table=True):
    """One training run on a branch (a Ray job, or a local loop)."""

    __tablename__ = "run"
    id: int | None = Field(default=None, primary_key=True)
    branch: str = Field(index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "running"
    error: str | None = None
    ray_job_id: str | None = None
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())
    finished: datetime | None = Field(default=None, sa_type=UTCDateTime())


class Checkpoint(SQLModel, table=True):
    """A committed checkpoint; its id is the manifest id."""

    __tablename__ = "checkpoint"
    __table_args__ = (
        Index("ix_checkpoint_branch_created", "branch", "created"),
        # Schema v4: on PostgreSQL the unique lane index also carries (id, step, created),
        # so the lineage walk reads a lane's rows by an index-only scan (the table's
        # visibility map is set by (auto)vacuum; see docs/performance.md, Registry). SQLite
        # has no INCLUDE.
        Index(
            "ix_checkpoint_lane", "lane", "lane_pos", unique=True,
            postgresql_include=["id", "step", "created"],
        ),
        # Schema v7: the newest checkpoints of the whole registry by an index scan (the
        # lineage browser's pages, newest first, paged by (created, id)).
        Index("ix_checkpoint_created", "created", "id"),
        # Schema v9: the pruned checkpoints alone (repack planning starts from them).
        Index(
            "ix_checkpoint_pruned", "pruned",
            sqlite_where=text("pruned IS NOT NULL"), postgresql_where=text("pruned IS NOT NULL"),
        ),
        # Schema v10: the checkpoints not (yet) in the shared store alone, by branch (what
        # local_checkpoints and mark_nodes_lost look at; normally a handful of rows).
        Index(
            "ix_checkpoint_tier", "branch", "tier",
            sqlite_where=text("tier <> 'shared'"), postgresql_where=text("tier <> 'shared'"),
        ),
    )  # fmt: skip
    id: str = Field(primary_key=True, sa_type=ID_TYPE)
    # Plain text, not a foreign key: deleting a branch keeps its checkpoints.
    branch: str
    step: int = Field(sa_type=BigInteger())
    manifest: str
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # metrics["val_accuracy"] when finite: its own column so best_ancestor can sort on it.
    val_accuracy: float | None = None
    logical_bytes: int = Field(default=0, sa_type=BigInteger())
    new_bytes: int = Field(default=0, sa_type=BigInteger())
    kind: str = "train"
    message: str | None = None
    signature: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    run_id: int | None = Field(default=None, foreign_key="run.id", index=True)
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())
    # Set by garbage collection (schema v2): the row and its edges stay, its objects may go.
    pruned: datetime | None = Field(default=None, sa_type=UTCDateTime())
    # Lineage labels (schema v3): a "lane" is a run of checkpoints committed on one branch,
    # each the only parent of the next; ``lane`` is the id of its first checkpoint and
    # ``lane_pos`` the position in it. Only a lane's first checkpoint has other parents (none
    # for a root, several for a merge): those edges are LaneLinks, so ancestors and
    # descendants are index range scans over a few lanes instead of a walk over every
    # checkpoint. Always set (nullable only because ALTER TABLE on SQLite cannot add a NOT
    # NULL column without a default).
    lane: str | None = Field(default=None, sa_type=ID_TYPE)
    lane_pos: int | None = Field(default=None, sa_type=BigInteger())
    # Where the checkpoint's bytes are (schema v10): "shared" (in the shared store), "local"
    # (only on the node-local tiers of the nodes in checkpoint_node) or "lost" (a node holding
    # a local-only share is gone: never served).
    tier: str = Field(default="shared", sa_column_kwargs={"server_default": "shared"})


class CheckpointNode(SQLModel, table=True):
    """Node ``node_id`` wrote a local share of checkpoint ``checkpoint_id`` to its node-local
    tier (schema v10)."""

    __tablename__ = "checkpoint_node"
    __table_args__ = (Index("ix_checkpoint_node_node", "node_id"),)
    checkpoint_id: str = Field(primary_key=True, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    node_id: str = Field(primary_key=True, sa_type=ID_TYPE)


class RunNode(SQLModel, table=True):
    """Rank ``rank`` of run ``run_id`` ran on node ``node_id`` (schema v10)."""

    __tablename__ = "run_node"
    run_id: int = Field(primary_key=True, foreign_key="run.id")
    rank: int = Field(primary_key=True)
    node_id: str


class LaneLink(SQLModel, table=True):
    """An edge into a lane (schema v3): ``parent_lane[parent_pos]`` is a parent of
    ``child_lane[child_pos]``, the first checkpoint of its lane (``child_pos`` is 0)."""

    __tablename__ = "lane_link"
    __table_args__ = (Index("ix_lane_link_child", "child_lane", "child_pos"),)
    parent_lane: str = Field(primary_key=True, sa_type=ID_TYPE)
    parent_pos: int = Field(primary_key=True, sa_type=BigInteger())
    child_lane: str = Field(primary_key=True, sa_type=ID_TYPE)
    child_pos: int = Field(primary_key=True, sa_type=BigInteger())


class Edge(SQLModel, table=True):
    """``child`` was derived from ``parent``; ``position`` is the parent's index (0 = first)."""

    __tablename__ = "edge"
    __table_args__ = (Index("ix_edge_parent", "parent", "child"),)
    child: str = Field(primary_key=True, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    parent: str = Field(primary_key=True, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    kind: str
    position: int


class Branch(SQLModel, table=True):
    """A movable name for a line of work; ``head`` is its newest checkpoint."""

    __tablename__ = "branch"
    name: str = Field(primary_key=True, sa_type=ID_TYPE)
    head: str | None = Field(default=None, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    base: str | None = Field(default=None, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    task: str | None = None
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())


class Tag(SQLModel, table=True):
    """An immutable name for one checkpoint."""

    __tablename__ = "tag"
    name: str = Field(primary_key=True, sa_type=ID_TYPE)
    checkpoint: str = Field(foreign_key="checkpoint.id", index=True, sa_type=ID_TYPE)
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())


class Object(SQLModel, table=True):
    """A content-addressed object in the store (a packed Zarr array)."""

    __tablename__ = "object"
    hash: str = Field(primary_key=True, sa_type=ID_TYPE)
    nbytes: int = Field(sa_type=BigInteger())
    created: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())


class CheckpointObject(SQLModel, table=True):
    """Checkpoint -> object references, for GC."""

    __tablename__ = "checkpoint_object"
    __table_args__ = (Index("ix_checkpoint_object_object", "object"),)
    checkpoint: str = Field(primary_key=True, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    object: str = Field(primary_key=True, foreign_key="object.hash", sa_type=ID_TYPE)


class LayerPrefix(SQLModel, table=True):
    """The hash of ``signature[:depth]`` of one checkpoint, for the best-ancestor lookup."""

    __tablename__ = "layer_prefix"
    __table_args__ = (Index("ix_layer_prefix_prefix", "prefix"),)
    checkpoint: str = Field(primary_key=True, foreign_key="checkpoint.id", sa_type=ID_TYPE)
    depth: int = Field(primary_key=True)
    prefix: str = Field(sa_type=ID_TYPE)


class GcCandidate(SQLModel, table=True):
    """A store key garbage collection has its eye on (schema v2).

    ``kind`` is "object" or "manifest". An orphan (a key in the store the registry does not
    reference) is recorded with ``first_seen`` and only deleted once that is older than the
    grace period: no file times needed, which S3 listings do not give reliably. ``doomed`` is
    set when ``apply_gc`` hands the key out for deletion; from then on a commit that references
    it is refused, until ``forget_objects`` drops the row after the bytes are gone.
    """

    __tablename__ = "gc_candidate"
    kind: str = Field(primary_key=True)
    key: str = Field(primary_key=True, sa_type=ID_TYPE)
    first_seen: datetime = Field(sa_type=UTCDateTime())
    doomed: datetime | None = Field(default=None, sa_type=UTCDateTime())


class ObjectMove(SQLModel, table=True):
    """A repack copied the live bytes of object ``old`` into object ``new`` (schema v8).

    Manifests are immutable, so a checkpoint committed with a manifest that names ``old``
    (a save that deduplicated against it while gc repacked it) also gets a reference to each
    ``new``: the bytes its readers reach through the store's relocation record stay alive.
    """

    __tablename__ = "object_move"
    old: str = Field(primary_key=True, sa_type=ID_TYPE)
    new: str = Field(primary_key=True, sa_type=ID_TYPE)


class MetricPoint(SQLModel, table=True):
    """One evaluation of a run (schema v5): ``metric`` was ``value`` at ``step``.

    ``value`` is NULL for NaN (SQLite stores NaN as NULL; both backends keep infinities).
    ``elapsed_s`` is the training time since the run's first step (start-up excluded), when
    the logger knows it. A step logged twice keeps the last value.
    """

    __tablename__ = "metric_point"
    run_id: int = Field(primary_key=True, foreign_key="run.id")
    metric: str = Field(primary_key=True, sa_type=ID_TYPE)
    step: int = Field(primary_key=True, sa_type=BigInteger())
    value: float | None = None
    wall_time: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime())
    elapsed_s: float | None = None


class BranchLease(SQLModel, table=True):
    """The live run of a branch (schema v6): at most one per branch, held while it
    heartbeats; a lease whose ``expires`` has passed may be taken over.

    ``token`` identifies the holder (a run, or a Checkpointer of the Python API);
    ``run_id``, ``holder``, ``host`` and ``pid`` are what a refused second run is told.
    """

    __tablename__ = "branch_lease"
    # Plain text, not a foreign key: a lease names a branch as the runs do.
    branch: str = Field(primary_key=True, sa_type=ID_TYPE)
    token: str
    run_id: int | None = None
    holder: str
    host: str
    pid: int
    acquired: datetime = Field(sa_type=UTCDateTime())
    heartbeat: datetime = Field(sa_type=UTCDateTime())
    expires: datetime = Field(sa_type=UTCDateTime())


def tables() -> list[Any]:
    """The registry's tables (SQLModel's metadata is shared with any other table model)."""
    models: list[Any] = [
        Meta, Run, Checkpoint, Edge, Branch, Tag, Object, CheckpointObject, LayerPrefix,
        GcCandidate, LaneLink, MetricPoint, BranchLease, ObjectMove, CheckpointNode, RunNode,
    ]  # fmt: skip
    return [model.__table__ for model in models]
