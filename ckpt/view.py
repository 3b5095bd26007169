"""A read-only Zarr v3 view of one checkpoint: every tensor is an array at its state path.

::

    group = open_checkpoint("/scratch/ckpts", manifest_id)
    group["model/fc.weight"][:8]           # reads only the bytes of those rows
    group["optimizer/state/0/exp_avg"].attrs["tlreg"]["torch_dtype"]

:class:`CheckpointStore` is a ``zarr.abc.store.Store`` that holds no data of its own. It
synthesises a ``zarr.json`` document for every node from the manifest and maps each chunk key
onto a byte range of the packed objects, which it reads through
:class:`tlreg.ckpt.objects.ObjectReader`; so any zarr-python code (``zarr.open_group``, dask,
xarray) can read a checkpoint without loading it. Nothing is written, ever: the store is
read-only, so zarr needs ``mode="r"`` to open it
(``zarr.open_group(CheckpointStore(...), mode="r")``, which :func:`open_checkpoint` does),
and any write raises :class:`ReadOnlyView`.

Layout
    A state path is split on ``/`` into nested groups: ``model/features.1.weight`` is the
    array ``features.1.weight`` in the group ``model``, so ``group["model"]`` lists the model's
    tensors and ``group["model/features.1.weight"]`` opens one. The root group's attributes
    hold ``{"tlreg": {"manifest", "step", "created", "metadata", "omitted"}}``. A path that
    cannot be a zarr node (an empty or dots-only part, one starting with ``__`` or named
    ``zarr.json``, or a tensor whose path is also the folder of another tensor, which a key
    containing ``/`` can produce) is left out and listed in ``omitted`` with the reason; every
    other tensor of the manifest is present.

Data types
    Tensors keep their shape. A dtype numpy has (bool, ints, float16/32/64, complex64/128) is
    stored as itself; any other (bfloat16, complex32, the float8/float4 and bits dtypes) as the
    unsigned integer of the same width holding the raw bits (bfloat16 -> ``uint16``), so
    ``torch.from_numpy(a[...]).view(torch.bfloat16)`` restores it. Every array's attributes
    hold ``{"tlreg": {"path", "torch_dtype", "hash"}}``: the state path, the torch dtype name
    and the BLAKE3 hash of the whole tensor's bytes (little-endian, as written).

Chunks
    Each array is chunked along its leading axes so that a chunk is one contiguous byte range
    of the tensor of at most ``chunk_bytes``: reading a slice reads only the chunks it touches,
    and each chunk is at most two range reads of the object files. The view does not verify
    hashes (a slice cannot be checked against the whole tensor's hash); use
    :func:`tlreg.ckpt.verify` or ``AsyncCheckpointer.load`` for verified reads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    SuffixByteRequest,
)
from zarr.abc.store import Store as ZarrStore
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from tlreg.ckpt.dtypes import DTYPES
from tlreg.ckpt.errors import CheckpointError, CorruptCheckpoint
from tlreg.ckpt.manifest import Manifest, TensorEntry
from tlreg.ckpt.objects import ObjectReader
from tlreg.ckpt.verify import quick_check
from tlreg.storage_backends import Store, open_store

__all__ = [
    "VIEW_CHUNK_BYTES",
    "CheckpointStore",
    "NoWritableView",
    "ReadOnlyView",
    "dimension_names",
    "open_checkpoint",
]

VIEW_CHUNK_BYTES = 4 << 20
"""Default size of an array chunk in the view: small enough that a slice reads little more
than it needs, large enough that reading a whole tensor costs few requests."""

_META = "zarr.json"
# dtypes whose name is also a zarr v3 data type; the value is the fill value zarr expects
_NATIVE: dict[str, Any] = {
    "bool": False,
    **{f"{k}{n}": 0 for k in ("int", "uint") for n in (8, 16, 32, 64)},
    "float16": 0.0,
    "float32": 0.0,
    "float64": 0.0,
    "complex64": [0.0, 0.0],
    "complex128": [0.0, 0.0],
}


class ReadOnlyView(CheckpointError, PermissionError, ValueError):
    """Something tried to write to the read-only view of a checkpoint. Also a ValueError
    whose message starts as zarr's own refusal does ("store was opened in read-only mode and
    does not support writing"): code written for zarr's read-only stores catches it."""


