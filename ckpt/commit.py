"""Commit: merge the ranks' parts into the manifest and write it, the save's commit point.

The last stage of a save (DESIGN §4, §4.4). Alone, the process merges its one :class:`Part`
and writes the manifest. With several ranks, each rank sends its part, as JSON, to rank 0
over the checkpointer's private gloo group; rank 0 checks that every rank saved the same
structure, merges the parts and writes the manifest last, then tells every rank the outcome.
Any rank's failure fails the save on every rank, with no manifest written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tlreg.ckpt.dtypes import dtype_from_name
from tlreg.ckpt.errors import CheckpointError
from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.manifest import (
    Manifest,
    ShardEntry,
    TensorEntry,
    format_version,
    shards_digest,
    write_manifest,
)
from tlreg.ckpt.pending import SaveStats
from tlreg.ckpt.plan import SavePlan, Stored
from tlreg.ckpt.shards import Box, check_cover, volume
from tlreg.storage_backends import Store

if TYPE_CHECKING:
    from tlreg.ckpt.collective import Collective


@dataclass(slots=True)
class Part:
    """A partial manifest: what one rank stored (rank 0 merges them, :func:`merge`)."""

    rank: int
    tensors: dict[str, TensorEntry]
    """Unsharded tensors this rank wrote."""
    shards: dict[str, ShardEntry]
    """This rank's block of each sharded tensor it wrote."""
    objects: dict[str, int]
    new_bytes: int = 0
    objects_written: int = 0
    tensors_reused: int = 0
    tensors_skipped: int = 0
    layout: str = ""
    """Digest of the state's tensor layout, which every rank must share."""
    stored: list[Stored] = field(default_factory=list)
    """Per item, where it is stored (local only, not sent)."""

    def to_bytes(self) -> bytes:
        doc = {
            "rank": self.rank,
            "layout": self.layout,
            "tensors": {p: e.to_json() for p, e in self.tensors.items()},
            "shards": {p: s.to_json() for p, s in self.shards.items()},
            "objects": self.objects,
            "new_bytes": self.new_bytes,
            "objects_written": self.objects_written,
            "tensors_reused": self.tensors_reused,
            "tensors_skipped": self.tensors_skipped,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Part:
        return cls(
            rank=doc["rank"],
            tensors={p: TensorEntry.from_json(e) for p, e in doc["tensors"].items()},
            shards={p: ShardEntry.from_json(s) for p, s in doc["shards"].items()},
            objects=dict(doc["objects"]),
            new_bytes=doc["new_bytes"],
            objects_written=doc["objects_written"],
            tensors_reused=doc["tensors_reused"],
            tensors_skipped=doc["tensors_skipped"],
            layout=doc["layout"],
        )


def merge(plan: SavePlan, parts: Sequence[Part]) -> Manifest:
    """The manifest of ``plan`` from every rank's part (rank 0, or a single process)."""
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, int] = {}
    for part in parts:
        objects.update(part.objects)
    for path in plan.paths:
        if path not in plan.sharded:
            entry = next((p.tensors[path] for p in parts if path in p.tensors), None)
            if entry is None:
                raise CheckpointError(
                    f"no rank wrote tensor {path!r}: the ranks' states differ; every rank "
                    "must save the same tensors, in the same order"
                )
            tensors[path] = entry
            continue
        dtype, global_shape = plan.sharded[path]
        blocks: dict[Box, ShardEntry] = {}
        for part in parts:
            shard = part.shards.get(path)
            if shard is not None:
                blocks.setdefault(shard.box, shard)  # a block several ranks hold: one copy
        shards = sorted(blocks.values(), key=lambda s: s.offsets)
        try:
            check_cover([s.box for s in shards], global_shape, path)
        except ValueError as e:
            raise CheckpointError(f"cannot commit checkpoint {plan.manifest_id}: {e}") from None
        tensors[path] = TensorEntry(
            object="",
            offset=0,
            nbytes=volume(global_shape) * dtype_from_name(dtype).itemsize,
            dtype=dtype,
            shape=global_shape,
            hash=shards_digest(shards),
            shards=tuple(shards),
        )
    return Manifest(
        id=plan.manifest_id,
        step=plan.step,
        created=plan.created,
        tensors=tensors,
        objects=objects,
        metadata=plan.metadata,
        tree=plan.tree,
        version=format_version(tensors),
    )


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed save."""

    manifest_id: str
    manifest: Manifest | None
    """The manifest as written: on rank 0 or alone (other ranks did not write it)."""


class Committer:
    """The commit stage of one checkpointer: alone, or collective over ``collective``."""

    def __init__(self, store: Store, collective: Collective | None) -> None:
        self.store = store
        self.collective = collective

    def commit(
        self, plan: SavePlan, part: Part | None, error: BaseException | None, stats: SaveStats
    ) -> Committed:
        """Commit the save of ``plan`` (this rank's ``part``, or its ``error``); fills in the
        written totals of ``stats``. Raises this rank's error, or the save's if another rank
        failed. Every rank takes part even after its own failure, so the others learn of it."""
        if self.collective is not None:
            return self._commit_collective(self.collective, plan, part, error, stats)
        if error is not None:
            raise error
        assert part is not None
        return Committed(plan.manifest_id, self._write(plan, [part], stats))

    def _write(self, plan: SavePlan, parts: Sequence[Part], stats: SaveStats) -> Manifest:
        """Merge the parts into the manifest and write it: the save's commit point."""
        manifest = merge(plan, parts)
        write_manifest(self.store, manifest)
        stats.new_bytes = sum(p.new_bytes for p in parts)
        stats.objects_written = sum(p.objects_written for p in parts)
        stats.tensors_reused = sum(p.tensors_reused for p in parts)
        stats.tensors_skipped = sum(p.tensors_skipped for p in parts)
        stats.rank_new_bytes = [p.new_bytes for p in parts]
        return manifest

    def _commit_collective(
        self,
        collective: Collective,
        plan: SavePlan,
        part: Part | None,
        error: BaseException | None,
        stats: SaveStats,
    ) -> Committed:
        """Send this rank's part to rank 0, which writes the manifest; a failed rank sends
        its error instead of its part."""
        assert plan.layout is not None
        layout = hash_bytes(json.dumps(plan.layout, separators=(",", ":")).encode())
        if error is None and part is not None:
            part.layout = layout
            payload = part.to_bytes()
        else:
            why = f"{type(error).__name__}: {error}" if error is not None else "nothing staged"
            payload = json.dumps({"rank": collective.rank, "error": why}).encode()
        own_error = error
        manifest: Manifest | None = None
        exchange_error: BaseException | None = None
        try:
            gathered = collective.gather(payload)
            if gathered is not None:  # rank 0
                outcome, manifest, own_error = self._conclude(
                    plan, gathered, layout, own_error, stats
                )
                raw = collective.broadcast(json.dumps(outcome).encode())
            else:
                raw = collective.broadcast(None)
            outcome = json.loads(raw)
        except BaseException as e:  # the exchange itself failed (a rank died, a timeout)
            exchange_error = e
        if own_error is not None:
            raise own_error  # this rank's own failure first, its cause intact
        if exchange_error is not None:
            raise exchange_error
        if outcome["error"] is not None:
            raise CheckpointError(
                f"checkpoint {outcome['id']} was not committed: {outcome['error']}; "
                "no manifest was written"
            )
        stats.rank_new_bytes = list(outcome["new_bytes"])
        stats.new_bytes = sum(stats.rank_new_bytes)
        stats.objects_written = outcome["objects_written"]
        stats.tensors_reused = outcome["tensors_reused"]
        stats.tensors_skipped = outcome["tensors_skipped"]
        return Committed(str(outcome["id"]), manifest)

    def _conclude(
        self,
        plan: SavePlan,
        gathered: list[bytes],
        layout: str,
        error: BaseException | None,
        stats: SaveStats,
    ) -> tuple[dict[str, Any], Manifest | None, BaseException | None]:
        """Rank 0: commit unless a rank failed; the outcome every rank learns, the manifest
        written, and rank 0's own error."""
        outcome: dict[str, Any] = {"id": plan.manifest_id, "error": None}
        try:
            docs = [json.loads(raw) for raw in gathered]
            failed = [d for d in docs if "error" in d]
            if failed:
                outcome["error"] = "; ".join(
                    f"rank {d['rank']} failed: {d['error']}" for d in failed
                )
                return outcome, None, error
            parts = [Part.from_json(d) for d in docs]
            for part in parts:
                if part.layout != layout:
                    raise CheckpointError(
                        f"rank {part.rank} saved a state whose tensors (paths, dtypes or shapes) "
                        "differ from rank 0's; every rank must save the same structure"
                    )
            manifest = self._write(plan, parts, stats)
        except BaseException as e:
            outcome["error"] = f"rank 0 failed: {type(e).__name__}: {e}"
            return outcome, None, error or e
        outcome.update(
            new_bytes=stats.rank_new_bytes,
            objects_written=stats.objects_written,
            tensors_reused=stats.tensors_reused,
            tensors_skipped=stats.tensors_skipped,
        )
        return outcome, manifest, error
