"""The asynchronous checkpoint engine: stage on the caller's thread, persist in the background.

One save goes through three steps (DESIGN §4):

1. **stage** — copy every tensor into an arena (see :mod:`tlreg.ckpt.staging`); eager mode does
   it before ``save()`` returns, lazy mode on a background thread, with an optimizer pre-step
   hook that waits for it. A *frozen* tensor that is unchanged since the previous save is
   neither copied nor read: its previous location is reused (see :meth:`attach_model`);
2. **persist** — on the writer thread: hash every tensor (BLAKE3), drop the ones already stored
   (tensor-level dedup), pack the rest into a few objects and write their chunks through a
   thread pool, then each object's ``zarr.json``. With ``writer="process"`` the hashing and
   writes run in a writer subprocess that reads the arena from shared memory
   (:mod:`tlreg.ckpt.writer`); the dedup decisions, packing plan and commit stay here;
3. **commit** — write the manifest. A save that fails before this writes no manifest; the
   objects it wrote are unreferenced and garbage-collectable.

Saves persist one after another (each one internally parallel), so a save always dedups
against every earlier save of the same checkpointer, and the writer never needs more than
``max_inflight_bytes`` of staged copies.

**Several ranks** (``process_group=``, DESIGN §4.4): every rank calls ``save()`` with its own
state, in the same order. A plain tensor is *replicated* (every rank holds it, as with DDP) and
is written by one rank, chosen by a byte-balanced partition that every rank computes alike
(:func:`tlreg.ckpt.shards.partition`); a :class:`~tlreg.ckpt.Shard` (or DTensor) is written by
the rank that holds it. Each rank writes its objects and sends its partial manifest, as JSON,
to rank 0 over a private gloo group; rank 0 merges them and writes the manifest last, then
tells every rank the outcome. Any rank's failure fails the save on every rank, with no
manifest.
"""

from __future__ import annotations

import abc
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from tlreg.ckpt.dtypes import DTYPES, dtype_from_name, dtype_name, from_bytes, tensor_nbytes
from tlreg.ckpt.errors import CheckpointError, CorruptCheckpoint, UnsupportedFormat
from tlreg.ckpt.hashing import hash_bytes, hash_parts
from tlreg.ckpt.manifest import (
    Manifest,
    ShardEntry,
    TensorEntry,
    format_version,
    new_manifest_id,
    read_manifest,
    shards_digest,
    utc_now,
    write_manifest,
)
from tlreg.ckpt.objects import (
    LayoutCache,
    ObjectLayout,
    ObjectReader,
    is_stored,
    write_marker,
    write_unless_stored,
    zero_pad,
)
from tlreg.ckpt.shards import (
    Box,
    Shard,
    check_box,
    check_cover,
    intersect,
    is_dtensor,
    partition,
    slices,
    volume,
)
from tlreg.ckpt.staging import Event, Stager, align, page_aligned_empty, place
from tlreg.ckpt.tree import flatten_state, select_subtree, tensor_refs, unflatten_state
from tlreg.ckpt.writer import ProcessWriter, SharedArenas, check_store
from tlreg.storage_backends import Store, open_store

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from tlreg.ckpt.collective import Collective

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

DEFAULT_WRITER: Literal["thread", "process"] = "thread"
"""Where ``AsyncCheckpointer`` hashes and writes by default (see docs/performance.md)."""

_HASH_BATCH_BYTES = 4 << 20  # small tensors are hashed in batches to amortise task overhead
_HASH_BATCH_COUNT = 512
_DIRECT_READ_BYTES = 1 << 20  # tensors this large are read straight into their own memory

_T = TypeVar("_T")


def _fits(dest: torch.Tensor, entry: TensorEntry) -> bool:
    """Whether ``load(into=...)`` can read ``entry`` straight into ``dest``'s memory."""
    return (
        dest.device.type == "cpu"
        and dest.layout == torch.strided
        and dest.is_contiguous()
        and not dest.is_conj()
        and not dest.is_neg()
        and DTYPES.get(entry.dtype) == dest.dtype
        and tuple(dest.shape) == tuple(entry.shape)
    )


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor sharing its memory."""
    flat = tensor.detach().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


@dataclass(slots=True)
class SaveStats:
    """What one save cost; filled in when it commits (``stall_s`` when ``save()`` returns).

    With several ranks, the byte and tensor counts of the written checkpoint (``new_bytes``,
    ``objects_written``, ``tensors_reused``, ``tensors_skipped``) are totals over all ranks,
    the same on every rank; ``rank_new_bytes`` splits ``new_bytes`` by rank; the times,
    ``tensors``, ``logical_bytes`` and ``bytes_copied`` are this process's own.
    """

    stall_s: float = 0.0
    """Time ``save()`` blocked the caller: back-pressure wait, and the copies in eager mode."""
    stage_s: float = 0.0
    """Time spent copying tensors into the staging buffers."""
    persist_s: float = 0.0
    """Time from staged to committed: hashing, writing objects and the manifest."""
    logical_bytes: int = 0
    """Bytes of all tensors in the state given to ``save()`` (a shard counts its own bytes)."""
    new_bytes: int = 0
    """Object bytes this save wrote (0 for a save of an unchanged state)."""
    objects_written: int = 0
    """Objects this save wrote."""
    tensors: int = 0
    """Tensors in the state given to ``save()``."""
    tensors_reused: int = 0
    """Non-empty tensors that were hashed and found already stored, so not written again."""
    tensors_skipped: int = 0
    """Frozen tensors unchanged since the previous save: neither copied, hashed nor written."""
    bytes_copied: int = 0
    """Bytes this process copied into staging buffers (skipped and other ranks' tensors are
    not copied)."""
    rank_new_bytes: list[int] = field(default_factory=list)
    """Object bytes written by each rank, by rank (one entry for a single process)."""


class PendingSave:
    """A save in progress, with its two completion points.

    ``staged`` completes once the state has been copied (the caller may mutate it again);
    ``committed`` completes with the manifest id once objects and manifest are durable, or
    with the background error, which :meth:`result` re-raises with its original traceback.
    With several ranks, every rank's ``committed`` completes with the same manifest id once
    rank 0 has written the manifest, or fails on every rank when any rank failed.
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


