"""Repack: copy the live byte ranges of mostly-dead objects into new objects.

Dedup is per tensor but deletion is per object, so one small unchanged tensor (an RNG state,
a step counter, a frozen norm) keeps a whole stale pack alive. Like restic's ``prune
--max-unused``, garbage collection repacks an object once more than a chosen fraction of its
bytes is referenced by no kept checkpoint. This module is the store's half (the registry's
half is ``Registry.repack_candidates`` / ``Registry.relocate``; ``tlreg.training.gc`` runs
the protocol):

1. :func:`live_spans` finds, from the kept checkpoints' manifests, which byte ranges of each
   object are still referenced (following earlier repacks' records);
2. :func:`repack` reads those ranges (checking every tensor's hash, so damaged bytes are
   never copied under a new name), writes them packed together into new objects, and then
   writes one :class:`~tlreg.ckpt.objects.Relocation` record per old object;
3. the registry moves the kept checkpoints' references from the old objects to the new ones;
4. garbage collection deletes the old objects as it deletes any unreferenced object.

Manifests never change. A reader holding a manifest that names an old object reads it while
it exists; once it is gone, :func:`follow_relocations` maps each tensor to where its bytes
moved (the record is written before the old object can become deletable). A crash between
any two steps leaves either unreferenced new objects (orphans that gc deletes after the
grace) or a record next to a still-referenced old object (the next gc repacks it again,
reusing the record when it still covers every live range).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tlreg.ckpt.errors import CorruptCheckpoint
from tlreg.ckpt.hashing import hash_bytes, hash_parts
from tlreg.ckpt.manifest import Manifest, ShardEntry, TensorEntry
from tlreg.ckpt.objects import (
    MovedRange,
    ObjectReader,
    Relocation,
    is_stored,
    locate,
    read_layout,
    read_relocation,
    write_marker,
    write_relocation,
    write_unless_stored,
)
from tlreg.storage_backends import Store

PACK_BYTES = 64 << 20
"""Target size of a repacked object (the same as a save's packs)."""

DEFAULT_MAX_UNUSED = 0.05
"""Repack an object once more than this fraction of its bytes is unused (restic's default)."""

Span = tuple[int, int, str]
"""``(offset, nbytes, hash)`` of a tensor's bytes inside an object."""

_E = TypeVar("_E", TensorEntry, ShardEntry)


def follow_relocations(store: Store, reads: Mapping[str, _E]) -> dict[str, _E] | None:
    """``reads`` with every entry whose object is gone pointed at where its bytes were
    repacked to; None when no entry moved (then a failed read was real damage)."""
    moved: dict[str, _E] = {}
    changed = False
    where: dict[tuple[str, int, int], tuple[str, int] | None] = {}
    for name, entry in reads.items():
        if not entry.object or not entry.nbytes:
            moved[name] = entry
            continue
        key = (entry.object, entry.offset, entry.nbytes)
        if key not in where:
            where[key] = locate(store, *key)
        found = where[key]
        if found is None or found == (entry.object, entry.offset):
            moved[name] = entry
            continue
        moved[name] = dataclasses.replace(entry, object=found[0], offset=found[1])
        changed = True
    return moved if changed else None


class _Chains:
    """Every object that holds (or held) a byte range, following relocation records."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._records: dict[str, Relocation | None] = {}

    def record(self, digest: str) -> Relocation | None:
        if digest not in self._records:
            self._records[digest] = read_relocation(self.store, digest)
        return self._records[digest]

    def chain(self, digest: str, offset: int, nbytes: int) -> list[tuple[str, int]]:
        """``(object, offset)`` of the range in ``digest`` and in every object a record moved
        it to (an over-approximation of where it lives: more live bytes is always safe)."""
        out = [(digest, offset)]
        seen = {digest}
        while True:
            record = self.record(digest)
            moved = None if record is None else record.find(offset, nbytes)
            if moved is None or moved.target in seen:
                return out
            digest, offset = moved.target, moved.target_offset + (offset - moved.offset)
            seen.add(digest)
            out.append((digest, offset))


def live_spans(
    store: Store, manifests: Iterable[Manifest], objects: Iterable[str]
) -> dict[str, set[Span]]:
    """For each of ``objects``: the spans of it that ``manifests`` (the kept checkpoints that
    reference it) still use, found directly or through earlier repacks' records."""
    wanted = set(objects)
    chains = _Chains(store)
    spans: dict[str, set[Span]] = {d: set() for d in wanted}
    for manifest in manifests:
        for _, entry in manifest.stored():
            if not entry.object or not entry.nbytes:
                continue
            for digest, offset in chains.chain(entry.object, entry.offset, entry.nbytes):
                if digest in wanted:
                    spans[digest].add((offset, entry.nbytes, entry.hash))
    return spans


def live_bytes(spans: Iterable[Span]) -> int:
    """Bytes covered by ``spans`` (overlaps counted once)."""
    return sum(hi - lo for lo, hi in _merge(spans))


def _merge(spans: Iterable[Span]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for offset, nbytes, _ in sorted(spans):
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], offset + nbytes)
        else:
            merged.append([offset, offset + nbytes])
    return [(lo, hi) for lo, hi in merged]


