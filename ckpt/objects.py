"""Objects: immutable, content-addressed Zarr v3 arrays of bytes.

An object is a 1-D ``uint8`` Zarr v3 array at ``objects/<h0h1>/<h2h3>/<hash>/`` whose name is
the BLAKE3 hash of its bytes: ``zarr.json`` plus chunk files ``c/0``, ``c/1``, ... (default
chunk key encoding, uncompressed ``bytes`` codec), so ``zarr.open_array`` reads any object.

The engine writes the chunk files itself, from the staged buffers, and writes ``zarr.json``
last: its existence marks a complete object, and it is what dedup checks.

This module is the one object I/O layer: writing an object unless it is stored
(:func:`write_unless_stored`, then :func:`write_marker`), reading a byte range into a buffer
(:class:`ObjectReader`, with its :class:`LayoutCache`), reading whole chunks
(:func:`iter_chunks`), and the one "damaged object" error (:meth:`ObjectReader.damaged`).
The engine (:mod:`~tlreg.ckpt.persist`, :mod:`~tlreg.ckpt.restore`), the writer process,
the zarr view and :func:`~tlreg.ckpt.verify` all go through it. Zarr v3 expects
every chunk at full chunk size, the final one included (zarr-python refuses a short one), so
the chunk size is chosen per object as ``ceil(nbytes / k)`` for the smallest ``k`` that keeps
chunks under the target: the zero padding of the last chunk is then below ``k`` bytes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tlreg.ckpt.errors import CorruptCheckpoint, UnsupportedFormat
from tlreg.ckpt.hashing import hash_bytes
from tlreg.storage_backends import ObjectNotFound, Store

OBJECTS = "objects"
CHUNK_BYTES = 16 << 20
"""Target chunk size: large sequential writes, few files, bounded read amplification."""

_ZEROS = bytes(1 << 16)


def object_prefix(digest: str) -> str:
    """The folder of object ``digest`` (fanned out so no directory holds millions of entries)."""
    return f"{OBJECTS}/{digest[:2]}/{digest[2:4]}/{digest}"


def meta_key(digest: str) -> str:
    """Key of the object's ``zarr.json``; its existence means the object is complete."""
    return f"{object_prefix(digest)}/zarr.json"


def chunk_key(digest: str, index: int) -> str:
    """Key of chunk ``index`` of the object (zarr v3 default chunk key encoding)."""
    return f"{object_prefix(digest)}/c/{index}"