@dataclass(frozen=True, slots=True)
class _Stored:
    """Where one tensor (or shard) of this process ended up."""

    object: str
    object_nbytes: int
    offset: int
    hash: str


@dataclass(frozen=True, slots=True)
class _Signature:
    """What identifies an unchanged tensor: its storage (alive), position, version and type.

    The weak reference makes a freed storage whose address got reused count as changed.
    """

    storage: StorageWeakRef
    key: tuple[Any, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor, box: Box | None) -> _Signature | None:
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

    def matches(self, other: _Signature) -> bool:
        return not self.storage.expired() and self.key == other.key


@dataclass(slots=True)
class _Item:
    """A tensor, or a block of a sharded one, that this process writes."""

    path: str
    tensor: torch.Tensor | None
    """The caller's tensor, until staged (kept for a skipped one until persisted)."""
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    box: Box | None = None
    """``(offsets, shape)`` in the global tensor when the item is a shard."""
    signature: _Signature | None = None
    """Set for a frozen tensor: the next save reuses its location if it still matches."""
    reuse: _Stored | None = None
    """The previous save's location of a frozen, unchanged tensor: not staged nor hashed."""
    offset: int = -1
    """Offset in the arena (-1 when not staged)."""


@dataclass(slots=True)
class _Pack:
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


@dataclass(slots=True)
class _Part:
    """A partial manifest: what one rank stored (rank 0 merges them, :meth:`_merge`)."""

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
    stored: list[_Stored] = field(default_factory=list)
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
    def from_json(cls, doc: Mapping[str, Any]) -> _Part:
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


@dataclass(slots=True)
class _SaveJob:
    manifest_id: str
    step: int | None
    metadata: dict[str, Any]
    tree: Any
    paths: list[str]
    """Every tensor path of the state, in order (the manifest's order)."""
    items: list[_Item]
    """What this process writes."""
    sharded: dict[str, tuple[str, tuple[int, ...]]]
    """Sharded paths of the state: dtype and global shape."""
    layout: list[Any] | None
    """With several ranks: every path's kind, dtype and shape (must agree across ranks)."""
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


_Span = tuple[int, int, int]
"""Bytes a persist step reads: ``(buffer index, offset, nbytes)``; buffer -1 means zeros."""