@dataclass(frozen=True)
class Repacked:
    """One old object whose live ranges now live in ``targets`` (hash -> size)."""

    object: str
    nbytes: int
    live: int
    targets: dict[str, int]


@dataclass
class _Pack:
    parts: list[memoryview] = dataclasses.field(default_factory=list)
    nbytes: int = 0
    moved: dict[str, list[tuple[int, int, int]]] = dataclasses.field(default_factory=dict)
    """old object -> [(offset, nbytes, offset in this pack)]"""


def repack(
    store: Store,
    objects: Mapping[str, tuple[int, set[Span]]],
    *,
    pack_bytes: int = PACK_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> tuple[list[Repacked], list[str]]:
    """Copy the live ``spans`` of each old object (``digest -> (nbytes, spans)``) into new
    packed objects and write each old object's relocation record.

    Returns the objects repacked, and one line per object left as it was (damaged or
    missing: repacking must not give damaged bytes a new, valid-looking name; ``tlreg verify
    --all`` reports them). An object whose every byte is live is left alone. ``on_bytes``
    is called with the bytes copied, for progress.
    """
    done: list[Repacked] = []
    skipped: list[str] = []
    pack = _Pack()

    def seal() -> None:
        nonlocal pack
        if not pack.moved:
            return
        digest = hash_parts(pack.parts)
        layout = write_unless_stored(store, digest, pack.parts, pack.nbytes)
        if layout is not None:
            write_marker(store, digest, layout)
        for old, ranges in pack.moved.items():
            nbytes, spans = objects[old]
            record = Relocation(
                old, nbytes, tuple(MovedRange(o, n, digest, at) for o, n, at in ranges)
            )
            write_relocation(store, record)
            done.append(Repacked(old, nbytes, live_bytes(spans), {digest: pack.nbytes}))
        pack = _Pack()

    for old in sorted(objects):
        nbytes, spans = objects[old]
        if live_bytes(spans) >= nbytes:
            continue  # nothing to free (and the copy would be the object itself)
        reused = _reusable(store, old, spans)
        if reused is not None:
            done.append(reused)
            continue
        try:
            pieces = _read_live(store, old, spans)
        except CorruptCheckpoint as e:
            skipped.append(f"object {old} was not repacked: {e}")
            continue
        size = sum(len(p) for _, p in pieces)
        if pack.nbytes and pack.nbytes + size > pack_bytes:
            seal()
        ranges = pack.moved.setdefault(old, [])
        for lo, data in pieces:
            ranges.append((lo, len(data), pack.nbytes))
            pack.parts.append(data)
            pack.nbytes += len(data)
        if on_bytes is not None:
            on_bytes(size)
    seal()
    return done, skipped


def _reusable(store: Store, old: str, spans: set[Span]) -> Repacked | None:
    """The outcome of an earlier, interrupted repack of ``old``, if its record still covers
    every live span and every target is stored (then nothing is copied again)."""
    try:
        record = read_relocation(store, old)
    except CorruptCheckpoint:
        return None  # rewritten below
    if record is None or not spans:
        return None
    if any(record.find(o, n) is None for o, n, _ in spans):
        return None
    targets = {r.target for r in record.ranges}
    if not all(is_stored(store, t) for t in targets):
        return None
    sizes = {t: read_layout(store, t).nbytes for t in targets}
    return Repacked(old, record.nbytes, live_bytes(spans), sizes)


def _read_live(store: Store, digest: str, spans: set[Span]) -> list[tuple[int, memoryview]]:
    """The merged live ranges of object ``digest`` as ``(offset, bytes)``, every span's hash
    checked (:class:`CorruptCheckpoint` on a mismatch or a missing object)."""
    reader = ObjectReader(store, f"(repack of {digest[:12]})")
    out: list[tuple[int, memoryview]] = []
    pending = sorted(spans)
    at = 0
    for lo, hi in _merge(spans):
        buf = memoryview(bytearray(hi - lo))
        reader.read_into(digest, lo, buf, f"bytes {lo}..{hi}")
        while at < len(pending) and pending[at][0] < hi:
            offset, nbytes, expected = pending[at]
            at += 1
            if hash_bytes(buf[offset - lo : offset - lo + nbytes]) != expected:
                raise reader.damaged(
                    f"the tensor at byte {offset}", digest, "does not match the tensor's hash"
                )
        out.append((lo, buf))
    return out
