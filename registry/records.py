"""What the registry returns: plain frozen dataclasses, detached from any database session,
safe to pickle and to hand to another thread or Ray process."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

# JSON (and PostgreSQL's json type) has no NaN or infinity; a diverged loss is still a metric
# worth recording, so non-finite floats are stored as these strings and decoded on read.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_metrics(metrics: Mapping[str, float] | None) -> dict[str, Any]:
    """Metrics as stored: floats, with non-finite values spelled as strings."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names are strings, got {key!r}")
        number = float(value)
        if math.isnan(number):
            out[key] = "NaN"
        elif math.isinf(number):
            out[key] = "Infinity" if number > 0 else "-Infinity"
        else:
            out[key] = number
    return out


def decode_metrics(stored: Mapping[str, Any] | None) -> dict[str, float]:
    """Inverse of :func:`encode_metrics`."""
    return {
        key: _NON_FINITE[value] if isinstance(value, str) else float(value)
        for key, value in (stored or {}).items()
    }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else encode_metrics({"v": value})["v"]


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """One committed checkpoint."""

    id: str
    """The checkpoint id, equal to the manifest id."""
    branch: str
    """The branch it was committed on (kept when the branch is deleted)."""
    step: int
    manifest: str
    """The manifest id to load from the store."""
    parents: tuple[str, ...]
    """Parent checkpoint ids in parent order (first parent first)."""
    created: datetime
    """Commit time, timezone-aware UTC."""
    metrics: dict[str, float] = field(hash=False)
    logical_bytes: int
    """Bytes the checkpoint's tensors occupy."""
    new_bytes: int
    """Bytes of objects this commit added to the store (0 for a fully deduplicated one)."""
    kind: str
    """"train", "import" or "merge"."""
    message: str | None = None
    signature: tuple[str, ...] | None = None
    """The architecture signature (per-module structural hashes), if one was recorded."""
    run_id: int | None = None
    pruned: datetime | None = None
    """When garbage collection pruned it (its lineage stays; its tensors may be deleted)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO-8601, non-finite metrics as strings)."""
        return {
            "id": self.id,
            "branch": self.branch,
            "step": self.step,
            "parents": list(self.parents),
            "created": self.created.isoformat(),
            "metrics": {k: _json_float(v) for k, v in self.metrics.items()},
            "manifest": self.manifest,
            "logical_bytes": self.logical_bytes,
            "new_bytes": self.new_bytes,
            "kind": self.kind,
            "message": self.message,
            "signature": list(self.signature) if self.signature is not None else None,
            "run_id": self.run_id,
            "pruned": self.pruned.isoformat() if self.pruned is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Edge:
    """``child`` derives from ``parent``, its parent number ``position`` (0 = first parent).

    ``kind`` is "continue" (same branch), "branch" (the first commit after a branch point) or
    "merge" (one of several parents).
    """

    child: str
    parent: str
    kind: str
    position: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "child": self.child,
            "parent": self.parent,
            "kind": self.kind,
            "position": self.position,
        }


@dataclass(frozen=True, slots=True)
class Branch:
    """A branch: ``head`` is its newest checkpoint (None while empty), ``base`` where it started."""

    name: str
    head: str | None
    base: str | None
    task: str | None
    created: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``created`` as ISO-8601)."""
        return {
            "name": self.name,
            "head": self.head,
            "base": self.base,
            "task": self.task,
            "created": self.created.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Tag:
    """An immutable name for one checkpoint."""

    name: str
    checkpoint: str
    created: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``created`` as ISO-8601)."""
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "created": self.created.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Run:
    """A training run: ``status`` is "running", "succeeded" or "failed"."""

    id: int
    branch: str
    config: dict[str, Any] = field(hash=False)
    status: str
    error: str | None
    ray_job_id: str | None
    created: datetime
    finished: datetime | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO-8601)."""
        return {
            "id": self.id,
            "branch": self.branch,
            "config": self.config,
            "status": self.status,
            "error": self.error,
            "ray_job_id": self.ray_job_id,
            "created": self.created.isoformat(),
            "finished": self.finished.isoformat() if self.finished is not None else None,
        }


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What garbage collection will delete (from ``Registry.gc_plan``) or may now delete (from
    ``Registry.apply_gc``, which confirms a plan against the database as it is then).

    The registry never touches the store: the caller deletes ``objects``, ``orphan_objects``
    and ``orphan_manifests`` from it, then calls ``Registry.forget_objects``.
    """

    created: datetime
    """The planning time ("now"); orphans first seen before ``created - grace`` are due."""
    keep_last: int | None
    """Newest checkpoints kept on each branch's first-parent chain; None keeps every ancestor
    of a live branch head, base or tag."""
    grace: timedelta
    """How long an orphan must have been seen before it is deleted."""
    prune: tuple[str, ...]
    """Checkpoint ids to mark pruned (sorted); their rows and edges stay."""
    objects: tuple[tuple[str, int], ...]
    """(hash, nbytes) of registered objects no unpruned, kept checkpoint references (sorted)."""
    orphan_objects: tuple[str, ...]
    """Store objects the registry does not know, seen for longer than ``grace`` (sorted)."""
    orphan_manifests: tuple[str, ...]
    """Store manifests of no checkpoint, seen for longer than ``grace`` (sorted)."""
    waiting: int = 0
    """Orphans seen, but not yet for ``grace``: a later collection deletes them."""
    abandoned: int = 0
    """Remains of interrupted puts (temporary files, open multipart uploads) older than
    ``grace`` that the collection removed, or would remove (filled in by the caller that
    sweeps the store; the registry does not see them)."""

    @property
    def nbytes(self) -> int:
        """Bytes of ``objects`` (orphans' sizes are unknown to the registry)."""
        return sum(n for _, n in self.objects)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``created`` as ISO-8601, ``grace`` in seconds)."""
        return {
            "created": self.created.isoformat(),
            "keep_last": self.keep_last,
            "grace_seconds": self.grace.total_seconds(),
            "prune": list(self.prune),
            "objects": [{"hash": h, "nbytes": n} for h, n in self.objects],
            "nbytes": self.nbytes,
            "orphan_objects": list(self.orphan_objects),
            "orphan_manifests": list(self.orphan_manifests),
            "waiting": self.waiting,
            "abandoned": self.abandoned,
        }
