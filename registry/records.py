"""What the registry returns: plain frozen dataclasses, detached from any database session,
safe to pickle and to hand to another thread or Ray process; and RecordList, a list of them
whose deferred fields are read on first access (pickling reads them first)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, overload

from .errors import RefNotFound

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


R = TypeVar("R")


def from_row(cls: type[R], row: object, **given: Any) -> R:
    """A ``cls`` record from a table row: each field not ``given`` is the row's attribute of
    that name; a field with a default that the row lacks (one read from another table, as
    ``Run.nodes``) takes its default."""
    names, optional = _field_names(cls)  # type: ignore[arg-type]  # a class is hashable
    taken = {
        name: getattr(row, name)
        for name in names
        if name not in given and (name not in optional or hasattr(row, name))
    }
    return cls(**taken, **given)


@functools.cache
def _field_names(cls: type) -> tuple[tuple[str, ...], frozenset[str]]:
    """The fields' names, and those of the fields that have a default."""
    have_default = frozenset(
        f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING
    )
    return tuple(f.name for f in fields(cls)), have_default


def _plain_json(record: Any) -> dict[str, Any]:
    """A record's fields in order as a JSON-safe dict, datetimes as ISO-8601."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        out[f.name] = value.isoformat() if isinstance(value, datetime) else value
    return out


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
    tier: str = "shared"
    """Where its bytes are: "shared" (in the shared store), "local" (only on the node-local
    tiers of ``nodes``, not drained yet) or "lost" (a node holding a local-only share is
    gone: it is never served)."""
    nodes: tuple[str, ...] = ()
    """The nodes holding the local shares a "local" or "lost" checkpoint depends on (sorted);
    empty once it is shared."""

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
            "tier": self.tier,
            "nodes": list(self.nodes),
        }


# The deferred columns of a RecordList's rows, by checkpoint id: the id again, manifest,
# created, metrics (JSON text), logical_bytes, new_bytes, kind, message, signature (JSON text
# or None), run_id, pruned, tier, nodes (a tuple).
Deferred = Mapping[str, Sequence[Any]]


class RecordList(Sequence[CheckpointRecord]):
    """A read-only list of checkpoint records (what ``ancestors`` and ``descendants`` return).

    The call that returns it reads, in its one transaction, the structure of the answer:
    every checkpoint's ``id``, ``branch``, ``step`` and ``parents``, in order. The other
    fields (``manifest``, ``created``, ``metrics``, ``logical_bytes``, ``new_bytes``,
    ``kind``, ``message``, ``signature``, ``run_id``, ``pruned``, ``tier``, ``nodes``) are
    *deferred*: the first
    access to any record reads them for every record of the list in one more transaction
    (one query per few thousand ids), then keeps them; nothing is cached across lists.
    Checkpoint rows are never deleted and never change, except ``pruned``, which garbage
    collection sets, and ``tier`` and ``nodes`` (a local checkpoint becomes shared or lost):
    deferred values are those at that first access.

    A record is built (a dataclass, datetimes, decoded JSON) when first accessed, then kept.
    Indexing, slicing (a plain list), ``len``, iteration and ``==`` against any sequence
    behave like a list's; ``.ids`` and ``len`` read nothing more. Pickling reads the deferred
    fields first and ships them, so an unpickled list never touches a database.
    """

    __slots__ = ("_at", "_built", "_deferred", "_load", "_rows", "_signatures")

    def __init__(
        self,
        rows: Sequence[Sequence[Any]],
        deferred: Deferred | None = None,
        load: Callable[[Sequence[Sequence[Any]]], Deferred] | None = None,
    ) -> None:
        # A row: id, branch, step, lane, lane_pos, parents (JSON array text, read for a lane's
        # first checkpoint and for merges, else None), the lane's previous checkpoint id when
        # it may not be a row. ``deferred`` holds the other columns (see Deferred), or
        # ``load`` reads them for these rows.
        if deferred is None and load is None and rows:
            raise ValueError("a RecordList needs its deferred columns or a way to load them")
        self._rows = rows
        self._deferred = deferred
        self._load = load
        self._built: list[CheckpointRecord | None] = [None] * len(rows)
        self._signatures: dict[str | None, tuple[str, ...] | None] = {None: None}
        self._at: dict[tuple[str, int], str] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> CheckpointRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[CheckpointRecord]: ...
    def __getitem__(self, index: int | slice) -> CheckpointRecord | list[CheckpointRecord]:
        if isinstance(index, slice):
            return [self._record(i) for i in range(*index.indices(len(self._rows)))]
        n = len(self._rows)
        if not -n <= index < n:
            raise IndexError("record index out of range")
        return self._record(index % n)

    def __iter__(self) -> Iterator[CheckpointRecord]:
        if self._rows and self._built[-1] is None:
            self._build_all()
        return iter(self._built)  # type: ignore[arg-type]  # all built now

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(
        self,
    ) -> tuple[type[RecordList], tuple[list[tuple[Any, ...]], dict[str, tuple[Any, ...]]]]:
        deferred = self._loaded()
        return (
            RecordList,
            ([tuple(row) for row in self._rows], {k: tuple(v) for k, v in deferred.items()}),
        )

    @property
    def ids(self) -> list[str]:
        """The checkpoint ids, in order (reads and builds nothing)."""
        return [row[0] for row in self._rows]

    def _loaded(self) -> Deferred:
        """The deferred columns of every row, read now if not yet."""
        if self._deferred is None:
            assert self._load is not None  # __init__ requires one of them
            ids = self.ids
            deferred = self._load(self._rows)
            missing = [cid for cid in ids if cid not in deferred]
            if missing:  # cannot happen: checkpoint rows are never deleted
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise RefNotFound(
                    f"{len(missing)} checkpoint(s) of this lineage answer no longer exist in "
                    f"the registry ({shown}), so their deferred fields cannot be read: "
                    "was the database restored or edited? Run the query again"
                )
            self._deferred = deferred
            self._load = None
        return self._deferred

    def _record(self, i: int) -> CheckpointRecord:
        built = self._built[i]
        if built is None:
            row = self._rows[i]
            built = self._built[i] = self._build(row, self._loaded()[row[0]])
        return built

    def _build_all(self) -> None:
        """Build every record not built yet, decoding the metrics in one ``json.loads``."""
        deferred = self._loaded()
        todo = [i for i, built in enumerate(self._built) if built is None]
        rows = self._rows
        wide = [deferred[rows[i][0]] for i in todo]
        metrics = json.loads("[" + ",".join(w[3] for w in wide) + "]")
        for i, w, stored in zip(todo, wide, metrics, strict=True):
            self._built[i] = self._build(rows[i], w, stored)

    def _parents(self, row: Sequence[Any]) -> tuple[str, ...]:
        if row[5] is not None:
            return tuple(json.loads(row[5]))
        if row[4] == 0:
            return ()  # a root
        if row[6] is not None:
            return (row[6],)
        # Every other checkpoint's one parent is its lane's previous checkpoint, a row here.
        if self._at is None:
            self._at = {(r[3], r[4]): r[0] for r in self._rows}
        return (self._at[row[3], row[4] - 1],)

    def _build(
        self, row: Sequence[Any], wide: Sequence[Any], metrics: Any = None
    ) -> CheckpointRecord:
        signature = wide[8]
        if signature not in self._signatures:  # a model family shares one: decode it once
            decoded = json.loads(signature)  # JSON null: no signature
            self._signatures[signature] = None if decoded is None else tuple(decoded)
        return CheckpointRecord(
            id=row[0],
            branch=row[1],
            step=row[2],
            manifest=wide[1],
            parents=self._parents(row),
            created=utc(wide[2]),
            metrics=decode_metrics(json.loads(wide[3]) if metrics is None else metrics),
            logical_bytes=wide[4],
            new_bytes=wide[5],
            kind=wide[6],
            message=wide[7],
            signature=self._signatures[signature],
            run_id=wide[9],
            pruned=None if wide[10] is None else utc(wide[10]),
            tier=wide[11],
            nodes=tuple(wide[12]),
        )


def utc(value: datetime | str) -> datetime:
    """A stored UTC datetime, as UTCDateTime reads it back (SQLite: text without an offset)."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    if value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


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
        return _plain_json(self)


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
        return _plain_json(self)


