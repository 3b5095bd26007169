"""Planning: what each rank writes of a state, and which frozen tensors it skips.

The first stage of a save (DESIGN §4), on the caller's thread: the state is flattened, each
tensor becomes a :class:`WriteItem` of this rank (replicated tensors go to one rank by a
byte-balanced partition every rank computes alike; a shard to the rank that holds it), gets
its offset in the staging arena, and a frozen tensor unchanged since the previous save
reuses its previous location (:class:`FrozenSkip`). The result is one :class:`SavePlan`,
which the persist and commit stages read.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from tlreg.ckpt.dtypes import dtype_name, tensor_nbytes
from tlreg.ckpt.manifest import new_manifest_id, utc_now
from tlreg.ckpt.pending import SaveStats
from tlreg.ckpt.shards import Box, Shard, is_dtensor, partition
from tlreg.ckpt.staging import align, place
from tlreg.ckpt.tree import flatten_state


@dataclass(frozen=True, slots=True)
class Stored:
    """Where one tensor (or shard) of this process ended up."""

    object: str
    object_nbytes: int
    offset: int
    hash: str


@dataclass(frozen=True, slots=True)
class Signature:
    """What identifies an unchanged tensor: its storage (alive), position, version and type.

    The weak reference makes a freed storage whose address got reused count as changed.
    """

    storage: StorageWeakRef
    key: tuple[Any, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor, box: Box | None) -> Signature | None:
        if tensor.is_inference():  # inference tensors keep no version counter
            return None
        storage = tensor.untyped_storage()
        key = (
            storage._cdata,
            tensor.storage_offset(),
            tensor._version,
            tensor.dtype,
            tuple(tensor.shape),
            tensor.stride(),
            tensor.device,
            box,
        )
        return cls(StorageWeakRef(storage), key)

    def matches(self, other: Signature) -> bool:
        return not self.storage.expired() and self.key == other.key


@dataclass(slots=True)
class WriteItem:
    """A tensor, or a block of a sharded one, that this process writes."""

    path: str
    tensor: torch.Tensor | None
    """The caller's tensor, until staged (kept for a skipped one until persisted)."""
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    box: Box | None = None
    """``(offsets, shape)`` in the global tensor when the item is a shard."""
    signature: Signature | None = None
    """Set for a frozen tensor: the next save reuses its location if it still matches."""
    reuse: Stored | None = None
    """The previous save's location of a frozen, unchanged tensor: not staged nor hashed."""
    offset: int = -1
    """Offset in the arena (-1 when not staged)."""


@dataclass(slots=True)
class SavePlan:
    """One save as planned: the manifest to be, and what this rank writes."""

    rank: int
    manifest_id: str
    step: int | None
    metadata: dict[str, Any]
    tree: Any
    created: datetime
    paths: list[str]
    """Every tensor path of the state, in order (the manifest's order)."""
    items: list[WriteItem]
    """What this rank writes."""
    sharded: dict[str, tuple[str, tuple[int, ...]]]
    """Sharded paths of the state: dtype and global shape."""
    layout: list[Any] | None
    """With several ranks: every path's kind, dtype and shape (must agree across ranks)."""
    nbytes: int = 0
    """Bytes of the staging arena (the items that are copied, at their offsets)."""
    stats: SaveStats = field(default_factory=SaveStats)
    """What the plan already knows of the save's cost (tensors, bytes to copy, skipped)."""

    @property
    def staged(self) -> list[WriteItem]:
        """The items that are copied into the arena (not skipped)."""
        return [item for item in self.items if item.reuse is None]

    def release(self) -> None:
        """Drop the caller's tensors: the save no longer reads them."""
        for item in self.items:
            item.tensor = None


class FrozenSkip:
    """The frozen-skip memory of one checkpointer: the attached models (weakly) and where the
    previous save stored each of its frozen tensors (only that save: bounded)."""

    def __init__(self) -> None:
        self._models: list[weakref.ref[torch.nn.Module]] = []
        self._previous: dict[str, tuple[Signature, Stored]] = {}
        self._lock = threading.Lock()

    def attach(self, module: torch.nn.Module) -> None:
        """Recognise ``module``'s frozen parameters; attaching twice is harmless."""
        if not any(ref() is module for ref in self._models):
            self._models.append(weakref.ref(module))

    def storages(self) -> set[int]:
        """Storages of the frozen parameters of the attached models."""
        storages: set[int] = set()
        alive = []
        for ref in self._models:
            module = ref()
            if module is None:
                continue
            alive.append(ref)
            for param in module.parameters():
                if not param.requires_grad:
                    local = param.to_local() if is_dtensor(param) else param  # type: ignore[attr-defined]
                    storages.add(local.untyped_storage()._cdata)
        self._models = alive
        return storages

    def previous(self) -> dict[str, tuple[Signature, Stored]]:
        """Where the previous committed save stored its frozen tensors, by path."""
        with self._lock:
            return self._previous

    def remember(self, plan: SavePlan, stored: list[Stored]) -> None:
        """Keep the locations of this save's frozen tensors for the next save to reuse."""
        frozen = {
            item.path: (item.signature, where)
            for item, where in zip(plan.items, stored, strict=True)
            if item.signature is not None
        }
        with self._lock:
            self._previous = frozen


