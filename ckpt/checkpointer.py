"""The asynchronous checkpoint engine: stage on the caller's thread, persist in the background.

One save goes through three steps (DESIGN §4):

1. **stage** — copy every tensor into an arena (see :mod:`tlreg.ckpt.staging`); eager mode does
   it before ``save()`` returns, lazy mode on a background thread, with an optimizer pre-step
   hook that waits for it;
2. **persist** — on the writer thread: hash every tensor (BLAKE3), drop the ones already stored
   (tensor-level dedup), pack the rest into a few objects and write their chunks through a
   thread pool, then each object's ``zarr.json``;
3. **commit** — write the manifest. A save that fails before this writes no manifest; the
   objects it wrote are unreferenced and garbage-collectable.

Saves persist one after another (each one internally parallel), so a save always dedups
against every earlier save of the same checkpointer, and the writer never needs more than
``max_inflight_bytes`` of staged copies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import blake3
import torch

from tlreg.ckpt.dtypes import DTYPES, dtype_from_name, dtype_name, from_bytes, tensor_nbytes
from tlreg.ckpt.errors import CheckpointError, CorruptCheckpoint, UnsupportedFormat
from tlreg.ckpt.manifest import (
    Manifest,
    TensorEntry,
    new_manifest_id,
    read_manifest,
    utc_now,
    write_manifest,
)
from tlreg.ckpt.objects import (
    ObjectLayout,
    chunk_key,
    meta_key,
    read_layout,
    split_chunks,
    zero_pad,
)
from tlreg.ckpt.staging import Event, Stager, align, arena_layout
from tlreg.ckpt.tree import flatten_state, select_subtree, tensor_refs, unflatten_state
from tlreg.storage_backends import ObjectNotFound, Store, open_store

PACK_BYTES = 64 << 20
"""Target size of a pack object (several chunks: one put per chunk, large sequential writes)."""

SOLO_BYTES = 16 << 20
"""Tensors of at least this size get an object of their own.