@dataclass(frozen=True, slots=True)
class Tag:
    """An immutable name for one checkpoint."""

    name: str
    checkpoint: str
    created: datetime

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``created`` as ISO-8601)."""
        return _plain_json(self)


@dataclass(frozen=True, slots=True)
class Run:
    """A training run: ``status`` is "running", "succeeded", "failed" or "stopped" (by a
    SIGTERM, e.g. ``ray job stop``)."""

    id: int
    branch: str
    config: dict[str, Any] = field(hash=False)
    status: str
    error: str | None
    ray_job_id: str | None
    created: datetime
    finished: datetime | None
    nodes: dict[int, str] = field(default_factory=dict, hash=False)
    """The node each rank ran on (rank -> node id), as the run recorded it last
    (``Registry.record_run_nodes``); empty when it recorded none."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO-8601; ``nodes`` keyed by the rank as text)."""
        out = _plain_json(self)
        out["nodes"] = {str(rank): node for rank, node in sorted(self.nodes.items())}
        return out


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
    repacked: tuple[tuple[str, int, int], ...] = ()
    """(object, nbytes, live bytes) of mostly-unused objects whose live bytes the collection
    copied into new objects (or, in a dry run, would copy) before deleting them (filled in
    by the caller that repacks the store, see ``tlreg.ckpt.repack``)."""

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
            "repacked": [{"hash": h, "nbytes": n, "live": live} for h, n, live in self.repacked],
        }