@dataclass(frozen=True)
class ObjectLayout:
    """Size and chunking of one object."""

    nbytes: int
    chunk: int

    @classmethod
    def plan(cls, nbytes: int, target: int | None = None) -> ObjectLayout:
        """Chunking for an object of ``nbytes`` (> 0) with chunks of at most ``target``
        (default :data:`CHUNK_BYTES`)."""
        target = target or CHUNK_BYTES
        if nbytes <= 0:
            raise ValueError("an object holds at least one byte")
        count = -(-nbytes // target)
        return cls(nbytes, -(-nbytes // count))

    @property
    def nchunks(self) -> int:
        """Number of chunk files."""
        return -(-self.nbytes // self.chunk)

    def zarr_json(self) -> bytes:
        """The object's ``zarr.json``."""
        meta = {
            "zarr_format": 3,
            "node_type": "array",
            "shape": [self.nbytes],
            "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [self.chunk]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0,
            "codecs": [{"name": "bytes"}],
            "attributes": {},
            "storage_transformers": [],
        }
        return json.dumps(meta, indent=2).encode()

    @classmethod
    def from_zarr_json(cls, raw: bytes, *, name: str) -> ObjectLayout:
        """Parse an object's ``zarr.json``; :class:`UnsupportedFormat` unless it is exactly
        what tlreg writes (1-D uint8, regular chunks, default keys, uncompressed bytes)."""
        try:
            meta: Any = json.loads(raw)
            (nbytes,) = meta["shape"]
            (chunk,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
            ok = (
                meta["zarr_format"] == 3
                and meta["node_type"] == "array"
                and meta["data_type"] == "uint8"
                and meta["chunk_grid"]["name"] == "regular"
                and meta["chunk_key_encoding"]
                == {"name": "default", "configuration": {"separator": "/"}}
                and [c["name"] for c in meta["codecs"]] == ["bytes"]
                and not meta.get("storage_transformers")
                and type(nbytes) is int
                and type(chunk) is int
                and nbytes > 0
                and chunk > 0
                # byte for byte what tlreg writes, so that no damaged byte goes unnoticed
                and bytes(raw) == cls(nbytes, chunk).zarr_json()
            )
        except (ValueError, KeyError, TypeError) as e:
            raise UnsupportedFormat(f"{name} has unreadable zarr.json ({e!r})") from None
        if not ok:
            raise UnsupportedFormat(
                f"{name} is not a tlreg object as written (expected a 1-D uint8 array with the "
                "plain bytes codec, in tlreg's layout): it is damaged or another tool wrote it"
            )
        return cls(nbytes, chunk)

    def pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(chunk index, offset in chunk, length)`` covering bytes ``[start, start+length)``."""
        end = start + length
        while start < end:
            index, offset = divmod(start, self.chunk)
            n = min(self.chunk - offset, end - start)
            yield index, offset, n
            start += n


def split_chunks(parts: Sequence[memoryview], layout: ObjectLayout) -> list[list[memoryview]]:
    """Cut the object's bytes (``parts`` back to back, ``layout.nbytes`` in all) into the
    buffers of each chunk file, the last padded with zeros to the full chunk size."""
    chunks: list[list[memoryview]] = [[]]
    room = layout.chunk
    for part in parts:
        while part:
            if room == 0:
                chunks.append([])
                room = layout.chunk
            take = part[:room]
            chunks[-1].append(take)
            room -= len(take)
            part = part[len(take) :]
    while room:
        pad = memoryview(_ZEROS)[: min(room, len(_ZEROS))]
        chunks[-1].append(pad)
        room -= len(pad)
    if len(chunks) != layout.nchunks:
        raise AssertionError(f"{len(chunks)} chunks for a layout of {layout.nchunks}")
    return chunks


def zero_pad(nbytes: int) -> memoryview:
    """``nbytes`` (< 64 KiB) zero bytes, without allocating."""
    return memoryview(_ZEROS)[:nbytes]


def read_layout(store: Store, digest: str) -> ObjectLayout:
    """Read an object's layout from its ``zarr.json`` (``ObjectNotFound`` if incomplete)."""
    return ObjectLayout.from_zarr_json(store.get(meta_key(digest)), name=f"object {digest}")


def is_stored(store: Store, digest: str) -> bool:
    """Whether object ``digest`` is complete in ``store`` (its ``zarr.json`` exists)."""
    return store.exists(meta_key(digest))


def write_unless_stored(
    store: Store,
    digest: str,
    parts: Sequence[memoryview],
    nbytes: int,
    put: Callable[[str, list[memoryview]], Any] | None = None,
) -> ObjectLayout | None:
    """Write the chunks of object ``digest`` (``parts`` back to back, ``nbytes`` in all)
    unless it is already stored; its layout, or None when it was stored.

    The object-sized :meth:`Store.put_if_absent`: one existence check on ``zarr.json``, then
    the chunks (by ``put(key, buffers)``, default ``store.put``; a caller passes its thread
    pool's submit to write them in parallel). Content-addressed, so a concurrent writer of
    the same object writes the same bytes. The object is complete only once
    :func:`write_marker` has written its ``zarr.json``, after every chunk is durable.
    """
    if is_stored(store, digest):
        return None  # by an earlier save or another process
    layout = ObjectLayout.plan(nbytes)
    write = put or store.put
    for i, chunk in enumerate(split_chunks(parts, layout)):
        write(chunk_key(digest, i), chunk)
    return layout


def write_marker(store: Store, digest: str, layout: ObjectLayout) -> None:
    """Write the ``zarr.json`` that marks object ``digest`` complete (its chunks are durable)."""
    store.put(meta_key(digest), layout.zarr_json())


def iter_chunks(store: Store, digest: str, layout: ObjectLayout) -> Iterator[memoryview]:
    """Each chunk file of the object, whole and in order (``ObjectNotFound`` for a lost one)."""
    for index in range(layout.nchunks):
        yield memoryview(store.get(chunk_key(digest, index)))


class LayoutCache:
    """Layouts of objects already read (objects are immutable): the most recent ``size``."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._size = size
        self._layouts: OrderedDict[str, ObjectLayout] = OrderedDict()
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return LayoutCache, (self._size,)  # pickles empty (it is only a cache)

    def get(self, store: Store, digest: str) -> ObjectLayout:
        """The layout of object ``digest``, read once (raises like :func:`read_layout`)."""
        with self._lock:
            layout = self._layouts.get(digest)
            if layout is not None:
                self._layouts.move_to_end(digest)
                return layout
        layout = read_layout(store, digest)
        with self._lock:
            self._layouts[digest] = layout
            if len(self._layouts) > self._size:
                self._layouts.popitem(last=False)
        return layout


class ObjectReader:
    """Reads byte ranges of the objects of checkpoint ``checkpoint`` in ``store``.

    Every failure (a missing or malformed object, a lost chunk, a short one, a range past
    the object's end) raises :class:`CorruptCheckpoint` from :meth:`damaged`, naming what was
    being read (``subject``, e.g. ``"tensor 'model/w'"``) and the object.
    """

    def __init__(self, store: Store, checkpoint: str, layouts: LayoutCache | None = None) -> None:
        self.store = store
        self.checkpoint = checkpoint
        self._layouts = layouts if layouts is not None else LayoutCache()

    def damaged(self, subject: str, digest: str, why: str) -> CorruptCheckpoint:
        """The error for ``subject`` of this checkpoint, stored in object ``digest``: ``why``."""
        return CorruptCheckpoint(
            f"{subject} of checkpoint {self.checkpoint} is damaged: object {digest} in "
            f"{self.store.url} {why}; run verify() (`tlreg verify`) and restore the object "
            "from a copy"
        )

    def layout(self, digest: str, subject: str, start: int = 0, nbytes: int = 0) -> ObjectLayout:
        """The object's layout, checked to hold bytes ``[start, start + nbytes)``."""
        try:
            layout = self._layouts.get(self.store, digest)
        except ObjectNotFound:
            raise self.damaged(subject, digest, "is missing") from None
        except UnsupportedFormat as e:
            raise self.damaged(subject, digest, f"has an unexpected zarr.json ({e})") from None
        if start + nbytes > layout.nbytes:
            end = start + nbytes
            raise self.damaged(subject, digest, f"is {layout.nbytes} bytes, too short for {end}")
        return layout

    def read_into(self, digest: str, start: int, out: memoryview, subject: str) -> None:
        """Fill ``out`` with the object's bytes from ``start`` (each chunk read into place)."""
        layout = self.layout(digest, subject, start, len(out))
        done = 0
        try:
            for index, offset, n in layout.pieces(start, len(out)):
                self.store.get_into(chunk_key(digest, index), out[done : done + n], offset)
                done += n
        except ObjectNotFound:
            raise self.damaged(subject, digest, "lacks a chunk") from None
        except EOFError:
            raise self.damaged(subject, digest, "is truncated") from None

    def read_chunk(self, digest: str, index: int, start: int, length: int, subject: str) -> bytes:
        """Bytes ``[start, start + length)`` of chunk ``index`` of the object."""
        try:
            data = self.store.get_range(chunk_key(digest, index), start, length)
        except ObjectNotFound:
            raise self.damaged(subject, digest, "lacks a chunk") from None
        if len(data) != length:
            raise self.damaged(subject, digest, "is truncated")
        return data


def stored_objects(store: Store) -> set[str]:
    """Digests of every object folder in ``store``, complete or not (for garbage collection)."""
    found = set()
    for key in store.list(OBJECTS):
        parts = key.split("/")
        if len(parts) >= 4 and parts[3].startswith(parts[1] + parts[2]):
            found.add(parts[3])
    return found


def delete_object(store: Store, digest: str) -> None:
    """Delete object ``digest``: ``zarr.json`` first, so a reader never takes a half-deleted
    object for complete, then every chunk. Idempotent."""
    store.delete(meta_key(digest))
    for key in list(store.list(object_prefix(digest))):
        store.delete(key)


# -- relocation: where the live bytes of a repacked object went ---------------------------

RELOCATIONS = "relocations"
_RELOCATION_FORMAT = "tlreg.relocation"


def relocation_key(digest: str) -> str:
    """Key of the relocation record of object ``digest`` (fanned out like the objects)."""
    return f"{RELOCATIONS}/{digest[:2]}/{digest[2:4]}/{digest}.json"


@dataclass(frozen=True)
class MovedRange:
    """Bytes ``[offset, offset + nbytes)`` of a repacked object, now at ``target_offset`` of
    object ``target``."""

    offset: int
    nbytes: int
    target: str
    target_offset: int


@dataclass(frozen=True)
class Relocation:
    """The record a repack leaves for object ``object`` before it deletes it: where every byte
    range that a kept checkpoint still referenced now lives.

    Manifests are immutable, so a manifest written before the repack keeps naming
    ``object``; a reader that finds the object gone follows this record (and the target's own
    record, should the target have been repacked since). Written before the registry points
    any checkpoint at the targets, so it exists whenever the object may be missing.
    """

    object: str
    nbytes: int
    ranges: tuple[MovedRange, ...]

    def to_bytes(self) -> bytes:
        """The record's file: checksummed compact JSON (like a manifest's)."""
        doc = {
            "format": _RELOCATION_FORMAT,
            "version": 1,
            "object": self.object,
            "nbytes": self.nbytes,
            "ranges": [[r.offset, r.nbytes, r.target, r.target_offset] for r in self.ranges],
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        doc["checksum"] = hash_bytes(body)
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, *, digest: str) -> Relocation:
        """Parse a record; :class:`CorruptCheckpoint` unless it is intact and is ``digest``'s."""
        try:
            doc: Any = json.loads(raw)
            body = {k: v for k, v in doc.items() if k != "checksum"}
            intact = hash_bytes(json.dumps(body, separators=(",", ":")).encode()) == doc.get(
                "checksum"
            )
            ranges = tuple(
                MovedRange(int(o), int(n), str(t), int(to)) for o, n, t, to in doc["ranges"]
            )
            ok = (
                intact
                and doc["format"] == _RELOCATION_FORMAT
                and doc["version"] == 1
                and doc["object"] == digest
            )
            record = cls(digest, int(doc["nbytes"]), ranges)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(
                f"relocation record of object {digest} is unreadable ({e!r}); it is damaged"
            ) from None
        if not ok:
            raise CorruptCheckpoint(
                f"relocation record of object {digest} fails its checksum: it is damaged"
            )
        return record

    def find(self, offset: int, nbytes: int) -> MovedRange | None:
        """The moved range that holds bytes ``[offset, offset + nbytes)``, if any."""
        for r in self.ranges:
            if r.offset <= offset and offset + nbytes <= r.offset + r.nbytes:
                return r
        return None


def write_relocation(store: Store, record: Relocation) -> None:
    """Write ``record`` (an atomic put; rewriting the same object's record replaces it)."""
    store.put(relocation_key(record.object), record.to_bytes())


def read_relocation(store: Store, digest: str) -> Relocation | None:
    """The relocation record of object ``digest``, or None when it was never repacked."""
    try:
        raw = store.get(relocation_key(digest))
    except ObjectNotFound:
        return None
    return Relocation.from_bytes(raw, digest=digest)


def locate(store: Store, digest: str, offset: int, nbytes: int) -> tuple[str, int] | None:
    """Where bytes ``[offset, offset + nbytes)`` of object ``digest`` live now: ``digest``
    itself while it is stored, else the end of its chain of relocation records; None when the
    object is gone and no record holds the range (it was not live when it was repacked)."""
    seen: set[str] = set()
    while not is_stored(store, digest):
        if digest in seen:  # a cycle can only come from damaged records
            return None
        seen.add(digest)
        record = read_relocation(store, digest)
        moved = None if record is None else record.find(offset, nbytes)
        if moved is None:
            return None
        digest, offset = moved.target, moved.target_offset + (offset - moved.offset)
    return digest, offset


def stored_relocations(store: Store) -> set[str]:
    """Digests of every object that has a relocation record in ``store``."""
    return {
        key.rsplit("/", 1)[-1].removesuffix(".json")
        for key in store.list(RELOCATIONS)
        if key.endswith(".json")
    }