Measured on a local fsynced store: an object costs ~0.7 ms of fixed overhead (its zarr.json
put and directory fsyncs) next to ~30 ms to write 16 MiB, so a 16 MiB object is within ~2%
of a packed one; on S3 a request costs ~20 ms next to ~150 ms for 16 MiB. A solo object's
hash is the tensor's own hash, so it is hashed once (a pack is hashed twice: per tensor and
as a whole), and another process saving the same tensor finds it by name without any index.
"""

_HASH_BATCH_BYTES = 4 << 20  # small tensors are hashed in batches to amortise task overhead
_HASH_BATCH_COUNT = 512
_MT_HASH_BYTES = 4 << 20  # from here on blake3 hashes with several threads
_DIRECT_READ_BYTES = 1 << 20  # tensors this large are read straight into their own memory

_T = TypeVar("_T")


def _blake3(data: memoryview | bytes) -> str:
    threads = blake3.blake3.AUTO if len(data) >= _MT_HASH_BYTES else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()


@dataclass(slots=True)
class SaveStats:
    """What one save cost; filled in when it commits (``stall_s`` when ``save()`` returns)."""

    stall_s: float = 0.0
    """Time ``save()`` blocked the caller: back-pressure wait, and the copies in eager mode."""
    stage_s: float = 0.0
    """Time spent copying tensors into the staging buffers."""
    persist_s: float = 0.0
    """Time from staged to committed: hashing, writing objects and the manifest."""
    logical_bytes: int = 0
    """Bytes of all tensors in the state."""
    new_bytes: int = 0
    """Object bytes this save wrote (0 for a save of an unchanged state)."""
    objects_written: int = 0
    """Objects this save wrote."""
    tensors: int = 0
    """Tensors in the state."""
    tensors_reused: int = 0
    """Non-empty tensors whose bytes were already stored and were not written again."""


class PendingSave:
    """A save in progress, with its two completion points.

    ``staged`` completes once the state has been copied (the caller may mutate it again);
    ``committed`` completes with the manifest id once objects and manifest are durable, or
    with the background error, which :meth:`result` re-raises with its original traceback.
    """

    def __init__(
        self,
        staged: Future[None],
        committed: Future[str],
        stats: SaveStats | None = None,
    ) -> None:
        self.staged = staged
        self.committed = committed
        self.stats = stats if stats is not None else SaveStats()

    def result(self, timeout: float | None = None) -> str:
        """Wait for the save to commit and return the manifest id (re-raises its error)."""
        return self.committed.result(timeout)

    def done(self) -> bool:
        """Whether the save has committed or failed."""
        return self.committed.done()

    def __repr__(self) -> str:
        if not self.committed.done():
            state = "staged" if self.staged.done() else "staging"
        elif self.committed.exception() is not None:
            state = f"failed: {self.committed.exception()!r}"
        else:
            state = f"committed {self.committed.result()}"
        return f"<PendingSave {state}>"


@dataclass(frozen=True, slots=True)
class _Location:
    """Where bytes with a given hash are stored."""

    object: str
    object_nbytes: int
    offset: int


@dataclass(slots=True)
class _Pack:
    """Small tensors that go into one object, back to back at aligned offsets."""

    members: list[tuple[int, int]] = field(default_factory=list)  # (tensor index, offset)
    size: int = 0
    digest: str = ""

    def add(self, index: int, nbytes: int) -> int:
        offset = self.size
        self.members.append((index, offset))
        self.size = align(offset + nbytes)
        return offset


@dataclass(slots=True)
class _Part:
    """What one writer stored: the tensor entries of its share of the state.

    One process writes the whole state today; with several ranks each would produce a part
    and rank 0 would merge them into the manifest (:meth:`AsyncCheckpointer._commit`).
    """

    entries: dict[str, TensorEntry]
    objects: dict[str, int]
    new_bytes: int = 0
    objects_written: int = 0
    tensors_reused: int = 0


@dataclass(slots=True)
class _SaveJob:
    manifest_id: str
    step: int | None
    metadata: dict[str, Any]
    tree: Any
    paths: list[str]
    tensors: list[torch.Tensor]
    offsets: list[int]
    sizes: list[int]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    nbytes: int
    mark: Event | None
    pending: PendingSave
    arena: torch.Tensor | None = None
    created: Any = None


class _Tasks:
    """Tasks on a shared pool that the submitter waits for as a group.

    Tasks may submit further tasks; the first error stops the tasks not yet started and is
    re-raised by :meth:`wait`. Tasks never wait on each other, so the pool cannot deadlock.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        with self._cond:
            self._pending += 1
        try:
            return self._pool.submit(self._run, fn, *args)
        except BaseException:
            self._done()
            raise

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            if self._error is not None:
                return None
            return fn(*args)
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e
            raise
        finally:
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._pending -= 1
            if self._pending == 0:
                self._cond.notify_all()

    def wait(self) -> None:
        """Wait for every task; re-raise the first error."""
        self.drain()
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait for every task, raising nothing (before giving up buffers tasks still read)."""
        with self._cond:
            while self._pending:
                self._cond.wait()


class AsyncCheckpointer:
    """Saves nested PyTorch state to a store without blocking training, and loads it back.

    ``store`` is a :class:`Store` or a URL for :func:`open_store`. With ``lazy=True``,
    ``save()`` returns before copying anything and the copy runs in the background; call
    :meth:`attach_optimizer` so that ``optimizer.step()`` waits for it, and do not mutate the
    state otherwise before ``pending.staged``. ``max_inflight_bytes`` bounds the staged bytes
    of saves not yet committed: ``save()`` waits for earlier saves rather than exceed it (a
    single state larger than the bound still saves, alone). ``io_threads`` is the number of
    concurrent hashing and store operations.
    """

    def __init__(
        self,
        store: str | Store,
        *,
        lazy: bool = False,
        max_inflight_bytes: int | None = None,
        io_threads: int = 8,
    ) -> None:
        if max_inflight_bytes is not None and max_inflight_bytes <= 0:
            raise ValueError("max_inflight_bytes must be positive (or None for no bound)")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        self.store: Store = open_store(store)
        self.lazy = lazy
        self.max_inflight_bytes = max_inflight_bytes
        self._stager = Stager()
        self._stage_pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-stage")
        self._persist_pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-persist")
        self._io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tlreg-ckpt-io")
        self._cond = threading.Condition()
        self._inflight = 0
        self._pending: list[PendingSave] = []
        self._latest_staged: Future[None] | None = None
        self._hooks: list[Any] = []
        self._index: dict[str, _Location] = {}
        self._index_lock = threading.Lock()
        self._layouts: dict[str, ObjectLayout] = {}
        self._manifests: dict[str, Manifest] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncCheckpointer({self.store!r}, lazy={self.lazy})"

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def inflight_bytes(self) -> int:
        """Staged bytes of saves that have not committed or failed yet."""
        with self._cond:
            return self._inflight

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        state: Mapping[str, Any],
        *,
        step: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PendingSave:
        """Start saving ``state``; returns once it is staged (eager) or at once (lazy).

        ``state`` is nested dicts/lists/tuples of tensors and plain values (see
        :func:`flatten_state`); anything else raises ``TypeError`` naming its path, before
        anything is written. ``metadata`` is JSON stored in the manifest as it is.
        """
        start = time.perf_counter()
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new AsyncCheckpointer to save")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping such as a dict, not {type(state).__name__}")
        if step is not None and type(step) is not int:
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        meta = _plain_json(metadata)
        tree, flat = flatten_state(state)
        tensors = list(flat.values())
        offsets, nbytes = arena_layout(tensors)
        pending = PendingSave(Future(), Future())
        pending.stats.tensors = len(tensors)
        job = _SaveJob(
            manifest_id=new_manifest_id(),
            step=step,
            metadata=meta,
            tree=tree,
            paths=list(flat),
            tensors=tensors,
            offsets=offsets,
            sizes=[tensor_nbytes(t) for t in tensors],
            dtypes=[dtype_name(t.dtype) for t in tensors],
            shapes=[tuple(t.shape) for t in tensors],
            nbytes=nbytes,
            mark=Stager.mark(tensors),
            pending=pending,
            created=utc_now(),
        )
        pending.stats.logical_bytes = sum(job.sizes)
        self._reserve(nbytes)
        pending.staged.set_running_or_notify_cancel()
        pending.committed.set_running_or_notify_cancel()
        with self._cond:
            self._pending = [p for p in self._pending if not p.done()]
            self._pending.append(pending)
            self._latest_staged = pending.staged
        if self.lazy:
            self._stage_pool.submit(self._stage, job)
        else:
            self._stage(job)
        self._persist_pool.submit(self._persist, job)
        pending.stats.stall_s = time.perf_counter() - start
        return pending

    def _reserve(self, nbytes: int) -> None:
        with self._cond:
            limit = self.max_inflight_bytes
            while limit is not None and self._inflight and self._inflight + nbytes > limit:
                self._cond.wait()
            self._inflight += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._cond:
            self._inflight -= nbytes
            self._cond.notify_all()

    def _stage(self, job: _SaveJob) -> None:
        start = time.perf_counter()
        try:
            pinned = job.mark is not None
            job.arena = self._stager.acquire(job.nbytes, pinned=pinned)
            self._stager.copy(job.tensors, job.offsets, job.arena, job.mark)
        except BaseException as e:
            job.pending.staged.set_exception(e)
        else:
            job.pending.stats.stage_s = time.perf_counter() - start
            job.pending.staged.set_result(None)
        finally:
            job.tensors = []  # the caller's tensors are not needed past this point

    def _persist(self, job: _SaveJob) -> None:
        committed = job.pending.committed
        error = job.pending.staged.exception()
        result: str | None = None
        start = time.perf_counter()
        try:
            if error is None:
                part = self._write_tensors(job)
                self._commit(job, [part])
                result = job.manifest_id
        except BaseException as e:
            error = e
        finally:
            if job.arena is not None:
                self._stager.release(job.arena)
                job.arena = None
            self._unreserve(job.nbytes)
        job.pending.stats.persist_s = time.perf_counter() - start
        if error is not None:
            committed.set_exception(error)
        else:
            committed.set_result(result)  # type: ignore[arg-type]

    def _write_tensors(self, job: _SaveJob) -> _Part:
        """Hash, dedup, pack and write the staged tensors; returns their entries."""
        tasks = _Tasks(self._io_pool)
        try:
            return self._write_staged(job, tasks)
        finally:
            # never hand the arena back to the next save while a task still reads from it
            tasks.drain()

    def _write_staged(self, job: _SaveJob, tasks: _Tasks) -> _Part:
        assert job.arena is not None
        view = job.arena.numpy().data
        store = self.store
        sizes = job.sizes  # the tensors themselves were let go of after staging

        def hash_batch(lo: int, hi: int) -> list[str]:
            return [
                _blake3(view[job.offsets[i] : job.offsets[i] + sizes[i]]) for i in range(lo, hi)
            ]

        batches: list[tuple[int, int, Future[list[str]]]] = []
        lo = 0
        while lo < len(sizes):
            hi, total = lo, 0
            while hi < len(sizes) and total < _HASH_BATCH_BYTES and hi - lo < _HASH_BATCH_COUNT:
                total += sizes[hi]
                hi += 1
            batches.append((lo, hi, tasks.submit(hash_batch, lo, hi)))
            lo = hi

        def write_object(digest: str, parts: list[memoryview], nbytes: int) -> ObjectLayout | None:
            """Start writing the chunks of a new object; None if it is already stored."""
            if store.exists(meta_key(digest)):
                return None  # by an earlier save or another process
            layout = ObjectLayout.plan(nbytes)
            for i, chunk in enumerate(split_chunks(parts, layout)):
                tasks.submit(store.put, chunk_key(digest, i), chunk)
            return layout

        def write_pack(pack: _Pack) -> ObjectLayout | None:
            parts: list[memoryview] = []
            end = 0
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
            for index, offset in pack.members:
                if offset > end:
                    parts.append(zero_pad(offset - end))
                parts.append(view[job.offsets[index] : job.offsets[index] + sizes[index]])
                end = offset + sizes[index]
            if pack.size > end:
                parts.append(zero_pad(pack.size - end))
            for part in parts:
                hasher.update(part)
            pack.digest = hasher.hexdigest()
            return write_object(pack.digest, parts, pack.size)

        hashes: list[str] = [""] * len(sizes)
        # per tensor: (object or pack, offset); a pack's digest is known once it is hashed
        where: list[tuple[str | _Pack, int]] = [("", 0)] * len(sizes)
        seen: dict[str, tuple[str | _Pack, int]] = {}
        objects: dict[str, int] = {}
        checked: dict[str, bool] = {}
        # one per new object: (its layout if written, the object, its bytes, its tensors)
        writes: list[tuple[Future[ObjectLayout | None], str | _Pack, int, int]] = []
        pack = _Pack()
        reused = 0

        def seal(p: _Pack) -> None:
            writes.append((tasks.submit(write_pack, p), p, p.size, len(p.members)))

        for lo, _hi, hashed in batches:
            for i, digest in enumerate(hashed.result(), start=lo):
                hashes[i] = digest
                nbytes = sizes[i]
                if nbytes == 0:
                    continue
                if digest in seen:
                    where[i] = seen[digest]
                    reused += 1
                    continue
                known = self._known(digest, checked)
                if known is not None:
                    where[i] = seen[digest] = (known.object, known.offset)
                    objects[known.object] = known.object_nbytes
                    reused += 1
                elif nbytes >= SOLO_BYTES:
                    where[i] = seen[digest] = (digest, 0)
                    part = view[job.offsets[i] : job.offsets[i] + nbytes]
                    writes.append(
                        (tasks.submit(write_object, digest, [part], nbytes), digest, nbytes, 1)
                    )
                else:
                    if pack.members and pack.size + nbytes > PACK_BYTES:
                        seal(pack)
                        pack = _Pack()
                    where[i] = seen[digest] = (pack, pack.add(i, nbytes))
        if pack.members:
            seal(pack)
        tasks.wait()

        # Every chunk is durable: now mark each new object complete; the manifest follows.
        new_bytes = written = 0
        finals: dict[str, ObjectLayout] = {}
        for stored, obj, size, count in writes:
            digest = obj.digest if isinstance(obj, _Pack) else obj
            objects[digest] = size
            layout = stored.result()
            if layout is not None and digest not in finals:
                finals[digest] = layout
                new_bytes += size
                written += 1
            else:
                reused += count  # stored before (or twice in this save): nothing written
        for digest, layout in finals.items():
            tasks.submit(store.put, meta_key(digest), layout.zarr_json())
        tasks.wait()

        entries: dict[str, TensorEntry] = {}
        for i, path in enumerate(job.paths):
            obj, offset = where[i]
            entries[path] = TensorEntry(
                object=obj.digest if isinstance(obj, _Pack) else obj,
                offset=offset,
                nbytes=sizes[i],
                dtype=job.dtypes[i],
                shape=job.shapes[i],
                hash=hashes[i],
            )
        return _Part(entries, objects, new_bytes, written, reused)

    def _known(self, digest: str, checked: dict[str, bool]) -> _Location | None:
        """Where ``digest`` is already stored, if the index knows and the object still exists."""
        with self._index_lock:
            location = self._index.get(digest)
        if location is None:
            return None
        ok = checked.get(location.object)
        if ok is None:
            ok = checked[location.object] = self.store.exists(meta_key(location.object))
            if not ok:  # deleted (garbage-collected) since: forget everything that lived there
                with self._index_lock:
                    for h in [h for h, loc in self._index.items() if loc.object == location.object]:
                        del self._index[h]
        return location if ok else None

    def _commit(self, job: _SaveJob, parts: Sequence[_Part]) -> None:
        """Merge the writers' parts into the manifest and write it: the save's commit point."""
        entries: dict[str, TensorEntry] = {}
        objects: dict[str, int] = {}
        stats = job.pending.stats
        for part in parts:
            entries.update(part.entries)
            objects.update(part.objects)
            stats.new_bytes += part.new_bytes
            stats.objects_written += part.objects_written
            stats.tensors_reused += part.tensors_reused
        manifest = Manifest(
            id=job.manifest_id,
            step=job.step,
            created=job.created,
            tensors={path: entries[path] for path in job.paths},
            objects=objects,
            metadata=job.metadata,
            tree=job.tree,
        )
        write_manifest(self.store, manifest)
        self._manifests[manifest.id] = manifest
        self._seed(manifest, manifest.tensors.values())

    def _seed(self, manifest: Manifest, entries: Any) -> None:
        with self._index_lock:
            for e in entries:
                if e.object:
                    self._index.setdefault(
                        e.hash, _Location(e.object, manifest.objects[e.object], e.offset)
                    )

    # -- load ---------------------------------------------------------------------------

    def manifest(self, manifest_id: str) -> Manifest:
        """The manifest ``manifest_id`` (see :func:`read_manifest` for the errors)."""
        manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = self._manifests[manifest_id] = read_manifest(self.store, manifest_id)
        return manifest

    def remember(self, manifest_id: str) -> None:
        """Seed the dedup index with every tensor of ``manifest_id``, without reading them.

        Later saves then skip the tensors that checkpoint already stores, e.g. the frozen
        backbone of the checkpoint a branch starts from.
        """
        manifest = self.manifest(manifest_id)
        self._seed(manifest, manifest.tensors.values())

    def load(self, manifest_id: str, *, prefix: str | None = None) -> dict[Any, Any]:
        """Read checkpoint ``manifest_id`` back: the saved state, tensors bit-exact on the CPU.

        The result has the saved nesting and Python types. With ``prefix`` (dict keys joined
        by ``/``, e.g. ``"model"`` or ``"optimizer/state"``) only that branch is read, and the
        result keeps the nesting above it: ``load(id, prefix="model")["model"]`` is the model
        state. Every tensor's BLAKE3 hash is checked: damaged or missing data raises
        :class:`CorruptCheckpoint` naming the tensor. The tensors' locations seed the dedup
        index, so a save of the loaded state writes only what changed.
        """
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new AsyncCheckpointer to load")
        manifest = self.manifest(manifest_id)
        tree = manifest.tree if prefix is None else select_subtree(manifest.tree, prefix)
        paths = list(dict.fromkeys(tensor_refs(tree)))
        missing = [p for p in paths if p not in manifest.tensors]
        if missing:
            raise CorruptCheckpoint(
                f"manifest {manifest_id} in {self.store.url} has no entry for tensor "
                f"{missing[0]!r} that its tree references; the manifest is damaged"
            )
        tensors = self._read_tensors(manifest, paths)
        state = unflatten_state(tree, tensors)
        self._seed(manifest, (manifest.tensors[p] for p in paths))
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"manifest {manifest_id} in {self.store.url} holds no dict")
        return state

    def _layout(self, digest: str) -> ObjectLayout:
        layout = self._layouts.get(digest)
        if layout is None:
            layout = self._layouts[digest] = read_layout(self.store, digest)
        return layout

    def _read_tensors(self, manifest: Manifest, paths: list[str]) -> dict[str, torch.Tensor]:
        """Read, verify and type the tensors at ``paths`` (in parallel on the I/O pool)."""
        store = self.store
        outs: dict[str, torch.Tensor] = {}
        by_object: dict[str, list[str]] = {}
        for path in paths:
            entry = manifest.tensors[path]
            if entry.dtype not in DTYPES:
                raise UnsupportedFormat(
                    f"tensor {path!r} of checkpoint {manifest.id} has dtype {entry.dtype!r}, "
                    f"which torch {torch.__version__} lacks; upgrade torch to load it"
                )
            outs[path] = torch.empty(entry.nbytes, dtype=torch.uint8)
            if entry.nbytes:
                by_object.setdefault(entry.object, []).append(path)

        def damaged(path: str, why: str, more: int = 0) -> CorruptCheckpoint:
            entry = manifest.tensors[path]
            also = f" and {more} more" if more else ""
            return CorruptCheckpoint(
                f"tensor {path!r}{also} of checkpoint {manifest.id} is damaged: object "
                f"{entry.object} in {store.url} {why}; run verify() and restore the object "
                "from a copy"
            )

        def read_object(digest: str, members: list[str]) -> None:
            try:
                layout = self._layout(digest)
            except ObjectNotFound:
                raise damaged(members[0], "is missing", len(members) - 1) from None
            except UnsupportedFormat as e:
                raise damaged(members[0], f"has an unexpected zarr.json ({e})") from None
            # small tensors: one ranged read per chunk they touch, then copies out of it
            by_chunk: dict[int, list[tuple[str, int, int, int]]] = {}
            for path in members:
                entry = manifest.tensors[path]
                if entry.offset + entry.nbytes > layout.nbytes:
                    raise damaged(path, f"is {layout.nbytes} bytes, too short for the tensor")
                out = outs[path].numpy().data
                if entry.nbytes >= _DIRECT_READ_BYTES:
                    tasks.submit(read_direct, path, digest, layout, entry.offset, out)
                    continue
                done = 0
                for index, offset, n in layout.pieces(entry.offset, entry.nbytes):
                    by_chunk.setdefault(index, []).append((path, offset, n, done))
                    done += n
            for index, pieces in by_chunk.items():
                tasks.submit(read_pieces, digest, index, pieces)

        def read_direct(
            path: str, digest: str, layout: ObjectLayout, start: int, out: memoryview
        ) -> None:
            done = 0
            try:
                for index, offset, n in layout.pieces(start, len(out)):
                    store.get_into(chunk_key(digest, index), out[done : done + n], offset)
                    done += n
            except ObjectNotFound:
                raise damaged(path, "lacks a chunk") from None
            except EOFError:
                raise damaged(path, "is truncated") from None

        def read_pieces(digest: str, index: int, pieces: list[tuple[str, int, int, int]]) -> None:
            lo = min(offset for _, offset, _, _ in pieces)
            hi = max(offset + n for _, offset, n, _ in pieces)
            try:
                data = store.get_range(chunk_key(digest, index), lo, hi - lo)
            except ObjectNotFound:
                raise damaged(pieces[0][0], "lacks a chunk") from None
            if len(data) != hi - lo:
                raise damaged(pieces[0][0], "is truncated")
            src = memoryview(data)
            for path, offset, n, at in pieces:
                outs[path].numpy().data[at : at + n] = src[offset - lo : offset - lo + n]

        tasks = _Tasks(self._io_pool)
        for digest, members in by_object.items():
            tasks.submit(read_object, digest, members)
        tasks.wait()

        def check(path: str) -> None:
            entry = manifest.tensors[path]
            if _blake3(outs[path].numpy().data) != entry.hash:
                raise damaged(path, "does not match the tensor's hash")

        # the first damaged tensor in the state's order is the one reported
        checks = [self._io_pool.submit(check, path) for path in paths]
        for future in checks:
            future.result()
        result = {}
        for path in paths:
            entry = manifest.tensors[path]
            result[path] = from_bytes(outs[path], dtype_from_name(entry.dtype), entry.shape)
        return result

    # -- lifecycle ----------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` wait until the latest save is staged.

        Needed with ``lazy=True``: the step mutates the parameters in place, so it must not
        run while they are being copied. When the copy is already done it costs nothing.
        The hook is removed by :meth:`close`.
        """

        def wait_for_staging(*_: Any) -> None:
            staged = self._latest_staged
            if staged is not None and not staged.done():
                wait([staged])  # a failed copy surfaces from result(), not from step()

        self._hooks.append(optimizer.register_step_pre_hook(wait_for_staging))

    def wait(self) -> None:
        """Wait until every save so far has committed or failed (errors are not raised)."""
        with self._cond:
            pending = list(self._pending)
        wait([p.committed for p in pending])

    def close(self) -> None:
        """Wait for pending saves, then release threads and hooks; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.wait()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stage_pool.shutdown()
        self._persist_pool.shutdown()
        self._io_pool.shutdown()
        self._stager.close()


def _plain_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
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
