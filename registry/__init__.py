"""tlreg.registry: the lineage registry (branches, checkpoints, tags, runs) over SQLModel.

SQLite is the embedded default (``sqlite:///path.db``); PostgreSQL serves clusters
(``postgresql+psycopg://user@host/db``). Lineage, no tensors: the checkpoints' bytes live in the
store, and the registry row is the commit.
"""

from tlreg.registry.core import CHECKPOINT_KINDS, RUN_STATUSES, Registry, prefix_hashes
from tlreg.registry.errors import (
    AmbiguousRef,
    BranchExists,
    BranchNotFound,
    CheckpointExists,
    EmptyBranch,
    HeadMoved,
    InvalidName,
    RefNotFound,
    RegistryError,
    RunNotFound,
    SchemaVersionError,
    TagExists,
    UnsupportedDatabase,
)
from tlreg.registry.names import validate_name
from tlreg.registry.records import Branch, CheckpointRecord, Edge, Run, Tag

__all__ = [
    "CHECKPOINT_KINDS",
    "RUN_STATUSES",
    "AmbiguousRef",
    "Branch",
    "BranchExists",
    "BranchNotFound",
    "CheckpointExists",
    "CheckpointRecord",
    "Edge",
    "EmptyBranch",
    "HeadMoved",
    "InvalidName",
    "RefNotFound",
    "Registry",
    "RegistryError",
    "Run",
    "RunNotFound",
    "SchemaVersionError",
    "Tag",
    "TagExists",
    "UnsupportedDatabase",
    "prefix_hashes",
    "validate_name",
]