class _Ops(abc.ABC):
    """The byte work of one save's persist step: where hashing and object writes run.

    Every method returns at once; its future completes when the work is done, or with the
    work's error. ``wait`` re-raises the first error; ``drain`` waits without raising (before
    giving the buffers back).
    """

    @abc.abstractmethod
    def hash(self, spans: list[_Span]) -> Future[list[str]]:
        """The BLAKE3 digest of each span."""

    @abc.abstractmethod
    def write_object(
        self, digest: str, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        """Write the chunks of object ``digest`` (its layout), or None if already stored."""

    @abc.abstractmethod
    def write_pack(
        self, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        """Hash the spans as one object, then as :meth:`write_object`."""

    @abc.abstractmethod
    def write_meta(self, finals: Mapping[str, ObjectLayout]) -> None:
        """Write each object's ``zarr.json`` (its chunks are durable); blocks."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Wait for every submitted operation; re-raise the first error."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Wait for every submitted operation without raising."""


class _LocalOps(_Ops):
    """The thread writer: on this process's I/O thread pool."""

    def __init__(self, store: Store, tasks: _Tasks, buffers: list[torch.Tensor]) -> None:
        self._store = store
        self._tasks = tasks
        self._buffers = buffers

    def _part(self, span: _Span) -> memoryview:
        source, offset, nbytes = span
        if source < 0:
            return zero_pad(nbytes)
        return self._buffers[source].numpy().data[offset : offset + nbytes]

    # docstring inherited
    def hash(self, spans: list[_Span]) -> Future[list[str]]:
        return self._tasks.submit(lambda: [hash_bytes(self._part(s)) for s in spans])

    def _write(self, name: str, spans: list[_Span], nbytes: int) -> ObjectLayout | None:
        parts = [self._part(s) for s in spans]
        return write_unless_stored(
            self._store,
            name,
            parts,
            nbytes,
            lambda key, chunk: self._tasks.submit(self._store.put, key, chunk),
        )

    # docstring inherited
    def write_object(
        self, name: str, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        return self._tasks.submit(lambda: (name, self._write(name, spans, nbytes)))

    # docstring inherited
    def write_pack(
        self, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
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


class _RemoteOps(_Ops):
    """The process writer: requests to the writer process, which reads the shared buffers."""

    def __init__(self, writer: ProcessWriter, stager: Stager, buffers: list[torch.Tensor]) -> None:
        self._writer = writer
        self._stager = stager
        self._buffers = buffers
        self._futures: list[Future[Any]] = []

    def _spans(self, spans: list[_Span]) -> list[tuple[str | None, int, int]]:
        return [
            (None if s < 0 else self._stager.segment(self._buffers[s]), offset, n)
            for s, offset, n in spans
        ]

    def _call(self, op: str, **args: Any) -> Future[Any]:
        future = self._writer.call(op, **args)
        self._futures.append(future)
        return future

    # docstring inherited
    def hash(self, spans: list[_Span]) -> Future[list[str]]:
        return self._call("hash", spans=self._spans(spans))

    # docstring inherited
    def write_object(
        self, digest: str, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        sent = self._call("object", digest=digest, spans=self._spans(spans), nbytes=nbytes)
        return _then(sent, lambda chunk: (digest, _layout(nbytes, chunk)))

    # docstring inherited
    def write_pack(
        self, spans: list[_Span], nbytes: int
    ) -> Future[tuple[str, ObjectLayout | None]]:
        sent = self._call("pack", spans=self._spans(spans), nbytes=nbytes)
        return _then(sent, lambda reply: (str(reply[0]), _layout(nbytes, reply[1])))

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


def _then(future: Future[Any], fn: Callable[[Any], _T]) -> Future[_T]:
    """A future of ``fn(future.result())``, or of the same error."""
    out: Future[_T] = Future()

    def done(f: Future[Any]) -> None:
        error = f.exception()
        if error is not None:
            out.set_exception(error)
            return
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    future.add_done_callback(done)
    return out


class AsyncCheckpointer:
    """Saves nested PyTorch state to a store without blocking training, and loads it back.

    ``store`` is a :class:`Store` or a URL for :func:`open_store` (a store opened from a URL
    is closed by :meth:`close`; one passed in is the caller's to close). With ``lazy=True``,
    ``save()`` returns before copying anything and the copy runs in the background; call
    :meth:`attach_optimizer` so that ``optimizer.step()`` waits for it, and do not mutate the
    state otherwise before ``pending.staged``. ``max_inflight_bytes`` bounds the staged bytes
    of saves not yet committed: ``save()`` waits for earlier saves rather than exceed it (a
    single state larger than the bound still saves, alone). ``io_threads`` is the number of
    concurrent hashing and store operations.

    ``process_group`` (e.g. ``torch.distributed.group.WORLD``) makes the checkpointer
    collective over that group's ranks: construct it on every rank (it creates a private gloo
    group, collectively, so that saving never runs collectives on the group training uses),
    call ``save()`` on every rank in the same order, and each rank writes its share (see the
    module docstring). ``collective_timeout`` bounds how long a save waits for the other
    ranks (default: the process group default). Without ``process_group``, or with a group of
    one rank, it saves alone, whether or not torch.distributed is initialised.

    ``skip_unchanged`` (default on) lets a frozen tensor that is unchanged since the previous
    save of this checkpointer be neither copied nor hashed (see :meth:`attach_model`).

    ``writer`` says where the byte work of persisting (hashing, packing, object writes)
    runs: ``"thread"``, on this process's I/O threads, or ``"process"``, in a writer
    subprocess that reads the staging buffers from shared memory (see
    :mod:`tlreg.ckpt.writer`), so that it never takes this process's GIL. The process
    writer starts on the first save and stops on :meth:`close`; the store's ``__reduce__``
    must name an importable factory with JSON arguments, and the store must be reachable
    from another process (not ``memory://``). If it dies, the save it served
    fails with :class:`~tlreg.ckpt.errors.WriterError` and no manifest, and the next save
    starts a new one. Both write the same objects and manifests.
    """

    def __init__(
        self,
        store: str | Store,
        *,
        lazy: bool = False,
        max_inflight_bytes: int | None = None,
        io_threads: int = 8,
        process_group: ProcessGroup | None = None,
        collective_timeout: timedelta | None = None,
        skip_unchanged: bool = True,
        writer: Literal["thread", "process"] = DEFAULT_WRITER,
    ) -> None:
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', not {writer!r}")
        if max_inflight_bytes is not None and max_inflight_bytes <= 0:
            raise ValueError("max_inflight_bytes must be positive (or None for no bound)")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        self.store: Store = open_store(store)
        self._owns_store = not isinstance(store, Store)  # opened from a URL: closed with us
        self.lazy = lazy
        self.max_inflight_bytes = max_inflight_bytes
        self.skip_unchanged = skip_unchanged
        self._collective: Collective | None = None
        if process_group is not None:
            from tlreg.ckpt.collective import Collective

            collective = Collective(process_group, timeout=collective_timeout)
            if collective.world > 1:
                self._collective = collective
        self.writer = writer
        self._writer: ProcessWriter | None = None
        if writer == "process":
            check_store(self.store)
            self._writer = ProcessWriter(self.store, threads=io_threads)
            self._stager = Stager(shared=SharedArenas(), on_drop=self._writer.forget)
        else:
            self._stager = Stager()
        self._stage_pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-stage")
        self._persist_pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-persist")
        self._io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tlreg-ckpt-io")
        self._cond = threading.Condition()
        self._inflight = 0
        self._pending: list[PendingSave] = []
        self._latest_staged: Future[None] | None = None
        self._hooks: list[Any] = []
        self._models: list[weakref.ref[torch.nn.Module]] = []
        self._index: dict[str, _Location] = {}
        self._index_lock = threading.Lock()
        self._frozen: dict[str, tuple[_Signature, _Stored]] = {}
        self._frozen_lock = threading.Lock()
        self._layouts = LayoutCache()
        self._manifests: dict[str, Manifest] = {}
        self._closed = False

    def __repr__(self) -> str:
        ranks = ""
        if self._collective is not None:
            ranks = f", rank={self.rank}, world={self.world}"
        return f"AsyncCheckpointer({self.store!r}, lazy={self.lazy}, writer={self.writer!r}{ranks})"

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
    def rank(self) -> int:
        """This process's rank among the ranks that save together (0 when saving alone)."""
        return self._collective.rank if self._collective is not None else 0

    @property
    def world(self) -> int:
        """How many ranks save together (1 when saving alone)."""
        return self._collective.world if self._collective is not None else 1

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

        ``state`` is nested dicts/lists/tuples of tensors, :class:`~tlreg.ckpt.Shard` objects,
        DTensors and plain values (see :func:`flatten_state`); anything else raises
        ``TypeError`` naming its path, before anything is written. ``metadata`` is JSON
        stored in the manifest as it is. With several ranks this is collective: rank 0's
        ``step``, ``metadata`` and non-tensor values are the ones recorded.
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
        items, sharded, layout = self._plan(flat)
        nbytes = 0
        for item in items:
            if item.reuse is None:
                item.offset = place(nbytes, item.nbytes)
                nbytes = align(item.offset + item.nbytes)
        staged = [item.tensor for item in items if item.reuse is None and item.tensor is not None]
        pending = PendingSave(Future(), Future())
        stats = pending.stats
        stats.tensors = len(flat)
        stats.logical_bytes = sum(
            tensor_nbytes(v.local if isinstance(v, Shard) else v) for v in flat.values()
        )
        stats.bytes_copied = sum(item.nbytes for item in items if item.reuse is None)
        stats.tensors_skipped = sum(item.reuse is not None for item in items)
        job = _SaveJob(
            manifest_id=new_manifest_id(),
            step=step,
            metadata=meta,
            tree=tree,
            paths=list(flat),
            items=items,
            sharded=sharded,
            layout=layout,
            nbytes=nbytes,
            mark=Stager.mark(staged),
            pending=pending,
            created=utc_now(),
        )
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
        stats.stall_s = time.perf_counter() - start
        return pending

    def _plan(
        self, flat: Mapping[str, torch.Tensor | Shard]
    ) -> tuple[list[_Item], dict[str, tuple[str, tuple[int, ...]]], list[Any] | None]:
        """What this process writes: its share of the replicated tensors and its shards."""
        rank, world = self.rank, self.world
        owner: dict[str, int] | None = None
        layout: list[Any] | None = None
        if world > 1:
            replicated = [(p, tensor_nbytes(v)) for p, v in flat.items() if not _is_shard(v)]
            owner = partition(replicated, world)
            layout = []
        frozen = self._frozen_storages() if self.skip_unchanged else None
        with self._frozen_lock:
            previous = self._frozen
        items: list[_Item] = []
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
            item = _Item(
                path, tensor, tensor_nbytes(tensor), dtype_name(tensor.dtype), tuple(tensor.shape)
            )
            item.box = box
            if frozen is not None and _is_frozen(tensor, frozen):
                item.signature = _Signature.of(tensor, box)
                before = previous.get(path)
                if item.signature is not None and before is not None:
                    if before[0].matches(item.signature):
                        item.reuse = before[1]
            items.append(item)
        return items, sharded, layout

    def _frozen_storages(self) -> set[int]:
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
        staged = [item for item in job.items if item.reuse is None]
        try:
            pinned = job.mark is not None
            job.arena = self._stager.acquire(job.nbytes, pinned=pinned)
            self._stager.copy(
                [item.tensor for item in staged if item.tensor is not None],
                [item.offset for item in staged],
                job.arena,
                job.mark,
            )
        except BaseException as e:
            job.pending.staged.set_exception(e)
        else:
            job.pending.stats.stage_s = time.perf_counter() - start
            job.pending.staged.set_result(None)
        finally:
            for item in staged:  # the caller's tensors are not needed past this point
                item.tensor = None

    def _persist(self, job: _SaveJob) -> None:
        committed = job.pending.committed
        error = job.pending.staged.exception()
        result: str | None = None
        part: _Part | None = None
        start = time.perf_counter()
        try:
            try:
                if error is None:
                    part = self._write_tensors(job)
            except BaseException as e:
                error = e
            if self._collective is not None:
                result, error = self._commit_collective(job, part, error)
            elif error is None and part is not None:
                try:
                    self._commit(job, [part])
                    result = job.manifest_id
                except BaseException as e:
                    error = e
            if error is None and part is not None:
                self._remember_frozen(job, part)
        finally:
            if job.arena is not None:
                self._stager.release(job.arena)
                job.arena = None
            for item in job.items:
                item.tensor = None
            self._unreserve(job.nbytes)
        job.pending.stats.persist_s = time.perf_counter() - start
        if error is not None:
            committed.set_exception(error)
        else:
            committed.set_result(result)  # type: ignore[arg-type]

    def _write_tensors(self, job: _SaveJob) -> _Part:
        """Hash, dedup, pack and write the staged tensors; returns their entries."""
        assert job.arena is not None
        buffers = [job.arena]  # span sources: the arena, then re-read copies
        ops: _Ops
        if self._writer is not None:
            ops = _RemoteOps(self._writer, self._stager, buffers)
        else:
            ops = _LocalOps(self.store, _Tasks(self._io_pool), buffers)
        try:
            return self._write_staged(job, ops, buffers)
        finally:
            # never hand the arena back to the next save while a task still reads from it
            ops.drain()
            for buffer in buffers[1:]:
                self._stager.discard(buffer)

    def _write_staged(self, job: _SaveJob, ops: _Ops, buffers: list[torch.Tensor]) -> _Part:
        items = job.items
        checked: dict[str, bool] = {}
        copies: dict[int, _Span] = {}
        todo: list[int] = []
        for i, item in enumerate(items):
            if item.reuse is not None:
                if not item.reuse.object or self._exists(item.reuse.object, checked):
                    continue
                buffers.append(self._reread(item))  # its object was deleted since: write it again
                copies[i] = (len(buffers) - 1, 0, item.nbytes)
                item.reuse = None
            todo.append(i)

        def span(i: int) -> _Span:
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

        def pack_spans(pack: _Pack) -> list[_Span]:
            spans: list[_Span] = []
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
        where: list[tuple[str | _Pack, int]] = [("", 0)] * len(items)
        seen: dict[str, tuple[str | _Pack, int]] = {}
        objects: dict[str, int] = {}
        # one per new object: (its digest and layout if written, the object, bytes, tensors)
        writes: list[tuple[Future[tuple[str, ObjectLayout | None]], str | _Pack, int, int]] = []
        pack = _Pack()
        reused = 0

        def seal(p: _Pack) -> None:
            writes.append((ops.write_pack(pack_spans(p), p.size), p, p.size, len(p.members)))

        for batch, hashed in batches:
            for i, digest in zip(batch, hashed.result(), strict=True):
                hashes[i] = digest
                nbytes = items[i].nbytes
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
                    writes.append((ops.write_object(digest, [span(i)], nbytes), digest, nbytes, 1))
                else:
                    if pack.members and pack.size + nbytes > PACK_BYTES:
                        seal(pack)
                        pack = _Pack()
                    where[i] = seen[digest] = (pack, pack.add(i, nbytes))
        if pack.members:
            seal(pack)
        ops.wait()

        # Every chunk is durable: now mark each new object complete; the manifest follows.
        new_bytes = written = 0
        finals: dict[str, ObjectLayout] = {}
        for stored, obj, size, count in writes:
            digest, layout = stored.result()
            if isinstance(obj, _Pack):
                obj.digest = digest
            objects[digest] = size
            if layout is not None and digest not in finals:
                finals[digest] = layout
                new_bytes += size
                written += 1
            else:
                reused += count  # stored before (or twice in this save): nothing written
        ops.write_meta(finals)

        part = _Part(self.rank, {}, {}, objects, new_bytes, written, reused)
        for i, item in enumerate(items):
            if item.reuse is not None:
                loc = item.reuse
                part.tensors_skipped += 1
                if loc.object:
                    objects[loc.object] = loc.object_nbytes
            else:
                obj, offset = where[i]
                name = obj.digest if isinstance(obj, _Pack) else obj
                loc = _Stored(name, objects.get(name, 0), offset, hashes[i])
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

    def _reread(self, item: _Item) -> torch.Tensor:
        """Copy a skipped tensor now, if it is still unchanged (its stored object is gone)."""
        tensor = item.tensor
        if tensor is None or item.signature is None:
            raise AssertionError(f"skipped tensor {item.path!r} lost its source")
        copy = self._stager.scratch(item.nbytes)
        with torch.no_grad():
            copy[: item.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        now = _Signature.of(tensor, item.box)
        if now is None or not item.signature.matches(now):
            self._stager.discard(copy)
            raise CheckpointError(
                f"frozen tensor {item.path!r} changed after save() while its previous object "
                "was found deleted; nothing was committed, save again"
            )
        return copy

    def _known(self, digest: str, checked: dict[str, bool]) -> _Location | None:
        """Where ``digest`` is already stored, if the index knows and the object still exists."""
        with self._index_lock:
            location = self._index.get(digest)
        if location is None:
            return None
        ok = self._exists(location.object, checked)
        if not ok:  # deleted (garbage-collected) since: forget everything that lived there
            with self._index_lock:
                for h in [h for h, loc in self._index.items() if loc.object == location.object]:
                    del self._index[h]
        return location if ok else None

    # -- commit -------------------------------------------------------------------------

    def _merge(self, job: _SaveJob, parts: Sequence[_Part]) -> Manifest:
        """The manifest of ``job`` from every rank's part (rank 0, or a single process)."""
        tensors: dict[str, TensorEntry] = {}
        objects: dict[str, int] = {}
        for part in parts:
            objects.update(part.objects)
        for path in job.paths:
            if path not in job.sharded:
                entry = next((p.tensors[path] for p in parts if path in p.tensors), None)
                if entry is None:
                    raise CheckpointError(
                        f"no rank wrote tensor {path!r}: the ranks' states differ; every rank "
                        "must save the same tensors, in the same order"
                    )
                tensors[path] = entry
                continue
            dtype, global_shape = job.sharded[path]
            blocks: dict[Box, ShardEntry] = {}
            for part in parts:
                shard = part.shards.get(path)
                if shard is not None:
                    blocks.setdefault(shard.box, shard)  # a block several ranks hold: one copy
            shards = sorted(blocks.values(), key=lambda s: s.offsets)
            try:
                check_cover([s.box for s in shards], global_shape, path)
            except ValueError as e:
                raise CheckpointError(f"cannot commit checkpoint {job.manifest_id}: {e}") from None
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
            id=job.manifest_id,
            step=job.step,
            created=job.created,
            tensors=tensors,
            objects=objects,
            metadata=job.metadata,
            tree=job.tree,
            version=format_version(tensors),
        )

    def _commit(self, job: _SaveJob, parts: Sequence[_Part]) -> Manifest:
        """Merge the parts into the manifest and write it: the save's commit point."""
        manifest = self._merge(job, parts)
        write_manifest(self.store, manifest)
        self._manifests[manifest.id] = manifest
        stats = job.pending.stats
        stats.new_bytes = sum(p.new_bytes for p in parts)
        stats.objects_written = sum(p.objects_written for p in parts)
        stats.tensors_reused = sum(p.tensors_reused for p in parts)
        stats.tensors_skipped = sum(p.tensors_skipped for p in parts)
        stats.rank_new_bytes = [p.new_bytes for p in parts]
        self._seed(manifest.objects, (s for e in manifest.tensors.values() for s in e.pieces()))
        return manifest

    def _commit_collective(
        self, job: _SaveJob, part: _Part | None, error: BaseException | None
    ) -> tuple[str | None, BaseException | None]:
        """Send this rank's part to rank 0, which commits; returns ``(manifest id, error)``.

        Every rank takes part even after its own failure, so that the others learn of it
        instead of waiting: a failed rank sends its error instead of its part.
        """
        collective = self._collective
        assert collective is not None and job.layout is not None
        layout = hash_bytes(json.dumps(job.layout, separators=(",", ":")).encode())
        if error is None and part is not None:
            part.layout = layout
            payload = part.to_bytes()
        else:
            why = f"{type(error).__name__}: {error}" if error is not None else "nothing staged"
            payload = json.dumps({"rank": collective.rank, "error": why}).encode()
        own_error = error
        try:
            gathered = collective.gather(payload)
            if gathered is not None:  # rank 0
                outcome, own_error = self._conclude(job, gathered, layout, own_error)
                raw = collective.broadcast(json.dumps(outcome).encode())
            else:
                raw = collective.broadcast(None)
            outcome = json.loads(raw)
        except BaseException as e:  # the exchange itself failed (a rank died, a timeout)
            return None, own_error or e
        if own_error is not None:
            return None, own_error
        if outcome["error"] is not None:
            return None, CheckpointError(
                f"checkpoint {outcome['id']} was not committed: {outcome['error']}; "
                "no manifest was written"
            )
        stats = job.pending.stats
        stats.rank_new_bytes = list(outcome["new_bytes"])
        stats.new_bytes = sum(stats.rank_new_bytes)
        stats.objects_written = outcome["objects_written"]
        stats.tensors_reused = outcome["tensors_reused"]
        stats.tensors_skipped = outcome["tensors_skipped"]
        if part is not None:
            self._seed(part.objects, [*part.tensors.values(), *part.shards.values()])
        return str(outcome["id"]), None

    def _conclude(
        self, job: _SaveJob, gathered: list[bytes], layout: str, error: BaseException | None
    ) -> tuple[dict[str, Any], BaseException | None]:
        """Rank 0: commit unless a rank failed; the outcome every rank learns, and own error."""
        outcome: dict[str, Any] = {"id": job.manifest_id, "error": None}
        try:
            docs = [json.loads(raw) for raw in gathered]
            failed = [d for d in docs if "error" in d]
            if failed:
                outcome["error"] = "; ".join(
                    f"rank {d['rank']} failed: {d['error']}" for d in failed
                )
                return outcome, error
            parts = [_Part.from_json(d) for d in docs]
            for part in parts:
                if part.layout != layout:
                    raise CheckpointError(
                        f"rank {part.rank} saved a state whose tensors (paths, dtypes or shapes) "
                        "differ from rank 0's; every rank must save the same structure"
                    )
            self._commit(job, parts)
        except BaseException as e:
            outcome["error"] = f"rank 0 failed: {type(e).__name__}: {e}"
            return outcome, error or e
        stats = job.pending.stats
        outcome.update(
            new_bytes=stats.rank_new_bytes,
            objects_written=stats.objects_written,
            tensors_reused=stats.tensors_reused,
            tensors_skipped=stats.tensors_skipped,
        )
        return outcome, error

    def _remember_frozen(self, job: _SaveJob, part: _Part) -> None:
        """Keep the locations of this save's frozen tensors for the next save to reuse."""
        frozen = {
            item.path: (item.signature, stored)
            for item, stored in zip(job.items, part.stored, strict=True)
            if item.signature is not None
        }
        with self._frozen_lock:
            self._frozen = frozen

    def _seed(
        self, objects: Mapping[str, int], entries: Iterable[TensorEntry | ShardEntry]
    ) -> None:
        with self._index_lock:
            for e in entries:
                if e.object:
                    self._index.setdefault(e.hash, _Location(e.object, objects[e.object], e.offset))

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
        self._seed(manifest.objects, (s for e in manifest.tensors.values() for s in e.pieces()))

    def load(
        self,
        manifest_id: str,
        *,
        prefix: str | None = None,
        shards: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        into: Mapping[str, Any] | None = None,
    ) -> dict[Any, Any]:
        """Read checkpoint ``manifest_id`` back: the saved state, tensors bit-exact on the CPU.

        The result has the saved nesting and Python types. With ``prefix`` (dict keys joined
        by ``/``, e.g. ``"model"`` or ``"optimizer/state"``) only that branch is read, and the
        result keeps the nesting above it: ``load(id, prefix="model")["model"]`` is the model
        state. Every tensor's BLAKE3 hash is checked: damaged or missing data raises
        :class:`CorruptCheckpoint` naming the tensor. The tensors' locations seed the dedup
        index, so a save of the loaded state writes only what changed.

        A tensor saved as shards loads as the whole global tensor. ``shards`` maps tensor
        paths (as in the manifest) to the block ``(offsets, shape)`` this rank wants of them,
        sharded when saved or not: each becomes a :class:`~tlreg.ckpt.Shard` holding that
        block, assembled from whichever saved blocks overlap it, so N ranks' checkpoint
        restores on M ranks. Only the saved blocks that overlap it are read.

        ``into`` loads in place, as ``torch.distributed.checkpoint.load`` does: a state with
        the result's nesting (``{"model": model.state_dict(), ...}``; with ``prefix``, the
        nesting above it too). Each saved tensor whose counterpart in ``into`` (same path) is
        a contiguous CPU tensor of the same dtype and shape is read straight into that tensor,
        which the result then holds; no new memory is allocated for it (on a fresh VM,
        allocating and faulting in new memory was over half of a restore's time). Other
        tensors, and shards, load into new tensors. The filled tensors' version counters
        are bumped, so a later save copies them again. If the load raises, the tensors of
        ``into`` may hold part of the checkpoint: load again, from this or another one.
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
        destinations = flatten_state(into)[1] if into is not None else {}
        targets: dict[str, Box] = {}
        for path, (offsets, shape) in (shards or {}).items():
            if path not in paths:
                raise KeyError(
                    f"shards names tensor {path!r}, which checkpoint {manifest_id} does not "
                    f"hold (under prefix {prefix!r}); use a path of manifest(id).tensors"
                )
            box = (tuple(int(o) for o in offsets), tuple(int(n) for n in shape))
            check_box(box, manifest.tensors[path].shape, path)
            targets[path] = box
        reads: dict[str, TensorEntry] = {}
        in_place: dict[str, torch.Tensor] = {}
        filled: dict[int, str] = {}  # data_ptr -> the path filled in place
        assemble: dict[str, tuple[Box, list[tuple[str, ShardEntry]]]] = {}
        for path in paths:
            entry = manifest.tensors[path]
            if not entry.shards and path not in targets:
                reads[path] = entry
                dest = destinations.get(path)
                if isinstance(dest, torch.Tensor) and _fits(dest, entry):
                    # a tensor under two paths (tied weights) is filled once; the other path
                    # loads apart (two reads into one memory would race)
                    if dest.numel() == 0 or filled.setdefault(dest.data_ptr(), path) == path:
                        in_place[path] = dest
                continue
            want = targets.get(path, ((0,) * len(entry.shape), entry.shape))
            pieces = []
            for shard in entry.pieces():
                overlap = intersect(shard.box, want)
                if overlap is not None and volume(overlap[1]):
                    key = f"{path}@{list(shard.offsets)}"
                    reads[key] = shard.piece(entry.dtype)
                    pieces.append((key, shard))
            assemble[path] = (want, pieces)
        raw = self._read_raw(manifest, reads, {path: _byte_view(t) for path, t in in_place.items()})
        for dest in in_place.values():
            if not dest.is_inference():  # (those keep no version counter)
                torch.autograd.graph.increment_version(dest)
        tensors: dict[str, torch.Tensor | Shard] = dict(in_place)
        for path in paths:
            entry = manifest.tensors[path]
            dtype = dtype_from_name(entry.dtype)
            if path in in_place:
                continue
            if path not in assemble:
                tensors[path] = from_bytes(raw[path], dtype, entry.shape)
                continue
            want, pieces = assemble[path]
            # assembled as bytes ([..., itemsize] uint8), so that any dtype copies exactly
            item = dtype.itemsize
            out = torch.empty((*want[1], item), dtype=torch.uint8)
            for key, shard in pieces:
                overlap = intersect(shard.box, want)
                assert overlap is not None
                src = raw[key].view(*shard.shape, item)
                out[slices(overlap, want[0])] = src[slices(overlap, shard.offsets)]
            block = from_bytes(out.reshape(-1), dtype, want[1])
            tensors[path] = Shard(block, want[0], entry.shape) if path in targets else block
        state = unflatten_state(tree, tensors)
        self._seed(manifest.objects, reads.values())
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"manifest {manifest_id} in {self.store.url} holds no dict")
        return state

    def _read_raw(
        self,
        manifest: Manifest,
        reads: Mapping[str, TensorEntry],
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read and verify the bytes of ``reads`` (name -> entry) in parallel on the I/O pool;
        returns each as a flat uint8 tensor: the one in ``buffers`` under its name if any
        (exactly ``entry.nbytes`` long), else a new one."""
        reader = ObjectReader(self.store, manifest.id, self._layouts)
        outs: dict[str, torch.Tensor] = {}
        by_object: dict[str, list[str]] = {}
        for name, entry in reads.items():
            if entry.dtype not in DTYPES:
                raise UnsupportedFormat(
                    f"tensor {name!r} of checkpoint {manifest.id} has dtype {entry.dtype!r}, "
                    f"which torch {torch.__version__} lacks; upgrade torch to load it"
                )
            if buffers is not None and name in buffers:
                outs[name] = buffers[name]
            elif entry.nbytes >= _DIRECT_READ_BYTES:  # read in place, with direct I/O if it can
                outs[name] = page_aligned_empty(entry.nbytes)
            else:
                outs[name] = torch.empty(entry.nbytes, dtype=torch.uint8)
            if entry.nbytes:
                by_object.setdefault(entry.object, []).append(name)

        def read_object(name: str, members: list[str]) -> None:
            more = f" and {len(members) - 1} more" if len(members) > 1 else ""
            layout = reader.layout(name, f"tensor {members[0]!r}{more}")
            # small tensors: one ranged read per chunk they touch, then copies out of it
            by_chunk: dict[int, list[tuple[str, int, int, int]]] = {}
            for path in members:
                entry = reads[path]
                reader.layout(name, f"tensor {path!r}", entry.offset, entry.nbytes)
                if entry.nbytes >= _DIRECT_READ_BYTES:
                    tasks.submit(read_direct, path)
                    continue
                done = 0
                for index, offset, n in layout.pieces(entry.offset, entry.nbytes):
                    by_chunk.setdefault(index, []).append((path, offset, n, done))
                    done += n
            for index, pieces in by_chunk.items():
                tasks.submit(read_pieces, name, index, pieces)

        def read_direct(path: str) -> None:
            entry = reads[path]
            out = outs[path].numpy().data
            reader.read_into(entry.object, entry.offset, out, f"tensor {path!r}")
            # hashed while the other reads go on (a damaged one is reported below, in order)
            verified[path] = hash_bytes(out) == entry.hash

        def read_pieces(name: str, index: int, pieces: list[tuple[str, int, int, int]]) -> None:
            lo = min(offset for _, offset, _, _ in pieces)
            hi = max(offset + n for _, offset, n, _ in pieces)
            src = memoryview(
                reader.read_chunk(name, index, lo, hi - lo, f"tensor {pieces[0][0]!r}")
            )
            for path, offset, n, at in pieces:
                outs[path].numpy().data[at : at + n] = src[offset - lo : offset - lo + n]

        verified: dict[str, bool] = {}  # large tensors, hashed by the task that read them
        tasks = _Tasks(self._io_pool)
        for name, members in by_object.items():
            tasks.submit(read_object, name, members)
        tasks.wait()

        def check(path: str) -> bool:
            return hash_bytes(outs[path].numpy().data) == reads[path].hash

        checks = {name: self._io_pool.submit(check, name) for name in reads if name not in verified}
        # the first damaged tensor in the state's order is the one reported
        for name in reads:
            ok = verified[name] if name in verified else checks[name].result()
            if not ok:
                entry = reads[name]
                raise reader.damaged(
                    f"tensor {name!r}", entry.object, "does not match the tensor's hash"
                )
        return outs

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

    def attach_model(self, module: torch.nn.Module) -> None:
        """Let saves recognise ``module``'s frozen parameters in ``module.state_dict()``.

        ``state_dict()`` detaches parameters, so a saved tensor cannot tell by itself whether
        it is trained. A tensor is *frozen* when it does not require grad and either is a
        parameter (``state_dict(keep_vars=True)``) or shares the storage of a frozen
        parameter of an attached module. A frozen tensor whose storage, ``_version``, dtype,
        shape and strides are unchanged since the previous save of this checkpointer is
        neither copied nor hashed: its previous location is reused. Trained tensors and
        optimizer state are always copied: fused optimizers update them without bumping
        ``_version``. Writes that bypass the version counter (``p.data.add_``, writes through
        ``.numpy()``) to a frozen parameter are not seen: use ``skip_unchanged=False`` if
        your code does that. Holds only a weak reference; attaching twice is harmless.
        """
        if not any(ref() is module for ref in self._models):
            self._models.append(weakref.ref(module))

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
        if self._writer is not None:
            self._writer.close()
        self._stager.close()
        if self._collective is not None:
            self._collective.close()
        if self._owns_store:
            self.store.close()


def _is_shard(value: torch.Tensor | Shard) -> bool:
    return isinstance(value, Shard)


def _is_frozen(tensor: torch.Tensor, frozen_storages: set[int]) -> bool:
    """Whether ``tensor`` is known not to be trained (see ``AsyncCheckpointer.attach_model``)."""
    if tensor.requires_grad:
        return False
    if isinstance(tensor, torch.nn.Parameter):
        return True
    return bool(frozen_storages) and tensor.untyped_storage()._cdata in frozen_storages


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
