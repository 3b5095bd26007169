"""Persist: hash, dedup, pack and write the staged tensors of one save.

The middle stage of a save, on the checkpointer's persist thread (DESIGN §4): every staged
tensor is hashed (BLAKE3); one already stored, in this save or by an earlier one (the
:class:`DedupIndex`, or an object of that name), is not written again; the rest are packed
into a few objects (a tensor of :data:`SOLO_BYTES` or more gets its own) whose chunks are
written through the I/O pool (:class:`LocalOps`) or by the writer process
(:class:`RemoteOps`), then each object's ``zarr.json`` once its chunks are durable. The result
is this rank's :class:`~tlreg.ckpt.commit.Part`.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from tlreg.ckpt.commit import Part
from tlreg.ckpt.errors import CheckpointError
from tlreg.ckpt.hashing import hash_bytes, hash_parts
from tlreg.ckpt.manifest import Manifest, ShardEntry, TensorEntry
from tlreg.ckpt.objects import (
    ObjectLayout,
    is_stored,
    write_marker,
    write_unless_stored,
    zero_pad,
)
from tlreg.ckpt.pending import SaveStats
from tlreg.ckpt.plan import SavePlan, Signature, Stored, WriteItem
from tlreg.ckpt.staging import Stager, align, place
from tlreg.ckpt.tasks import Tasks, then
from tlreg.ckpt.writer import ProcessWriter
from tlreg.storage_backends import Store

PACK_BYTES = 64 << 20
"""Target size of a pack object (several chunks: one put per chunk, large sequential writes;
see docs/performance.md, "Object sizes")."""

SOLO_BYTES = 16 << 20
"""Tensors of at least this size get an object of their own: its name is the tensor's own
hash (hashed once; a pack is hashed per tensor and as a whole), so another process saving the
same tensor finds it by name without any index. Why 16 MiB: docs/performance.md, "Object
sizes"."""

SMALL_BYTES = 64 << 10
"""Tensors below this size are packed apart from larger ones (the pack policy). Small tensors
are often the ones that never change (an RNG state, a step counter, a frozen norm), and an
unchanged tensor keeps the object it was first stored in alive: packed with the large
weights of its first save, it would pin all of them. Packed apart, it pins a small pack at
most (see docs/performance.md, "Repacking and the pack policy")."""

_HASH_BATCH_BYTES = 4 << 20  # small tensors are hashed in batches to amortise task overhead
_HASH_BATCH_COUNT = 512


@dataclass(frozen=True, slots=True)
class Location:
    """Where bytes with a given hash are stored."""

    object: str
    object_nbytes: int
    offset: int


@dataclass(slots=True)
class Pack:
    """Small tensors that go into one object, back to back at aligned offsets (those of
    1 MiB and more on a page, like in the arena, so a restore reads them with direct I/O)."""

    members: list[tuple[int, int]] = field(default_factory=list)  # (item index, offset)
    size: int = 0
    digest: str = ""

    def add(self, index: int, nbytes: int) -> int:
        offset = place(self.size, nbytes)
        self.members.append((index, offset))
        self.size = align(offset + nbytes)
        return offset


Span = tuple[int, int, int]
"""Bytes a persist step reads: ``(buffer index, offset, nbytes)``; buffer -1 means zeros."""