class NoWritableView(ReadOnlyView, NotImplementedError):
    """``with_read_only(False)`` of a checkpoint view: there is no writable one (zarr's
    convention for stores without a writable twin: NotImplementedError, zarr's message)."""


_ZARR_READ_ONLY = "store was opened in read-only mode and does not support writing"


def open_checkpoint(
    store: str | Store, manifest_id: str, *, chunk_bytes: int = VIEW_CHUNK_BYTES
) -> zarr.Group:
    """Open checkpoint ``manifest_id`` in ``store`` as a read-only Zarr v3 group.

    Its arrays are the checkpoint's tensors at their state paths (nested groups split on
    ``/``), see :mod:`tlreg.ckpt.view` for the layout and dtypes. Raises
    :class:`~tlreg.ckpt.CheckpointNotFound` if there is no such manifest.
    """
    return zarr.open_group(CheckpointStore(store, manifest_id, chunk_bytes=chunk_bytes), mode="r")


@dataclass(frozen=True, slots=True)
class _ArrayView:
    """One tensor as an array: its entry and a chunk grid of contiguous byte ranges."""

    entry: TensorEntry
    itemsize: int
    chunks: tuple[int, ...]
    split: int
    """The chunked axis: chunks span 1 element on the axes before it, all after it."""

    @classmethod
    def plan(cls, entry: TensorEntry, chunk_bytes: int) -> _ArrayView:
        shape = entry.shape
        itemsize = DTYPES[entry.dtype].itemsize if entry.dtype in DTYPES else 0
        if itemsize == 0 or math.prod(shape) * itemsize != entry.nbytes:
            raise CorruptCheckpoint(
                f"tensor {entry.dtype}{list(shape)} has {entry.nbytes} bytes in the manifest; "
                "the manifest is damaged or was written by a newer tlreg"
            )
        if not shape:
            return cls(entry, itemsize, (), 0)
        if entry.nbytes == 0:  # never read; zarr only needs positive chunk sizes
            return cls(entry, itemsize, tuple(max(1, n) for n in shape), 0)
        inner = itemsize
        split = len(shape) - 1
        while split > 0 and inner * shape[split] <= chunk_bytes:
            inner *= shape[split]
            split -= 1
        if inner * shape[split] <= chunk_bytes:
            rows = shape[split]
        else:
            rows = max(1, chunk_bytes // inner)
        chunks = (1,) * split + (rows,) + tuple(shape[split + 1 :])
        return cls(entry, itemsize, chunks, split)

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one (full) chunk."""
        return math.prod(self.chunks) * self.itemsize

    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(-(-n // c) for n, c in zip(self.entry.shape, self.chunks, strict=True))

    def chunk_keys(self) -> Iterator[str]:
        """The key of every chunk, relative to the array."""
        if self.entry.nbytes == 0 and self.entry.shape:
            return
        coords: list[tuple[int, ...]] = [()]
        for n in self.grid():
            coords = [(*c, i) for c in coords for i in range(n)]
        for c in coords:
            yield "/".join(["c", *map(str, c)])

    def locate(self, key: str) -> tuple[int, int] | None:
        """``(start, length)`` in the tensor's bytes of chunk ``key`` (relative to the array),
        or None if there is no such chunk. ``length`` is short for the last chunk along the
        split axis: zarr expects a full chunk, the rest is padding."""
        parts = key.split("/")
        shape = self.entry.shape
        if parts[0] != "c" or len(parts) != len(shape) + 1 or self.entry.nbytes == 0:
            return None
        try:
            coords = [int(p) for p in parts[1:]]
        except ValueError:
            return None
        if any(str(c) != p for c, p in zip(coords, parts[1:], strict=True)):
            return None  # not the canonical spelling zarr uses ("01", "+1")
        if not shape:
            return 0, self.entry.nbytes
        if any(not 0 <= c < n for c, n in zip(coords, self.grid(), strict=True)):
            return None
        index = 0  # element index of the chunk's first element, C order
        for axis, n in enumerate(shape):
            index = index * n + coords[axis] * self.chunks[axis]
        rows = min(
            self.chunks[self.split],
            shape[self.split] - coords[self.split] * self.chunks[self.split],
        )
        inner = math.prod(shape[self.split + 1 :])
        return index * self.itemsize, rows * inner * self.itemsize

    def zarr_json(self, path: str) -> bytes:
        entry = self.entry
        native = entry.dtype in _NATIVE
        data_type = entry.dtype if native else f"uint{8 * self.itemsize}"
        bytes_codec: dict[str, Any] = {"name": "bytes"}
        if self.itemsize > 1:
            bytes_codec["configuration"] = {"endian": "little"}
        meta = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(entry.shape),
            "data_type": data_type,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(self.chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": _NATIVE[entry.dtype] if native else 0,
            "codecs": [bytes_codec],
            "attributes": {"tlreg": {"path": path, "torch_dtype": entry.dtype, "hash": entry.hash}},
            "dimension_names": dimension_names(path, len(entry.shape)),
            "storage_transformers": [],
        }
        return json.dumps(meta, indent=2).encode()


def dimension_names(path: str, ndim: int) -> list[str]:
    """The names of the axes of the array at state path ``path``: ``NAME#0``, ``NAME#1``,
    ... (``NAME`` its last part). Tensors share no axes, so no two arrays of a group share a
    name: xarray (which needs names) opens a group as one Dataset whatever the shapes."""
    name = path.rpartition("/")[2]
    return [f"{name}#{axis}" for axis in range(ndim)]


def _omission(path: str) -> str | None:
    """Why ``path`` cannot be a zarr node path, or None if it can."""
    for part in path.split("/"):
        if not part or set(part) == {"."}:
            return "it has an empty or dots-only part"
        if part.startswith("__"):
            return f"its part {part!r} starts with '__', which Zarr v3 reserves"
        if part == _META:
            return f"its part {part!r} is the name of Zarr's metadata document"
    return None


class CheckpointStore(ZarrStore):
    """A read-only ``zarr.abc.store.Store`` presenting one checkpoint as a Zarr v3 hierarchy.

    ``store`` is the tlreg store (or its URL) holding the checkpoint; the manifest is read once,
    here. ``chunk_bytes`` is the largest chunk of the synthesised arrays. Open it with
    ``zarr.open_group(CheckpointStore(...), mode="r")`` or use :func:`open_checkpoint`.

    It follows zarr's conventions for a read-only store (and passes zarr's own
    ``zarr.testing.store.StoreTests`` in their read-only form): ``read_only=True`` is its
    constructor's default and ``read_only=False`` a ValueError; every write raises
    :class:`ReadOnlyView`, a ValueError with zarr's message; ``with_read_only(True)`` is an
    equal view and ``with_read_only(False)`` raises NotImplementedError; a byte request that
    is no ``ByteRequest`` is a TypeError "Unexpected byte_range, got ...". Every array has
    ``dimension_names`` (see :func:`dimension_names`) and every group its descendants'
    metadata inline (consolidated), so ``xarray.open_zarr(view, group="model",
    zarr_format=3)`` and ``dask.array.from_zarr(view, component=PATH)`` read it.
    """

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(
        self,
        store: str | Store,
        manifest_id: str,
        *,
        chunk_bytes: int = VIEW_CHUNK_BYTES,
        read_only: bool = True,
    ) -> None:
        if not read_only:
            raise ValueError(
                "a checkpoint view is read-only: open it with read_only=True (the default); "
                "save a new checkpoint with AsyncCheckpointer.save instead"
            )
        super().__init__(read_only=True)
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.store = open_store(store)
        # validated, and every object's size checked against the store's (no byte reads)
        self.manifest: Manifest = quick_check(self.store, manifest_id)
        self.chunk_bytes = chunk_bytes
        self._reader = ObjectReader(self.store, self.manifest.id)
        self._arrays: dict[str, _ArrayView] = {}
        self.omitted: dict[str, str] = {}
        self._build()

    def _build(self) -> None:
        valid: list[str] = []
        for path in self.manifest.tensors:
            reason = _omission(path)
            if reason is None:
                valid.append(path)
            else:
                self.omitted[path] = reason
        groups = {""}
        for path in valid:
            parts = path.split("/")
            groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
        # children of every node: the names list_dir yields
        self._children: dict[str, list[str]] = {g: [_META] for g in groups}
        for path in valid:
            if path in groups:
                self.omitted[path] = "another tensor's path has it as its folder"
                continue
            self._arrays[path] = _ArrayView.plan(self.manifest.tensors[path], self.chunk_bytes)
        for node in sorted(groups - {""}) + list(self._arrays):
            parent, _, name = node.rpartition("/")
            self._children[parent].append(name)
        for path, view in self._arrays.items():
            self._children[path] = [_META, "c"] if view.entry.nbytes else [_META]
        self._docs: dict[str, bytes] = {}
        for group in groups:
            attrs: dict[str, Any] = {}
            if group == "":
                attrs = {
                    "tlreg": {
                        "manifest": self.manifest.id,
                        "step": self.manifest.step,
                        "created": self.manifest.created.isoformat(),
                        "metadata": self.manifest.metadata,
                        "omitted": self.omitted,
                    }
                }
            self._docs[_join(group, _META)] = json.dumps(
                {"zarr_format": 3, "node_type": "group", "attributes": attrs}
            ).encode()
        for path, view in self._arrays.items():
            self._docs[_join(path, _META)] = view.zarr_json(path)
        self._consolidate(groups)

    def _consolidate(self, groups: set[str]) -> None:
        """Give every group's document the metadata of every node below it, inline (Zarr v3's
        consolidated metadata, as ``zarr.consolidate_metadata`` writes it): readers that look
        for it (xarray by default) open a group from one document, without listing."""
        nodes = {key[: -len(_META)].rstrip("/"): json.loads(doc) for key, doc in self._docs.items()}
        for group in groups:
            head = f"{group}/" if group else ""
            below = {
                node[len(head) :]: meta
                for node, meta in sorted(nodes.items())
                if node and node.startswith(head) and node != group
            }
            doc = dict(nodes[group])
            doc["consolidated_metadata"] = {
                "kind": "inline",
                "must_understand": False,
                "metadata": below,
            }
            self._docs[_join(group, _META)] = json.dumps(doc, indent=2).encode()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.store.url!r}, {self.manifest.id!r})"

    def __str__(self) -> str:
        return f"tlreg-checkpoint://{self.manifest.id}@{self.store.url}"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CheckpointStore)
            and other.store.url == self.store.url
            and other.manifest.id == self.manifest.id
            and other.chunk_bytes == self.chunk_bytes
        )

    def __hash__(self) -> int:
        return hash((self.store.url, self.manifest.id, self.chunk_bytes))

    @property
    def paths(self) -> list[str]:
        """The state paths that are arrays of the view, in the manifest's order."""
        return list(self._arrays)

    def with_read_only(self, read_only: bool = False) -> CheckpointStore:
        # docstring inherited
        if not read_only:
            raise NoWritableView(
                f"with_read_only is not implemented for the {type(self)} store type. "
                f"{self!r} is a read-only view of a checkpoint: save a new checkpoint with "
                "AsyncCheckpointer.save instead"
            )
        view = copy.copy(self)  # a new store over the same checkpoint, closed as zarr's are
        view._is_open = False
        return view

    # -- reads --------------------------------------------------------------------------

    def _chunk(self, key: str) -> tuple[_ArrayView, str, int, int] | None:
        """The array, its path, and the tensor byte offset and data length of chunk ``key``
        (None if ``key`` is no chunk)."""
        parts = key.split("/")
        for i, part in enumerate(parts):
            if part == "c":
                path = "/".join(parts[:i])
                view = self._arrays.get(path)
                if view is not None:
                    where = view.locate("/".join(parts[i:]))
                    return None if where is None else (view, path, *where)
        return None

    def _read_into(self, path: str, digest: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes of object ``digest`` from ``start``."""
        self._reader.read_into(digest, start, out, f"tensor {path!r}")

    def _read_chunk(self, key: str, byte_range: ByteRequest | None) -> bytearray | None:
        found = self._chunk(key)
        if found is None:
            return None
        view, path, base, length = found
        lo, hi = _resolve(byte_range, view.chunk_nbytes)
        if view.entry.sharded:
            return self._assemble(view, path, key)[lo:hi]
        out = bytearray(hi - lo)  # zeros: the padding past the tensor's end
        data_hi = min(hi, length)
        if data_hi > lo:
            entry = view.entry
            self._read_into(
                path, entry.object, entry.offset + base + lo, memoryview(out)[: data_hi - lo]
            )
        return out

    def _assemble(self, view: _ArrayView, path: str, key: str) -> bytearray:
        """A chunk of a sharded tensor, copied together from the shards it overlaps."""
        coords = [int(p) for p in key[len(path) + 1 :].split("/")[1:]]
        starts = [c * n for c, n in zip(coords, view.chunks, strict=True)]
        ends = [
            min(s + n, t) for s, n, t in zip(starts, view.chunks, view.entry.shape, strict=True)
        ]
        cell = np.dtype(f"V{view.itemsize}")
        out = np.zeros(view.chunks, dtype=cell)
        for shard in view.entry.shards:
            lo = [max(s, o) for s, o in zip(starts, shard.offsets, strict=True)]
            hi = [min(e, o + n) for e, o, n in zip(ends, shard.offsets, shard.shape, strict=True)]
            if shard.nbytes == 0 or any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            # whole rows (along axis 0) of the shard are one contiguous byte range
            row = math.prod(shard.shape[1:]) * view.itemsize
            first, last = lo[0] - shard.offsets[0], hi[0] - shard.offsets[0]
            raw = bytearray((last - first) * row)
            self._read_into(path, shard.object, shard.offset + first * row, memoryview(raw))
            block = np.frombuffer(raw, dtype=cell).reshape(last - first, *shard.shape[1:])
            src = (
                slice(None),
                *(
                    slice(a - o, b - o)
                    for a, b, o in zip(lo[1:], hi[1:], shard.offsets[1:], strict=True)
                ),
            )
            dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, starts, strict=True))
            out[dst] = block[src]
        return bytearray(out.tobytes())

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        # docstring inherited
        prototype = prototype or default_buffer_prototype()
        doc = self._docs.get(key)
        if doc is not None:
            lo, hi = _resolve(byte_range, len(doc))
            return prototype.buffer.from_bytes(doc[lo:hi])
        data = await asyncio.to_thread(self._read_chunk, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        # docstring inherited
        return list(
            await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges))
        )

    async def exists(self, key: str) -> bool:
        # docstring inherited
        return key in self._docs or self._chunk(key) is not None

    async def getsize(self, key: str) -> int:
        # docstring inherited
        doc = self._docs.get(key)
        if doc is not None:
            return len(doc)
        found = self._chunk(key)
        if found is None:
            raise FileNotFoundError(key)
        return found[0].chunk_nbytes

    # -- listing ------------------------------------------------------------------------

    def _keys(self) -> Iterator[str]:
        yield from self._docs
        for path, view in self._arrays.items():
            for key in view.chunk_keys():
                yield f"{path}/{key}"

    async def list(self) -> AsyncIterator[str]:
        # docstring inherited
        for key in self._keys():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        for key in self._keys():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        prefix = prefix.rstrip("/")
        children = self._children.get(prefix)
        if children is not None:
            for name in children:
                yield name
            return
        seen: set[str] = set()
        head = f"{prefix}/" if prefix else ""
        for key in self._keys():
            if key.startswith(head):
                name = key[len(head) :].split("/", 1)[0]
                if name not in seen:
                    seen.add(name)
                    yield name

    # -- writes -------------------------------------------------------------------------

    def _refuse(self, what: str) -> ReadOnlyView:
        return ReadOnlyView(
            f"{_ZARR_READ_ONLY}: cannot {what}: {self} is a read-only view of a checkpoint; "
            "save a new checkpoint with AsyncCheckpointer.save instead"
        )

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        raise self._refuse(f"write {key!r}")

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        raise self._refuse(f"write {key!r}")

    async def delete(self, key: str) -> None:
        # docstring inherited
        raise self._refuse(f"delete {key!r}")

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        raise self._refuse(f"delete {prefix!r}")

    async def clear(self) -> None:
        # docstring inherited
        raise self._refuse("clear the store")


def _join(node: str, name: str) -> str:
    return f"{node}/{name}" if node else name


def _resolve(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """``[lo, hi)`` of a zarr byte request on a value of ``size`` bytes."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(max(byte_range.end, byte_range.start), size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"Unexpected byte_range, got {byte_range}.")  # zarr's own words
