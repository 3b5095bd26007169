"""tlreg.registry: the lineage registry (branches, checkpoints, tags, runs) over SQLModel.

SQLite is the embedded default (``sqlite:///path.db``); PostgreSQL serves clusters
(``postgresql+psycopg://user@host/db``). Lineage, no tensors: the checkpoints' bytes live in the
store, and the registry row is the commit.

Rooms:

- ``core``: the ``Registry`` class, composed of the rooms below; opening, schema, meta, runs.
- ``engine``: engine creation (SQLite WAL, network-filesystem check, PostgreSQL), the session
  scope, and "database unreachable or locked" as RegistryUnavailable.
- ``refs``: branches, tags, and resolving a ref (branch, tag, id, id prefix) to a checkpoint.
- ``commit``: the commit transaction: compare-and-swap of the head, object refs, lanes, layer
  prefixes.
- ``lineage``: log, ancestors/descendants, children, edges, common and best ancestor.
- ``lineage_sql``: the recursive statements the lineage walks run, per backend.
- ``metrics``: evaluation curves (metric points of runs), branch series, run summaries.
- ``gc``: garbage collection's planning, apply and forget, and the GC lock.
- ``records``: the frozen records returned (CheckpointRecord, RecordList, Branch, ...).
- ``models`` / ``migrations``: the tables, and upgrading older schemas.
- ``names``: which branch and tag names are valid. ``errors``: the exceptions.
"""

from tlreg.registry.core import (
    CHECKPOINT_KINDS,
    NETWORK_FILESYSTEMS,
    RUN_STATUSES,
    TIERS,
    Registry,
    prefix_hashes,
    retry_on_head_moved,
)
from tlreg.registry.errors import (
    AmbiguousRef,
    BeingCollected,
    BranchExists,
    BranchNotFound,
    CheckpointExists,
    CheckpointLost,
    CheckpointPruned,
    EmptyBranch,
    HeadMoved,
    InvalidName,
    NotCollectable,
    RefNotFound,
    RegistryError,
    RegistryUnavailable,
    RunNotFound,
    SchemaVersionError,
    TagExists,
    UnsafeFilesystem,
    UnsupportedDatabase,
)
from tlreg.registry.metrics import MetricPoint, RunSummary
from tlreg.registry.names import validate_name
from tlreg.registry.records import (
    Branch,
    CheckpointRecord,
    Edge,
    GcPlan,
    RecordList,
    Run,
    Tag,
)

__all__ = [
    "CHECKPOINT_KINDS",
    "NETWORK_FILESYSTEMS",
    "RUN_STATUSES",
    "TIERS",
    "AmbiguousRef",
    "BeingCollected",
    "Branch",
    "BranchExists",
    "BranchNotFound",
    "CheckpointExists",
    "CheckpointLost",
    "CheckpointPruned",
    "CheckpointRecord",
    "Edge",
    "EmptyBranch",
    "GcPlan",
    "HeadMoved",
    "InvalidName",
    "MetricPoint",
    "NotCollectable",
    "RecordList",
    "RefNotFound",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "Run",
    "RunNotFound",
    "RunSummary",
    "SchemaVersionError",
    "Tag",
    "TagExists",
    "UnsafeFilesystem",
    "UnsupportedDatabase",
    "prefix_hashes",
    "retry_on_head_moved",
    "validate_name",
]
