"""tlreg.ckpt — the checkpoint format and the asynchronous checkpoint engine.

Save nested PyTorch state off the training path as content-addressed Zarr v3 objects plus a
JSON manifest, and load it back bit-exactly::

    with AsyncCheckpointer("/scratch/ckpts") as ckpt:
        pending = ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, step=10)
        ...                                   # train on; pending.staged is already done
        state = ckpt.load(pending.result())   # manifest id once durable

With several ranks (torch.distributed initialised), construct it on every rank with
``process_group=torch.distributed.group.WORLD`` and call ``save()`` on every rank in the same
order: each rank writes a byte-balanced share of the replicated tensors and its own
shards (:class:`Shard`, or DTensor blocks), rank 0 writes the manifest last, and every rank's
``pending.result()`` gives the same manifest id (or raises when any rank failed).
``load(id, shards={path: (offsets, shape)})`` reads back any block of a tensor, whichever ranks
wrote it.

Rooms, in the order a save walks through them:

- ``checkpointer`` — :class:`AsyncCheckpointer`, the facade: a save enters here once;
- ``plan`` — what each rank writes (write items, the save plan, frozen-skip);
- ``staging`` — copying the tensors into reusable host arenas;
- ``persist`` — hash → dedup → pack → write objects (thread pool or writer process);
- ``writer`` — the writer process (hashing and object writes outside the training process);
- ``commit`` — merge the ranks' parts and write the manifest (the collective exchange);
- ``collective`` — the private gloo group the ranks commit over;
- ``pending`` — :class:`PendingSave` and :class:`SaveStats`;
- ``restore`` — the read plan of ``load``: in-place targets, shard assembly, verified reads;
- ``objects`` — the one object I/O layer: layout, write unless stored, read into, damage;
- ``hashing`` — BLAKE3 and its threading threshold;
- ``tasks`` — groups of tasks on a shared thread pool;
- ``manifest`` — the manifest format;  ``tree`` — flattening nested state;
- ``shards`` — :class:`Shard` and block geometry;  ``dtypes`` — dtype names and bytes;
- ``view`` — a read-only Zarr v3 view of a checkpoint;  ``verify`` — re-check every hash;
- ``diff`` — what changed between two manifests;  ``errors`` — the error hierarchy.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlreg.ckpt.checkpointer import AsyncCheckpointer
    from tlreg.ckpt.errors import (
        CheckpointError,
        CheckpointNotFound,
        CorruptCheckpoint,
        UnsupportedFormat,
        WriterError,
    )
    from tlreg.ckpt.manifest import Manifest, ShardEntry, TensorEntry, read_manifest
    from tlreg.ckpt.pending import PendingSave, SaveStats
    from tlreg.ckpt.persist import PACK_BYTES, SOLO_BYTES
    from tlreg.ckpt.shards import Shard
    from tlreg.ckpt.tree import flatten_state, unflatten_state
    from tlreg.ckpt.verify import VerifyReport, verify
    from tlreg.ckpt.view import open_checkpoint

# Imported on first use (PEP 562), so that the writer process, which needs only
# tlreg.ckpt.writer, starts without importing torch and zarr.
_EXPORTS = {
    "PACK_BYTES": "persist",
    "SOLO_BYTES": "persist",
    "AsyncCheckpointer": "checkpointer",
    "PendingSave": "pending",
    "SaveStats": "pending",
    "CheckpointError": "errors",
    "CheckpointNotFound": "errors",
    "CorruptCheckpoint": "errors",
    "UnsupportedFormat": "errors",
    "WriterError": "errors",
    "Manifest": "manifest",
    "ShardEntry": "manifest",
    "TensorEntry": "manifest",
    "read_manifest": "manifest",
    "Shard": "shards",
    "flatten_state": "tree",
    "unflatten_state": "tree",
    "VerifyReport": "verify",
    "verify": "verify",
    "open_checkpoint": "view",
}

__all__ = [
    "PACK_BYTES",
    "SOLO_BYTES",
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointNotFound",
    "CorruptCheckpoint",
    "Manifest",
    "PendingSave",
    "SaveStats",
    "Shard",
    "ShardEntry",
    "TensorEntry",
    "UnsupportedFormat",
    "VerifyReport",
    "WriterError",
    "flatten_state",
    "open_checkpoint",
    "read_manifest",
    "unflatten_state",
    "verify",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tlreg.ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tlreg.ckpt.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """This package, whose ``verify`` stays the function when its submodule
    ``tlreg.ckpt.verify`` is imported (the import system would set the module in its place)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "verify" and isinstance(value, types.ModuleType):
            return  # tlreg.ckpt.verify(...) is the function; the module is in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
