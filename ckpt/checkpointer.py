"""The asynchronous checkpoint engine: :class:`AsyncCheckpointer`, a facade over the stages.

A save enters here once and moves down through the stages (DESIGN §4):

1. **plan** (:mod:`~tlreg.ckpt.plan`), on the caller's thread — what this rank writes, and
   which frozen tensors unchanged since the previous save it skips;
2. **stage** (:mod:`~tlreg.ckpt.staging`) — copy the tensors into an arena: before ``save()``
   returns (eager), or on the stage thread with an optimizer pre-step hook that waits for it
   (lazy);
3. **persist** (:mod:`~tlreg.ckpt.persist`), on the persist thread — hash, dedup, pack and
   write the objects, on the I/O pool or in the writer process (:mod:`~tlreg.ckpt.writer`);
4. **commit** (:mod:`~tlreg.ckpt.commit`) — merge the ranks' parts and write the manifest
   last. A save that fails before this writes no manifest; the objects it wrote are
   unreferenced and garbage-collectable.

Saves persist one after another (each one internally parallel), so a save dedups against the
saves before it, and the writer never needs more than ``max_inflight_bytes`` of staged
copies. ``load`` is :mod:`~tlreg.ckpt.restore`.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch

from tlreg.ckpt.commit import Committer
from tlreg.ckpt.errors import CheckpointError, CorruptCheckpoint
from tlreg.ckpt.manifest import Manifest, read_manifest
from tlreg.ckpt.objects import LayoutCache
from tlreg.ckpt.peer import broadcast_manifest, objects_under, share_objects, tiers_of
from tlreg.ckpt.pending import PendingSave, SaveStats
from tlreg.ckpt.persist import PACK_BYTES, SOLO_BYTES, DedupIndex, Persister
from tlreg.ckpt.plan import FrozenSkip, SavePlan, plan_save
from tlreg.ckpt.restore import Restorer
from tlreg.ckpt.staging import Event, Stager
from tlreg.ckpt.tiers import Drainer, PruneStats, TieredStore, prune_local, write_share
from tlreg.ckpt.writer import ProcessWriter, SharedArenas, check_store
from tlreg.storage_backends import Store, open_store

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from tlreg.ckpt.collective import Collective

__all__ = [
    "DEFAULT_WRITER",
    "PACK_BYTES",
    "SOLO_BYTES",
    "AsyncCheckpointer",
    "PendingSave",
    "SaveStats",
]

DEFAULT_WRITER: Literal["thread", "process"] = "thread"
"""Where ``AsyncCheckpointer`` hashes and writes by default (see docs/performance.md)."""

MANIFEST_CACHE = 4
"""Manifests :meth:`AsyncCheckpointer.manifest` keeps in memory (the most recent ones)."""


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

    ``local_tier`` (a store or a path on node-local disk) puts a node-local tier in front of
    ``store`` (:mod:`tlreg.ckpt.tiers`): saves are written there first (``PendingSave.local``)
    and, unless saved with ``persist=False``, drained to ``store`` in the background under
    ``drain_bytes_per_s`` (``PendingSave.committed``); loads read the nearest tier that holds
    each object. With several ranks, each rank drains the objects it wrote, and rank 0 writes
    the manifest to ``store`` once every rank has drained.
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
        local_tier: str | Store | None = None,
        drain_bytes_per_s: float | None = None,
    ) -> None:
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', not {writer!r}")
        if max_inflight_bytes is not None and max_inflight_bytes <= 0:
            raise ValueError("max_inflight_bytes must be positive (or None for no bound)")
        if io_threads < 1:
            raise ValueError("io_threads must be at least 1")
        self.shared: Store = open_store(store)
        self._owns_store = not isinstance(store, Store)  # opened from a URL: closed with us
        self.local: Store | None = None
        self._owns_local = False
        self._drainer: Drainer | None = None
        self.store: Store = self.shared
        if local_tier is not None:
            self.local = open_store(local_tier)
            self._owns_local = not isinstance(local_tier, Store)
            self.store = TieredStore(self.local, self.shared)
            self._drainer = Drainer(self.local, self.shared, bytes_per_s=drain_bytes_per_s)
        self.lazy = lazy
        self.max_inflight_bytes = max_inflight_bytes
        self.skip_unchanged = skip_unchanged
        self._collective: Collective | None = None
        if process_group is not None:
            from tlreg.ckpt.collective import Collective

            collective = Collective(process_group, timeout=collective_timeout)
            if collective.world > 1:
                self._collective = collective
        # Drains exchange on a group of their own, in save order, from the drain thread.
        self._drain_collective: Collective | None = None
        if self._collective is not None and self._drainer is not None:
            from tlreg.ckpt.collective import Collective

            assert process_group is not None
            self._drain_collective = Collective(process_group, timeout=collective_timeout)
        self._drain_pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-drain")
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
        self._hooks: list[tuple[weakref.ref[torch.optim.Optimizer], Any]] = []
        self._frozen = FrozenSkip()
        self._index = DedupIndex()
        self._persister = Persister(
            self.store, self._stager, self._io_pool, self._writer, self._index
        )
        self._committer = Committer(self.store, self._collective)
        self._restorer = Restorer(self.store, self._io_pool, LayoutCache())
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._manifests_lock = threading.Lock()
        self._newest: str | None = None  # the newest committed save's manifest id
        self.last_load_tiers: dict[str, int] = {}
        """Where the last :meth:`load` found its objects, in object bytes: ``local`` (this
        node's tier), ``peer`` (sent by another rank from its tier) and ``shared`` (the shared
        store). Whole objects are counted, as planned before reading."""
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
        persist: bool = True,
    ) -> PendingSave:
        """Start saving ``state``; returns once it is staged (eager) or at once (lazy).

        ``state`` is nested dicts/lists/tuples of tensors, :class:`~tlreg.ckpt.Shard` objects,
        DTensors and plain values (see :func:`flatten_state`); anything else raises
        ``TypeError`` naming its path, before anything is written. ``metadata`` is JSON
        stored in the manifest as it is. With several ranks this is collective: rank 0's
        ``step``, ``metadata`` and non-tensor values are the ones recorded.

        With a local tier, ``persist=False`` makes a local-only save (never drained; every
        rank must pass the same value); without one, ``persist`` is ignored.
        """
        start = time.perf_counter()
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new AsyncCheckpointer to save")
        plan = plan_save(
            state,
            step=step,
            metadata=metadata,
            rank=self.rank,
            world=self.world,
            frozen=self._frozen if self.skip_unchanged else None,
        )
        # (marked here: copies on a side stream follow the work queued so far on the caller's)
        mark = Stager.mark([item.tensor for item in plan.staged if item.tensor is not None])
        if self._drainer is None:
            pending = PendingSave(Future(), Future(), plan.stats)
        else:
            tier: Literal["local", "shared"] = "shared" if persist else "local"
            pending = PendingSave(Future(), Future(), plan.stats, local=Future(), tier=tier)
            pending.local.set_running_or_notify_cancel()
        self._reserve(plan.nbytes)
        pending.staged.set_running_or_notify_cancel()
        pending.committed.set_running_or_notify_cancel()
        with self._cond:
            self._pending = [p for p in self._pending if not p.done()]
            self._pending.append(pending)
            self._latest_staged = pending.staged
        staged: Future[torch.Tensor | None]
        if self.lazy:
            staged = self._stage_pool.submit(self._stage, plan, mark, pending)
        else:
            staged = Future()
            staged.set_result(self._stage(plan, mark, pending))
        self._persist_pool.submit(self._persist, plan, pending, staged, start)
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

    def _stage(
        self, plan: SavePlan, mark: Event | None, pending: PendingSave
    ) -> torch.Tensor | None:
        """Copy the planned tensors into an arena; the arena, or None when the copy failed
        (its error completes ``pending.staged``)."""
        start = time.perf_counter()
        staged = plan.staged
        arena = None
        try:
            tensors = [item.tensor for item in staged if item.tensor is not None]
            arena = self._stager.acquire(plan.nbytes, pinned=mark is not None)
            self._stager.copy(tensors, [item.offset for item in staged], arena, mark)
        except BaseException as e:
            pending.staged.set_exception(e)
        else:
            pending.stats.stage_s = time.perf_counter() - start
            pending.staged.set_result(None)
        finally:
            for item in staged:  # the caller's tensors are not needed past this point
                item.tensor = None
        return arena

    def _persist(
        self,
        plan: SavePlan,
        pending: PendingSave,
        staged: Future[torch.Tensor | None],
        begun: float,
    ) -> None:
        """Persist and commit one save (on the persist thread, after the previous save)."""
        start = time.perf_counter()
        arena = staged.result()
        error = pending.staged.exception()
        part = done = None
        try:
            try:
                if error is None and arena is not None:
                    part = self._persister.write(plan, arena)
            except BaseException as e:
                error = e
            try:
                done = self._committer.commit(plan, part, error, pending.stats)
                error = None
                if part is not None:
                    self._frozen.remember(plan, part.stored)
                self._index.committed(done.manifest, part)
                if done.manifest is not None:
                    self._cache(done.manifest)
            except BaseException as e:  # (the save fails: its manifest stays an orphan for gc)
                error, done = e, None
        finally:
            if arena is not None:
                self._stager.release(arena)
            plan.release()
            self._unreserve(plan.nbytes)
        pending.stats.persist_s = time.perf_counter() - start
        if done is None:
            pending._finish(None, error)
            return
        self._newest = done.manifest_id
        if self.local is not None and self._collective is not None and part is not None:
            try:  # what keeps this rank's share when its tier is pruned (no manifest here)
                write_share(self.local, done.manifest_id, self._collective.rank, part.objects)
            except Exception as e:  # (the save stands; only a later prune may drop the share)
                warnings.warn(
                    f"could not record the share of checkpoint {done.manifest_id} on the local "
                    f"tier {self.local.url}: {e}; a prune of the tier will not keep it",
                    stacklevel=1,
                )
        fetch: Callable[[str], Manifest] = functools.partial(read_manifest, self.store)
        if self._drainer is not None:  # (other ranks: the manifest is on rank 0's tier)
            fetch = functools.partial(self._fetch_drained, pending)
        if self._drainer is None or pending.tier == "local":
            pending.stats.local_s = time.perf_counter() - begun
            pending._finish(done.manifest_id, None, done.manifest, fetch)
            return
        pending.stats.local_s = time.perf_counter() - begun
        pending._finish_local(done.manifest_id, done.manifest, fetch)
        objects = list(part.objects) if part is not None else []
        self._drain_pool.submit(self._drain, pending, done.manifest_id, objects)

    def _fetch_drained(self, pending: PendingSave, manifest_id: str) -> Manifest:
        """A save's manifest on a rank that did not write it, with a local tier: read from
        the shared store once the save is there (it is on rank 0's tier until then)."""
        if pending.tier == "local":
            raise CheckpointError(
                f"checkpoint {manifest_id} is a local-only save: its manifest is on rank 0's "
                "local tier only; read it on rank 0, or load it with AsyncCheckpointer.load "
                "on every rank"
            )
        pending.committed.result()  # (re-raises a failed drain: the save stayed local)
        return read_manifest(self.shared, manifest_id)

    def _drain(self, pending: PendingSave, manifest_id: str, objects: list[str]) -> None:
        """Copy this rank's objects of a local-safe save to the shared store; then, once every
        rank has (an exchange on the drain group, in save order), rank 0 copies the manifest.
        Any failure leaves the checkpoint on the local tier and fails ``committed``."""
        assert self._drainer is not None
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            stats = self._drainer.drain(objects)
            pending.stats.drained_bytes = stats.bytes
        except BaseException as e:
            error = e
        try:
            error = self._agree_drained(error, pending, manifest_id)
        except BaseException as e:
            error = error or e
        pending.stats.drain_s = time.perf_counter() - start
        if error is None:
            pending._finish(manifest_id, None)
            return
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        failure = CheckpointError(
            f"checkpoint {manifest_id} stayed on the local tier ({self.local!r}): its drain to "
            f"{self.shared.url} failed: {why}"
        )
        failure.__cause__ = error
        pending._finish(None, failure)

    def _agree_drained(
        self, error: BaseException | None, pending: PendingSave, manifest_id: str
    ) -> BaseException | None:
        """Rank 0 copies the manifest once every rank has drained its objects, then tells
        the others: None when the checkpoint is shared, else an error (on every rank). Alone,
        the same without the exchange."""
        assert self._drainer is not None
        collective = self._drain_collective
        if collective is None:
            if error is None:
                pending.stats.drained_bytes += self._drainer.drain([], manifest_id).bytes
            return error
        mine = {"rank": collective.rank, "error": None if error is None else str(error)}
        gathered = collective.gather(json.dumps(mine).encode())
        if gathered is not None:
            failed = [d for d in map(json.loads, gathered) if d["error"] is not None]
            verdict = "; ".join(f"rank {d['rank']}: {d['error']}" for d in failed) or None
            if verdict is None:
                try:  # the manifest last, before anyone hears "shared"
                    pending.stats.drained_bytes += self._drainer.drain([], manifest_id).bytes
                except BaseException as e:
                    error, verdict = e, f"rank 0 could not write the manifest: {e}"
            raw = collective.broadcast(json.dumps(verdict).encode())
        else:
            raw = collective.broadcast(None)
        verdict = json.loads(raw)
        if error is not None:
            return error
        if verdict is None:
            return None
        return CheckpointError(f"another rank's drain failed: {verdict}")

    # -- load ---------------------------------------------------------------------------

    def _cache(self, manifest: Manifest) -> None:
        with self._manifests_lock:
            self._manifests[manifest.id] = manifest
            self._manifests.move_to_end(manifest.id)
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)

    def manifest(self, manifest_id: str) -> Manifest:
        """The manifest ``manifest_id`` (see :func:`read_manifest` for the errors).

        The last few are kept in memory; :meth:`PendingSave.manifest` gives a save's own.
        """
        with self._manifests_lock:
            manifest = self._manifests.get(manifest_id)
        if manifest is None:
            manifest = read_manifest(self.store, manifest_id)
            self._cache(manifest)
        return manifest

    def remember(self, manifest_id: str) -> None:
        """Seed the dedup index with every tensor of ``manifest_id``, without reading them.

        Later saves then skip the tensors that checkpoint already stores, e.g. the frozen
        backbone of the checkpoint a branch starts from.
        """
        self._index.seed_manifest(self.manifest(manifest_id))

    def load(
        self,
        manifest_id: str,
        *,
        prefix: str | None = None,
        shards: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        into: Mapping[str, Any] | None = None,
        on_bytes: Callable[[int], None] | None = None,
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
        which the result then holds; no new memory is allocated for it (see
        docs/performance.md, "Restore in place"). Other
        tensors, and shards, load into new tensors. The filled tensors' version counters
        are bumped, so a later save copies them again. If the load raises, the tensors of
        ``into`` may hold part of the checkpoint: load again, from this or another one.

        ``on_bytes(n)`` is called from the I/O threads as each read of ``n`` tensor bytes
        completes (a progress bar's update; a save's live count is ``SaveStats.bytes_done``).

        With a local tier, each object is read from the nearest tier that holds it, and
        :attr:`last_load_tiers` says how many object bytes came from where. With several
        ranks and a local tier the load is collective (call it on every rank, in the same
        order, with the same ``prefix``): ranks send each other the objects of their local
        shares first (:mod:`tlreg.ckpt.peer`). A local copy that fails its hash check is read
        again from the shared store.
        """
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new AsyncCheckpointer to load")
        if self.local is not None and self._collective is not None:
            # on the persist thread: the private group's exchanges stay in one order
            manifest = self._persist_pool.submit(
                self._share, self._collective, self.local, manifest_id, prefix
            ).result()
        else:
            manifest = self.manifest(manifest_id)
            needed = objects_under(manifest, prefix)
            if self.local is not None:
                self.last_load_tiers = tiers_of(self.local, manifest, needed)
            else:
                self.last_load_tiers = {"shared": sum(manifest.objects[d] for d in needed)}
        try:
            state, entries = self._restorer.load(
                manifest, prefix=prefix, shards=shards, into=into, on_bytes=on_bytes
            )
        except CorruptCheckpoint:
            if self.local is None:
                raise
            # a damaged local copy: the shared store's may be whole (else its error stands)
            shared = Restorer(self.shared, self._io_pool, LayoutCache())
            state, entries = shared.load(
                manifest, prefix=prefix, shards=shards, into=into, on_bytes=on_bytes
            )
            self.last_load_tiers = {"shared": sum(manifest.objects.values())}
        self._index.seed(manifest.objects, entries)
        return state

    def _share(
        self, collective: Collective, local: Store, manifest_id: str, prefix: str | None
    ) -> Manifest:
        """The collective part of a load through local tiers (:mod:`tlreg.ckpt.peer`): rank
        0's manifest on every rank, and every rank's tier made whole from its peers'."""
        with self._manifests_lock:
            cached = self._manifests.get(manifest_id)
        manifest = broadcast_manifest(collective, self.store, manifest_id, cached)
        self._cache(manifest)
        needed = objects_under(manifest, prefix)
        self.last_load_tiers = share_objects(collective, local, self.shared, manifest, needed)
        return manifest

    # -- lifecycle ----------------------------------------------------------------------

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` wait until the latest save is staged.

        Needed with ``lazy=True``: the step mutates the parameters in place, so it must not
        run while they are being copied. When the copy is already done it costs nothing.
        The hook is removed by :meth:`close`; attaching the same optimizer again is harmless
        (it keeps one hook).
        """

        if any(ref() is optimizer for ref, _ in self._hooks):
            return  # attached already: one hook is enough

        def wait_for_staging(*_: Any) -> None:
            staged = self._latest_staged
            if staged is not None and not staged.done():
                wait([staged])  # a failed copy surfaces from result(), not from step()

        hook = optimizer.register_step_pre_hook(wait_for_staging)
        self._hooks.append((weakref.ref(optimizer), hook))

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
        self._frozen.attach(module)

    def prune_local(self, keep: Iterable[str]) -> PruneStats:
        """Delete from the local tier every checkpoint not in ``keep``, and the objects only
        they use; the shared store is not touched.

        Waits until the saves in flight are local-safe, and keeps them and the newest save
        (later saves deduplicate against it). A later save never points at a removed object:
        the dedup index checks that an object still exists before reusing it.
        """
        if self.local is None:
            raise CheckpointError(f"{self!r} has no local tier to prune")
        with self._cond:
            pending = list(self._pending)
        wait([p.local for p in pending])
        kept = set(keep)
        kept.update(p.local.result() for p in pending if p.local.exception() is None)
        if self._newest is not None:
            kept.add(self._newest)
        return prune_local(self.local, kept)

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
        for _, hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._stage_pool.shutdown()
        self._persist_pool.shutdown()
        self._drain_pool.shutdown()
        self._io_pool.shutdown()
        if self._writer is not None:
            self._writer.close()
        self._stager.close()
        if self._collective is not None:
            self._collective.close()
        if self._drain_collective is not None:
            self._drain_collective.close()
        if self._owns_store:
            self.shared.close()
        if self.local is not None and self._owns_local:
            self.local.close()