def plan_save(
    state: Mapping[str, Any],
    *,
    step: int | None,
    metadata: Mapping[str, Any] | None,
    rank: int,
    world: int,
    frozen: FrozenSkip | None,
) -> SavePlan:
    """Plan the save of ``state`` by rank ``rank`` of ``world``; ``TypeError`` for a state
    that cannot be saved, before anything is copied. With ``frozen``, frozen tensors
    unchanged since its previous save are skipped."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping such as a dict, not {type(state).__name__}")
    if step is not None and type(step) is not int:
        raise TypeError(f"step must be an int or None, not {type(step).__name__}")
    meta = plain_json(metadata)
    tree, flat = flatten_state(state)
    items, sharded, layout = _items(flat, rank, world, frozen)
    plan = SavePlan(
        rank=rank,
        manifest_id=new_manifest_id(),
        step=step,
        metadata=meta,
        tree=tree,
        created=utc_now(),
        paths=list(flat),
        items=items,
        sharded=sharded,
        layout=layout,
    )
    for item in plan.staged:
        item.offset = place(plan.nbytes, item.nbytes)
        plan.nbytes = align(item.offset + item.nbytes)
    stats = plan.stats
    stats.tensors = len(flat)
    stats.logical_bytes = sum(
        tensor_nbytes(v.local if isinstance(v, Shard) else v) for v in flat.values()
    )
    stats.bytes_copied = sum(item.nbytes for item in plan.staged)
    stats.tensors_skipped = len(items) - len(plan.staged)
    return plan


def _items(
    flat: Mapping[str, torch.Tensor | Shard], rank: int, world: int, frozen: FrozenSkip | None
) -> tuple[list[WriteItem], dict[str, tuple[str, tuple[int, ...]]], list[Any] | None]:
    """What this rank writes: its share of the replicated tensors and its shards."""
    owner: dict[str, int] | None = None
    layout: list[Any] | None = None
    if world > 1:
        replicated = [(p, tensor_nbytes(v)) for p, v in flat.items() if not isinstance(v, Shard)]
        owner = partition(replicated, world)
        layout = []
    storages = frozen.storages() if frozen is not None else None
    previous = frozen.previous() if frozen is not None else {}
    items: list[WriteItem] = []
    sharded: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path, value in flat.items():
        box: Box | None = None
        if isinstance(value, Shard):
            tensor = value.local
            sharded[path] = (dtype_name(tensor.dtype), value.global_shape)
            if layout is not None:
                layout.append([path, "shard", sharded[path][0], value.global_shape])
            if not value.primary:
                continue  # a replica that another rank writes
            box = value.box
        else:
            tensor = value
            if layout is not None:
                layout.append([path, "tensor", dtype_name(tensor.dtype), tuple(tensor.shape)])
            if owner is not None and owner[path] != rank:
                continue
        item = WriteItem(
            path, tensor, tensor_nbytes(tensor), dtype_name(tensor.dtype), tuple(tensor.shape)
        )
        item.box = box
        if storages is not None and is_frozen(tensor, storages):
            item.signature = Signature.of(tensor, box)
            before = previous.get(path)
            if item.signature is not None and before is not None:
                if before[0].matches(item.signature):
                    item.reuse = before[1]
        items.append(item)
    return items, sharded, layout


def is_frozen(tensor: torch.Tensor, frozen_storages: set[int]) -> bool:
    """Whether ``tensor`` is known not to be trained (see ``AsyncCheckpointer.attach_model``)."""
    if tensor.requires_grad:
        return False
    if isinstance(tensor, torch.nn.Parameter):
        return True
    return bool(frozen_storages) and tensor.untyped_storage()._cdata in frozen_storages


def plain_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A detached copy of ``metadata``; ``TypeError`` unless it is a JSON object."""
    if metadata is None:
        return {}
    try:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"a {type(metadata).__name__}")
        copy = json.loads(json.dumps(dict(metadata), allow_nan=False))
        if copy != dict(metadata):
            raise TypeError("it changes in a JSON round trip (non-str keys or tuples)")
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be plain JSON (str keys, finite numbers, lists, dicts): {e}"
        ) from None
    return copy