class Ops(abc.ABC):
    """The byte work of one save's persist step: where hashing and object writes run.

    Every method returns at once; its future completes when the work is done, or with the
    work's error. ``wait`` re-raises the first error; ``drain`` waits without raising (before
    giving the buffers back).
    """

    @abc.abstractmethod
    def hash(self, spans: list[Span]) -> Future[list[str]]:
        """The BLAKE3 digest of each span."""

    @abc.abstractmethod
    def write_object(
        self, digest: str, spans: list[Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        """Write the chunks of object ``digest`` (its layout), or None if already stored."""

    @abc.abstractmethod
    def write_pack(self, spans: list[Span], nbytes: int) -> Future[tuple[str, ObjectLayout | None]]:
        """Hash the spans as one object, then as :meth:`write_object`."""

    @abc.abstractmethod
    def write_meta(self, finals: Mapping[str, ObjectLayout]) -> None:
        """Write each object's ``zarr.json`` (its chunks are durable); blocks."""

    @abc.abstractmethod
    def when_durable(
        self, written: Future[tuple[str, ObjectLayout | None]], callback: Callable[[], None]
    ) -> None:
        """Call ``callback()`` (from any thread) once the object of ``written`` is durable:
        every chunk written, or found stored. Not called if the write fails."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Wait for every submitted operation; re-raise the first error."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Wait for every submitted operation without raising."""


class LocalOps(Ops):
    """The thread writer: on this process's I/O thread pool."""

    def __init__(self, store: Store, tasks: Tasks, buffers: list[torch.Tensor]) -> None:
        self._store = store
        self._tasks = tasks
        self._buffers = buffers
        self._lock = threading.Lock()
        self._puts: dict[str, list[Future[None]]] = {}  # object -> its chunk puts

    def _part(self, span: Span) -> memoryview:
        source, offset, nbytes = span
        if source < 0:
            return zero_pad(nbytes)
        return self._buffers[source].numpy().data[offset : offset + nbytes]

    # docstring inherited
    def hash(self, spans: list[Span]) -> Future[list[str]]:
        return self._tasks.submit(lambda: [hash_bytes(self._part(s)) for s in spans])

    def _write(self, name: str, spans: list[Span], nbytes: int) -> ObjectLayout | None:
        parts = [self._part(s) for s in spans]
        puts: list[Future[None]] = []

        def put(key: str, chunk: list[memoryview]) -> None:
            puts.append(self._tasks.submit(self._store.put, key, chunk))

        layout = write_unless_stored(self._store, name, parts, nbytes, put)
        with self._lock:
            self._puts[name] = puts
        return layout

    # docstring inherited
    def when_durable(
        self, written: Future[tuple[str, ObjectLayout | None]], callback: Callable[[], None]
    ) -> None:
        def chunks_submitted(f: Future[tuple[str, ObjectLayout | None]]) -> None:
            if f.exception() is None:
                with self._lock:
                    puts = self._puts.pop(f.result()[0], [])
                when_all(puts, callback)

        written.add_done_callback(chunks_submitted)

    # docstring inherited
    def write_object(
        self, name: str, spans: list[Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        return self._tasks.submit(lambda: (name, self._write(name, spans, nbytes)))

    # docstring inherited
    def write_pack(self, spans: list[Span], nbytes: int) -> Future[tuple[str, ObjectLayout | None]]:
        def run() -> tuple[str, ObjectLayout | None]:
            name = hash_parts(self._part(s) for s in spans)
            return name, self._write(name, spans, nbytes)

        return self._tasks.submit(run)

    # docstring inherited
    def write_meta(self, finals: Mapping[str, ObjectLayout]) -> None:
        for name, layout in finals.items():
            self._tasks.submit(write_marker, self._store, name, layout)
        self._tasks.wait()

    # docstring inherited
    def wait(self) -> None:
        self._tasks.wait()

    # docstring inherited
    def drain(self) -> None:
        self._tasks.drain()


class RemoteOps(Ops):
    """The process writer: requests to the writer process, which reads the shared buffers."""

    def __init__(self, writer: ProcessWriter, stager: Stager, buffers: list[torch.Tensor]) -> None:
        self._writer = writer
        self._stager = stager
        self._buffers = buffers
        self._futures: list[Future[Any]] = []

    def _spans(self, spans: list[Span]) -> list[tuple[str | None, int, int]]:
        return [
            (None if s < 0 else self._stager.segment(self._buffers[s]), offset, n)
            for s, offset, n in spans
        ]

    def _call(self, op: str, **args: Any) -> Future[Any]:
        future = self._writer.call(op, **args)
        self._futures.append(future)
        return future

    # docstring inherited
    def hash(self, spans: list[Span]) -> Future[list[str]]:
        return self._call("hash", spans=self._spans(spans))

    # docstring inherited
    def write_object(
        self, digest: str, spans: list[Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        sent = self._call("object", digest=digest, spans=self._spans(spans), nbytes=nbytes)
        return then(sent, lambda chunk: (digest, _layout(nbytes, chunk)))

    # docstring inherited
    def write_pack(self, spans: list[Span], nbytes: int) -> Future[tuple[str, ObjectLayout | None]]:
        sent = self._call("pack", spans=self._spans(spans), nbytes=nbytes)
        return then(sent, lambda reply: (str(reply[0]), _layout(nbytes, reply[1])))

    # docstring inherited
    def when_durable(
        self, written: Future[tuple[str, ObjectLayout | None]], callback: Callable[[], None]
    ) -> None:
        # the writer process answers once the object's chunks are written
        written.add_done_callback(lambda f: None if f.exception() else callback())

    # docstring inherited
    def write_meta(self, finals: Mapping[str, ObjectLayout]) -> None:
        if finals:
            objects = [[d, layout.nbytes, layout.chunk] for d, layout in finals.items()]
            self._call("meta", objects=objects).result()

    # docstring inherited
    def wait(self) -> None:
        for future in self._futures:
            future.result()

    # docstring inherited
    def drain(self) -> None:
        wait(self._futures)


def _layout(nbytes: int, chunk: int | None) -> ObjectLayout | None:
    return None if chunk is None else ObjectLayout(nbytes, int(chunk))


class DedupIndex:
    """Where bytes with a given hash are stored, as far as this checkpointer knows.

    Seeded by every commit (with the manifest it wrote) and by :meth:`AsyncCheckpointer.remember`
    and ``load``. Bounded: an entry that none of the last :data:`KEEP_COMMITS` commits
    referenced (nor a seed since) is dropped, so it holds what the next save can reuse
    (unchanged tensors are in the previous manifest) and not every hash ever saved. The
    price: one checkpointer saving two different states in turn (the model often, the
    optimizer rarely) writes the rarer one's small tensors again; tensors of
    :data:`SOLO_BYTES` or more are objects of their own, found by name.
    """

    KEEP_COMMITS = 2

    def __init__(self) -> None:
        self._index: dict[str, tuple[Location, int]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def get(self, digest: str) -> Location | None:
        with self._lock:
            found = self._index.get(digest)
        return None if found is None else found[0]

    def seed(self, objects: Mapping[str, int], entries: Iterable[TensorEntry | ShardEntry]) -> None:
        """Learn where ``entries`` are stored (the first location known of a hash is kept)."""
        with self._lock:
            generation = self._generation
            for e in entries:
                if e.object:
                    known = self._index.get(e.hash)
                    where = known[0] if known else Location(e.object, objects[e.object], e.offset)
                    self._index[e.hash] = (where, generation)

    def seed_manifest(self, manifest: Manifest) -> None:
        """Learn every tensor (and shard) of ``manifest``."""
        self.seed(manifest.objects, (s for e in manifest.tensors.values() for s in e.pieces()))

    def committed(self, manifest: Manifest | None, part: Part | None) -> None:
        """Learn what a commit stored (the manifest it wrote, else this rank's part), then
        drop what the last :data:`KEEP_COMMITS` commits did not reference."""
        with self._lock:
            self._generation += 1
        if manifest is not None:
            self.seed_manifest(manifest)
        if part is not None:
            self.seed(part.objects, [*part.tensors.values(), *part.shards.values()])
        with self._lock:
            oldest = self._generation - self.KEEP_COMMITS + 1
            stale = [h for h, (_, g) in self._index.items() if g < oldest]
            for h in stale:
                del self._index[h]

    def forget(self, name: str) -> None:
        """Forget everything stored in object ``name`` (it was deleted)."""
        with self._lock:
            for h in [h for h, (loc, _) in self._index.items() if loc.object == name]:
                del self._index[h]


class _LiveCount:
    """Adds stored bytes to a save's live ``SaveStats.bytes_done``, from any thread."""

    def __init__(self, stats: SaveStats) -> None:
        self.stats = stats
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.stats.bytes_done += nbytes

    def when(self, ops: Ops, written: Future[Any], nbytes: int) -> None:
        """Add ``nbytes`` once the object of ``written`` is durable."""
        ops.when_durable(written, lambda: self.add(nbytes))


def when_all(futures: list[Future[Any]], callback: Callable[[], None]) -> None:
    """Call ``callback()`` once every one of ``futures`` has succeeded (at once for none)."""
    if not futures:
        callback()
        return
    left = len(futures)
    lock = threading.Lock()

    def one(f: Future[Any]) -> None:
        nonlocal left
        if f.exception() is not None:
            return
        with lock:
            left -= 1
            last = left == 0
        if last:
            callback()

    for future in futures:
        future.add_done_callback(one)


class Persister:
    """The persist stage of one checkpointer (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        stager: Stager,
        io_pool: ThreadPoolExecutor,
        writer: ProcessWriter | None,
        index: DedupIndex,
    ) -> None:
        self.store = store
        self.index = index
        self._stager = stager
        self._io_pool = io_pool
        self._writer = writer

    def write(self, plan: SavePlan, arena: torch.Tensor) -> Part:
        """Hash, dedup, pack and write the tensors of ``plan`` staged in ``arena``; returns
        where each is stored. Blocks until every object is complete."""
        buffers = [arena]  # span sources: the arena, then re-read copies
        ops: Ops
        if self._writer is not None:
            ops = RemoteOps(self._writer, self._stager, buffers)
        else:
            ops = LocalOps(self.store, Tasks(self._io_pool), buffers)
        try:
            return self._write_staged(plan, ops, buffers)
        finally:
            # never hand the arena back to the next save while a task still reads from it
            ops.drain()
            for buffer in buffers[1:]:
                self._stager.discard(buffer)

    def _write_staged(self, plan: SavePlan, ops: Ops, buffers: list[torch.Tensor]) -> Part:
        items = plan.items
        checked: dict[str, bool] = {}
        copies: dict[int, Span] = {}
        todo: list[int] = []
        for i, item in enumerate(items):
            if item.reuse is not None:
                if not item.reuse.object or self._exists(item.reuse.object, checked):
                    continue
                buffers.append(self._reread(item))  # its object was deleted since: write it again
                copies[i] = (len(buffers) - 1, 0, item.nbytes)
                item.reuse = None
            todo.append(i)

        def span(i: int) -> Span:
            copy = copies.get(i)
            if copy is not None:
                return copy
            item = items[i]
            return (0, item.offset, item.nbytes)

        batches: list[tuple[list[int], Future[list[str]]]] = []
        lo = 0
        while lo < len(todo):
            hi, total = lo, 0
            while hi < len(todo) and total < _HASH_BATCH_BYTES and hi - lo < _HASH_BATCH_COUNT:
                total += items[todo[hi]].nbytes
                hi += 1
            batch = todo[lo:hi]
            batches.append((batch, ops.hash([span(i) for i in batch])))
            lo = hi

        def pack_spans(pack: Pack) -> list[Span]:
            spans: list[Span] = []
            end = 0
            for index, offset in pack.members:
                if offset > end:
                    spans.append((-1, 0, offset - end))
                spans.append(span(index))
                end = offset + items[index].nbytes
            if pack.size > end:
                spans.append((-1, 0, pack.size - end))
            return spans

        hashes: list[str] = [""] * len(items)
        # per item: (object or pack, offset); a pack's digest is known once it is hashed
        where: list[tuple[str | Pack, int]] = [("", 0)] * len(items)
        seen: dict[str, tuple[str | Pack, int]] = {}
        objects: dict[str, int] = {}
        # one per new object: (its digest and layout if written, the object, bytes, tensors)
        writes: list[tuple[Future[tuple[str, ObjectLayout | None]], str | Pack, int, int]] = []
        packs = {False: Pack(), True: Pack()}  # large tensors' pack, small tensors' pack
        reused = 0

        done = _LiveCount(plan.stats)

        def seal(p: Pack) -> None:
            future = ops.write_pack(pack_spans(p), p.size)
            done.when(ops, future, sum(items[index].nbytes for index, _ in p.members))
            writes.append((future, p, p.size, len(p.members)))

        for batch, hashed in batches:
            for i, digest in zip(batch, hashed.result(), strict=True):
                hashes[i] = digest
                nbytes = items[i].nbytes
                if nbytes == 0:
                    continue
                if digest in seen:
                    where[i] = seen[digest]
                    reused += 1
                    done.add(nbytes)
                    continue
                known = self._known(digest, checked)
                if known is not None:
                    where[i] = seen[digest] = (known.object, known.offset)
                    objects[known.object] = known.object_nbytes
                    reused += 1
                    done.add(nbytes)
                elif nbytes >= SOLO_BYTES:
                    where[i] = seen[digest] = (digest, 0)
                    future = ops.write_object(digest, [span(i)], nbytes)
                    done.when(ops, future, nbytes)
                    writes.append((future, digest, nbytes, 1))
                else:
                    small = nbytes < SMALL_BYTES
                    pack = packs[small]
                    if pack.members and pack.size + nbytes > PACK_BYTES:
                        seal(pack)
                        pack = packs[small] = Pack()
                    where[i] = seen[digest] = (pack, pack.add(i, nbytes))
        for pack in packs.values():
            if pack.members:
                seal(pack)
        ops.wait()

        # Every chunk is durable: now mark each new object complete; the manifest follows.
        new_bytes = written = 0
        finals: dict[str, ObjectLayout] = {}
        for stored, obj, size, count in writes:
            digest, layout = stored.result()
            if isinstance(obj, Pack):
                obj.digest = digest
            objects[digest] = size
            if layout is not None and digest not in finals:
                finals[digest] = layout
                new_bytes += size
                written += 1
            else:
                reused += count  # stored before (or twice in this save): nothing written
        ops.write_meta(finals)

        part = Part(plan.rank, {}, {}, objects, new_bytes, written, reused)
        for i, item in enumerate(items):
            if item.reuse is not None:
                loc = item.reuse
                part.tensors_skipped += 1
                if loc.object:
                    objects[loc.object] = loc.object_nbytes
            else:
                obj, offset = where[i]
                name = obj.digest if isinstance(obj, Pack) else obj
                loc = Stored(name, objects.get(name, 0), offset, hashes[i])
            part.stored.append(loc)
            if item.box is None:
                part.tensors[item.path] = TensorEntry(
                    loc.object, loc.offset, item.nbytes, item.dtype, item.shape, loc.hash
                )
            else:
                offsets, shape = item.box
                part.shards[item.path] = ShardEntry(
                    offsets, shape, loc.object, loc.offset, item.nbytes, loc.hash
                )
        return part

    def _exists(self, digest: str, checked: dict[str, bool]) -> bool:
        ok = checked.get(digest)
        if ok is None:
            ok = checked[digest] = is_stored(self.store, digest)
        return ok

    def _reread(self, item: WriteItem) -> torch.Tensor:
        """Copy a skipped tensor now, if it is still unchanged (its stored object is gone)."""
        tensor = item.tensor
        if tensor is None or item.signature is None:
            raise AssertionError(f"skipped tensor {item.path!r} lost its source")
        copy = self._stager.scratch(item.nbytes)
        with torch.no_grad():
            copy[: item.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        now = Signature.of(tensor, item.box)
        if now is None or not item.signature.matches(now):
            self._stager.discard(copy)
            raise CheckpointError(
                f"frozen tensor {item.path!r} changed after save() while its previous object "
                "was found deleted; nothing was committed, save again"
            )
        return copy

    def _known(self, digest: str, checked: dict[str, bool]) -> Location | None:
        """Where ``digest`` is already stored, if the index knows and the object still exists."""
        location = self.index.get(digest)
        if location is None:
            return None
        if not self._exists(location.object, checked):
            self.index.forget(location.object)  # deleted (garbage-collected) since
            return None
        return location
