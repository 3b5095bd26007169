"""The glue users touch: an async checkpoint engine bound to one registry branch.

This is the only place where a checkpoint written by ``tlreg.ckpt`` becomes a commit in
``tlreg.registry``: objects, then the manifest (the engine), then one registry transaction
that moves the branch head with a compare-and-swap (here). A save that fails anywhere
before that transaction never becomes visible.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Literal

import torch
from torch import nn

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, PendingSave
from tlreg.ckpt.tiers import expand_tier, node_id
from tlreg.registry import BranchExists, BranchNotFound, CheckpointRecord, Registry
from tlreg.registry.leases import LeaseKeeper
from tlreg.storage_backends import Store
from tlreg.storage_backends.credentials import without_password
from tlreg.training.config import (
    absolute_store_url,
    check_home_store,
    load_settings,
    same_store,
)
from tlreg.training.errors import CheckpointMismatch, ConfigError
from tlreg.training.freeze import matches_any
from tlreg.training.signature import common_prefix, prefix_tensor_names, signature

_STATEFUL_KEYS = ("model", "optimizer", "scheduler", "extra")


@dataclass(slots=True)
class RestoreReport:
    """What :meth:`Checkpointer.restore` did."""

    checkpoint: CheckpointRecord | None = None
    """The checkpoint that was read, or None for an empty branch."""
    resumed: bool = False
    """True when the checkpoint belongs to this branch: model, optimizer, scheduler, extra and
    RNG were all restored and training continues from its step. False when the branch
    starts from an ancestor on another branch: only matching model tensors transfer."""
    transferred: list[str] = field(default_factory=list)
    """Model tensors loaded from the checkpoint."""
    skipped: list[str] = field(default_factory=list)
    """Model tensors left as initialised (reset globs, missing or differently shaped)."""
    matched_layers: int | None = None
    """Layers whose structure matches the checkpoint's architecture signature (transfer from a
    checkpoint that recorded one); only their tensors are candidates for transfer."""
    tiers: dict[str, int] = field(default_factory=dict)
    """With a local tier: bytes read from each tier ("local", "peer", "shared")."""

    @property
    def tier(self) -> str | None:
        """Where the restore read from with a local tier: "local" (this node's tier or a
        peer's), "shared" (the store) or "local+shared"; None without a local tier."""
        if not self.tiers:
            return None
        near = self.tiers.get("local", 0) + self.tiers.get("peer", 0)
        far = self.tiers.get("shared", 0)
        if far and near:
            return "local+shared"
        return "shared" if far else "local"


def state_of(stateful: Mapping[str, Any]) -> dict[str, Any]:
    """The plain state (tensors and JSON values) of ``model=``, ``optimizer=``, ... objects."""
    unknown = set(stateful) - set(_STATEFUL_KEYS)
    if unknown:
        raise TypeError(
            f"unknown stateful names {sorted(unknown)}: use {', '.join(_STATEFUL_KEYS)}"
        )
    state: dict[str, Any] = {}
    for key, obj in stateful.items():
        if obj is None:
            continue
        if key == "extra":
            state[key] = dict(obj)
        else:
            state[key] = _unwrap(obj).state_dict()
    state["rng"] = {"torch": torch.get_rng_state()}
    return state


def _rank(process_group: Any) -> int:
    if process_group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(process_group)


def _unwrap(module: Any) -> Any:
    # DDP/FSDP-style wrappers keep the real module in .module; its keys have no prefix.
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class Checkpointer:
    """Save and restore training state on a registry branch.

    ``save`` returns at once with a :class:`~tlreg.ckpt.PendingSave`: ``staged`` when the
    state has been copied (the optimizer may step), ``committed`` (the checkpoint id) when
    the checkpoint is durable in the store *and* is the branch head in the registry.
    Commits happen in save order on one background thread; a failed save is reported by
    ``pending.result()`` and leaves the branch unchanged.

    With ``process_group`` (data-parallel training) every rank constructs the checkpointer
    and calls ``save`` in the same order; each rank writes a byte-balanced share of the
    state, and rank 0 writes the manifest and makes the registry commit. On other ranks
    ``committed`` means durable in the store (the same id), not yet the branch head.

    With ``lazy=True`` the copy runs after ``save`` returns; an ``optimizer=`` passed to
    ``save`` then waits for it in its next ``step()``, so the checkpoint holds the state as it
    was at ``save``. A store given as a URL and the registry of :meth:`for_branch` are opened
    here and closed by :meth:`close` (or the ``with`` block); objects passed in stay the
    caller's.
    """

    def __init__(
        self,
        branch: str,
        *,
        registry: Registry,
        store: str | Store,
        lazy: bool = False,
        max_inflight_bytes: int | None = None,
        run_id: int | None = None,
        process_group: Any = None,
        record_run: bool = False,
        run_config: Mapping[str, Any] | None = None,
        local_tier: str | Store | None = None,
        persist_every: int | None = None,
        local_keep: int = 2,
        drain_bytes_per_s: float | None = None,
    ) -> None:
        self.registry = registry
        self._owns_registry = False
        self._closed = False
        self._run_status: tuple[str, str | None] | None = None
        self._keeper: LeaseKeeper | None = None
        self._pending: list[tuple[int, PendingSave]] = []
        self._started = time.monotonic()
        found = registry.get_branch(branch)
        self.branch = found.name
        self.rank = _rank(process_group)
        if record_run and run_id is None and self.rank == 0:
            # rank 0 records the run and holds the branch's lease: a second writer (another
            # script, a `tlreg train`) is refused here, before any state is saved
            config = {
                "source": "python",
                "argv": [without_password(a) for a in sys.argv],  # no URL's password stored
                "host": socket.gethostname(),
                "pid": os.getpid(),
                **dict(run_config or {}),
            }
            run, lease = registry.start_leased_run(self.branch, config)
            run_id = run.id
            self._keeper = LeaseKeeper(registry, lease).start()
        if local_keep < 1:
            raise ValueError(f"local_keep must be >= 1, got {local_keep}")
        if persist_every is not None and persist_every < 1:
            raise ValueError(f"persist_every must be >= 1, got {persist_every}")
        # (a script that never imported Ray runs on no Ray node: no Ray import for it)
        self.node = node_id() if "ray" in sys.modules else socket.gethostname()
        """This rank's node (the Ray node id inside Ray, else the host name)."""
        self.local_tier = (
            expand_tier(local_tier, self.node) if isinstance(local_tier, str) else local_tier
        )
        """This rank's node-local tier (``{node}`` expanded), or None."""
        self.persist_every = persist_every if self.local_tier is not None else None
        self.local_keep = local_keep
        self.nodes = _gather_nodes(self.node, process_group)
        self._tier_saves: list[tuple[bool, PendingSave]] = []
        """The node of each rank, by rank (every rank learns all of them)."""
        # a URL is opened (and later closed) by the engine; a Store object stays the caller's
        try:
            tiers: dict[str, Any] = {}
            if self.local_tier is not None:
                tiers = {"local_tier": self.local_tier, "drain_bytes_per_s": drain_bytes_per_s}
            self.engine = AsyncCheckpointer(
                store,
                lazy=lazy,
                max_inflight_bytes=max_inflight_bytes,
                process_group=process_group,
                **tiers,
            )
        except BaseException as e:
            self._end_run("failed", f"{type(e).__name__}: {e}")
            raise
        self.run_id = run_id
        """The Run row checkpoints and :meth:`log_metrics` are recorded under (None: none)."""
        self._expected_head = found.head
        self._parent = found.head
        """The checkpoint the next commit continues from (the head, unless a restore went
        back behind it)."""
        self._commits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlreg-commit")
        # marks drained saves shared, in save order, without holding up the next local commit
        self._shares = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlreg-shared")
        self._lock = threading.Lock()
        self.last_restore = RestoreReport()
        """What the latest :meth:`restore` did."""
        _flush_at_exit(self)

    @classmethod
    def for_branch(
        cls,
        branch: str,
        *,
        create: bool = False,
        task: str | None = None,
        from_: str | None = None,
        home: str | PathLike[str] | None = None,
        registry_url: str | None = None,
        store_url: str | None = None,
        lazy: bool = False,
        record_run: bool = True,
        **kwargs: Any,
    ) -> Checkpointer:
        """A checkpointer for ``branch`` with the registry and store from tlreg's settings.

        ``create=True`` creates a missing branch (from ``from_``, a branch, tag or checkpoint
        id, else as an empty root; ``task`` is recorded for ``tlreg train``), as ``tlreg branch
        NAME [FROM]`` does; an existing branch is used as it is. Without it a missing branch
        raises BranchNotFound saying how to create it. Every rank of a process group may pass
        ``create=True``: one creates the branch, the others use it.

        ``home``, ``registry_url`` and ``store_url`` override tlreg's settings (flags > environment
        > ``tlreg.toml``), e.g. to hand Ray workers the driver's locations.

        ``record_run`` (default): rank 0 records a Run row (``tlreg runs``) and holds the
        branch's lease until :meth:`close`, so a second writer (a script or ``tlreg train``)
        is refused (BranchLeased, naming this run); the run ends ``succeeded``, ``failed``
        (a save failed, or the ``with`` block raised) or ``stopped`` (KeyboardInterrupt).
        """
        settings = load_settings(home=home, registry_url=registry_url, store_url=store_url)
        registry = Registry(settings.registry_url)
        try:
            _check_store(registry, settings.store_url)
            try:
                registry.get_branch(branch)
            except BranchNotFound:
                if not create:
                    raise BranchNotFound(
                        f"branch {branch!r} does not exist: create it with "
                        f"Checkpointer.for_branch({branch!r}, create=True) (optionally "
                        f"task=..., from_=...), or with 'tlreg branch {branch}'"
                    ) from None
                try:
                    registry.create_branch(branch, from_ref=from_, task=task)
                except BranchExists:
                    pass  # another rank (or process) created it first: use it
            config = {"task": task} if task else {}
            ckpt = cls(
                branch,
                registry=registry,
                store=settings.store_url,
                lazy=lazy,
                record_run=record_run,
                run_config=config,
                **kwargs,
            )
        except BaseException:
            registry.close()
            raise
        ckpt._owns_registry = True
        return ckpt

    @property
    def head(self) -> CheckpointRecord | None:
        """The branch head as last committed or restored by this checkpointer."""
        return self.registry.get(self._expected_head) if self._expected_head else None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step`` wait until the latest save is staged (lazy mode)."""
        self.engine.attach_optimizer(optimizer)

    def save(
        self,
        step: int,
        *,
        metrics: Mapping[str, float] | None = None,
        persist: bool | None = None,
        **stateful: Any,
    ) -> PendingSave:
        """Checkpoint ``model=``, ``optimizer=``, ``scheduler=`` and ``extra=`` at ``step``.

        With a local tier, the checkpoint is committed to the registry as ``local`` (with the
        nodes holding its shares) once every rank's share and the manifest are durable on the
        node-local tiers (``pending.local``), then marked ``shared`` once drained to the store
        (``pending.committed``) when ``persist`` (default: every ``persist_every``-th step,
        or every step without ``persist_every``); a local-only save's ``committed`` completes
        with ``local``. Without a local tier, ``persist`` is ignored.
        """
        if self._closed:
            raise RuntimeError(f"Checkpointer for branch {self.branch!r} is closed")
        if self._keeper is not None and self._keeper.lost.is_set():
            raise self._keeper.error or RuntimeError("the branch lease was lost")
        state = state_of(stateful)
        optimizer = stateful.get("optimizer")
        if self.engine.lazy and isinstance(optimizer, torch.optim.Optimizer):
            # its next step() waits for the copy: a lazy checkpoint holds the state at save()
            self.engine.attach_optimizer(optimizer)
        model = stateful.get("model")
        arch = None
        if model is not None:
            # Lets the engine skip frozen, unchanged tensors without copying or hashing them.
            self.engine.attach_model(_unwrap(model))
            arch = signature(_unwrap(model))
        tiered = self.local_tier is not None
        if persist is None:
            persist = self.persist_every is None or step % self.persist_every == 0
        if tiered:
            self._maybe_prune_local()
            inner = self.engine.save(
                state, step=step, metadata={"branch": self.branch}, persist=persist
            )
            self._tier_saves.append((persist, inner))
        else:
            inner = self.engine.save(state, step=step, metadata={"branch": self.branch})
        if self.rank != 0:
            return inner  # rank 0 alone commits to the registry
        final_tier: Literal["local", "shared"] = "shared" if persist or not tiered else "local"
        local: Future[str] = Future()
        outer = PendingSave(
            staged=inner.staged,
            committed=Future(),
            stats=inner.stats,
            local=local if tiered else None,
            tier=final_tier,
        )
        outer.committed.set_running_or_notify_cancel()
        local.set_running_or_notify_cancel()
        metrics = dict(metrics or {})
        nodes = tuple(dict.fromkeys(self.nodes))  # each once, in rank order

        def commit() -> None:
            try:
                # what the save wrote, once local-safe (without a tier: committed): no re-read
                manifest = inner.manifest()
                manifest_id = inner.local.result()
                with self._lock:
                    record = self.registry.commit(
                        self.branch,
                        manifest_id,
                        step=step,
                        parents=[self._parent] if self._parent else [],
                        objects=manifest.objects,
                        metrics=metrics,
                        expected_head=self._expected_head,
                        logical_bytes=manifest.logical_bytes,
                        run_id=self.run_id,
                        signature=arch,
                        **({"tier": "local", "nodes": nodes} if tiered else {}),
                    )
                    self._expected_head = self._parent = record.id
            except BaseException as e:  # surfaced through pending.result()
                outer._finish(None, e)
                return
            if tiered and persist:
                outer._finish_local(record.id, manifest, None)
                self._shares.submit(share, record.id, manifest)
            else:
                outer._finish(record.id, None, manifest)

        def share(record_id: str, manifest: Any) -> None:
            try:
                inner.result()  # drained: every rank's objects, then the manifest, in the store
                self.registry.mark_shared(record_id)
            except BaseException as e:  # the checkpoint stays local (and restorable there)
                outer._finish(None, e)
                return
            outer._finish(record_id, None, manifest)

        self._commits.submit(commit)
        with self._lock:
            # a failed save stays listed: close() reports it and fails the run
            self._pending = [
                (st, p)
                for st, p in self._pending
                if not p.committed.done() or p.committed.exception() is not None
            ]
            self._pending.append((step, outer))
        return outer

    def _load_tiers(self) -> dict[str, int]:
        if self.local_tier is None:
            return {}
        return dict(getattr(self.engine, "last_load_tiers", None) or {})

    def _maybe_prune_local(self) -> None:
        """Once a save has been drained, drop from this node's tier the local-only
        checkpoints older than it beyond the last ``local_keep`` (and every object no kept one
        references). Run before the next save, only while none of this rank's saves is on its
        way to the tier: a prune never races a write, and the saves from the newest shared
        one on (the ones a drain may still read) are always kept."""
        saves = self._tier_saves
        shared = [i for i, (persist, p) in enumerate(saves) if persist and p.committed.done()]
        if not shared or not all(p.local.done() for _, p in saves):
            return
        newest = shared[-1]
        if saves[newest][1].committed.exception() is not None:
            return
        kept = saves[max(0, newest - self.local_keep) :]
        keep = {p.local.result() for _, p in kept if p.local.exception() is None}
        locals_ = self.registry.local_checkpoints(self.branch)
        keep.update(c.manifest for c in locals_[: self.local_keep])
        self._tier_saves = saves[newest:]
        try:
            self.engine.prune_local(keep)
        except Exception as e:  # a tier fuller than it need be is not a failed save
            print(f"tlreg: pruning the local tier {self.local_tier} failed: {e}", file=sys.stderr)

    def log_metrics(self, step: int, **values: float) -> None:
        """Record metric values at ``step`` in this checkpointer's run (``tlreg runs``, the
        metric curves of ``tlreg compare``), e.g. ``ckpt.log_metrics(10, loss=0.3, acc=0.9)``.

        Synchronous (one registry transaction). A no-op on ranks other than 0. Raises
        RuntimeError when there is no run (a checkpointer made with ``record_run=False``
        and no ``run_id``), ValueError for a bad name or value.
        """
        if self.rank != 0:
            return
        if self.run_id is None:
            raise RuntimeError(
                f"Checkpointer for branch {self.branch!r} records no run: make it with "
                "Checkpointer.for_branch(...) (record_run=True) or pass run_id="
            )
        self.registry.log_metrics(
            self.run_id, step, values, elapsed_s=time.monotonic() - self._started
        )

    def restore(
        self,
        *,
        checkpoint: str | None = None,
        reset: Sequence[str] = (),
        **stateful: Any,
    ) -> CheckpointRecord | None:
        """Load the branch head (or ``checkpoint``) into ``model=``, ``optimizer=``, ...

        Returns the checkpoint read, or None on an empty branch. See :attr:`last_restore`
        for whether training resumes or starts from a transferred ancestor. Resuming, the
        model's tensors are read in place (``AsyncCheckpointer.load(into=...)``): if this
        raises, the model may hold part of the checkpoint.
        """
        self.last_restore = self._restore(checkpoint=checkpoint, reset=reset, stateful=stateful)
        return self.last_restore.checkpoint

    def _restore(
        self, *, checkpoint: str | None, reset: Sequence[str], stateful: Mapping[str, Any]
    ) -> RestoreReport:
        branch_head = self.registry.get_branch(self.branch).head  # the branch, read once
        head = checkpoint or branch_head
        record = (
            self.registry.resolve_live(head, f"restore it on branch {self.branch!r}")
            if head is not None
            else None
        )
        self._expected_head = branch_head  # (only once the ref resolved)
        self._parent = branch_head
        if record is None:
            return RestoreReport()
        resumed = record.branch == self.branch
        if resumed and self.local_tier is not None and record.id != branch_head:
            # resuming behind the head (its newer checkpoints were lost with their node): the
            # next commit continues from what was restored, and moves the head past the rest
            self._parent = record.id
        model = stateful.get("model")
        # resuming, the model's own tensors are read in place (no second copy of the model)
        into = {"model": _unwrap(model).state_dict()} if resumed and model is not None else None
        state = self.engine.load(record.manifest, prefix=None if resumed else "model", into=into)
        report = RestoreReport(checkpoint=record, resumed=resumed, tiers=self._load_tiers())
        if model is not None:
            allowed = None
            if not resumed and record.signature is not None:
                depth = common_prefix(record.signature, signature(_unwrap(model)))
                report.matched_layers = depth
                allowed = prefix_tensor_names(_unwrap(model), depth)
            _load_model(
                _unwrap(model),
                state.get("model", {}),
                reset=() if resumed else reset,
                allowed=allowed,
                report=report,
            )
            if resumed and report.skipped:
                raise CheckpointMismatch(
                    f"checkpoint {record.id[:12]} on branch {self.branch!r} "
                    "does not fit the model: "
                    f"{len(report.skipped)} tensors missing or of another shape "
                    f"(first: {report.skipped[0]!r}); train this model on a new branch instead"
                )
        if resumed:
            for key in ("optimizer", "scheduler"):
                obj = stateful.get(key)
                if obj is not None and key in state:
                    obj.load_state_dict(state[key])
            extra = stateful.get("extra")
            if extra is not None:
                extra.clear()
                extra.update(state.get("extra", {}))
            if "rng" in state:
                torch.set_rng_state(state["rng"]["torch"])
        return report

    def close(self, *, status: str | None = None, error: str | None = None) -> None:
        """Wait for pending saves and commits, then release the engine, the store it opened
        and the registry :meth:`for_branch` opened; idempotent.

        The run this checkpointer recorded ends ``status`` (default: ``failed`` when a save
        failed, else ``succeeded``) and its branch lease is released. Without ``status``, a
        failed save whose error no ``result()`` raised raises
        :class:`~tlreg.ckpt.CheckpointError` here once all that is done (so a ``with`` block
        that ends normally does not hide it); with ``status``, the caller is already
        reporting its own failure and nothing is raised.
        """
        if self._closed:
            return
        self._closed = True
        failed: list[tuple[int, BaseException]] = []
        unseen: list[int] = []
        report = status is None
        try:
            self.engine.close()
            self._commits.shutdown(wait=True)
            self._shares.shutdown(wait=True)
            failed = [
                (step, e) for step, p in self._pending if (e := p.committed.exception()) is not None
            ]
            unseen = [
                step
                for step, p in self._pending
                if p.committed.exception() is not None and not p.error_seen
            ]
        finally:
            if status is None:
                status = "failed" if failed else "succeeded"
            if error is None and failed:
                step, e = failed[0]
                error = (
                    f"{len(failed)} checkpoints failed (first at step {step}: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__})"
                )
            self._end_run(status, error)
            self._pending = []
            if self._owns_registry:
                self._owns_registry = False
                self.registry.close()
        if report and unseen:
            raise CheckpointError(
                f"branch {self.branch!r}: {error}; the run is marked failed "
                f"(unchecked failures at steps {_steps(unseen)})"
            )

    def _end_run(self, status: str, error: str | None) -> None:
        """Finish the run this checkpointer recorded and give its lease back (once)."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        try:
            keeper.stop(release=False)
            if self.run_id is not None:
                self.registry.finish_run(self.run_id, status=status, error=error)
        finally:
            if not keeper.lost.is_set():
                try:
                    self.registry.release_lease(keeper.lease)
                except Exception:  # an unreleased lease expires by itself
                    pass

    def _flush_at_exit(self) -> None:
        """Interpreter exit with this checkpointer still open: commit what is pending, loudly."""
        if self._closed:
            return
        pending = list(self._pending)
        waiting = [step for step, p in pending if not p.committed.done()]
        doing = (
            f"committing {len(waiting)} pending saves (steps {_steps(waiting)})"
            if waiting
            else "closing it"
        )
        print(
            f"tlreg: Checkpointer for branch {self.branch!r} was not closed at exit: {doing}; "
            "call close() or use a with block",
            file=sys.stderr,
            flush=True,
        )
        try:
            self.close()
        except BaseException as e:  # the interpreter is ending: say so, do not raise
            print(f"tlreg: closing branch {self.branch!r} at exit failed: {e}", file=sys.stderr)
        lost = [
            (step, err)
            for step, p in pending
            if p.committed.done() and (err := p.committed.exception()) is not None
        ]
        for step, err in lost:
            print(
                f"tlreg: WARNING: the checkpoint at step {step} of branch {self.branch!r} was "
                f"LOST at exit: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close(status="stopped", error="KeyboardInterrupt")
        else:
            self.close(status="failed", error=f"{exc_type.__name__}: {exc}")


def _gather_nodes(node: str, process_group: Any) -> tuple[str, ...]:
    """Every rank's node id, by rank: gathered as byte tensors (nothing pickled)."""
    if process_group is None:
        return (node,)
    import torch.distributed as dist

    raw = node.encode()[:255]
    mine = torch.zeros(256, dtype=torch.uint8)
    mine[0] = len(raw)
    mine[1 : 1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    return tuple(bytes(t[1 : 1 + int(t[0])].tolist()).decode() for t in gathered)


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps[:10]) + (", ..." if len(steps) > 10 else "")


def _check_store(registry: Registry, store_url: str) -> None:
    """Refuse a store other than the one the registry records (as every CLI command does);
    a registry that records none yet (a script made it) records this one, as ``tlreg init``
    does, so that later commands are held to it."""
    recorded = registry.get_meta("store_url")
    if recorded is None:
        check_home_store(store_url)
        registry.set_meta("store_url", without_password(absolute_store_url(store_url)))
        return
    if not same_store(recorded, store_url):
        raise ConfigError(
            f"registry records store {without_password(recorded)!r}, not "
            f"{without_password(store_url)!r}: unset TLREG_STORE_URL or use that store"
        )


_open: weakref.WeakSet[Checkpointer] = weakref.WeakSet()
_hook_lock = threading.Lock()
_hooked = False


def _flush_at_exit(ckpt: Checkpointer) -> None:
    """Register ``ckpt`` to be flushed when the interpreter exits.

    The hook runs in ``threading``'s exit hooks, before ``concurrent.futures`` shuts its
    worker threads down (plain ``atexit`` would run after, when no commit can run any more).
    """
    global _hooked
    _open.add(ckpt)
    with _hook_lock:
        if _hooked:
            return
        _hooked = True
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_flush_all)
                return
            except RuntimeError:  # already shutting down
                pass
        atexit.register(_flush_all)


def _flush_all() -> None:
    for ckpt in list(_open):
        ckpt._flush_at_exit()


def _load_model(
    model: nn.Module,
    tensors: Mapping[str, Any],
    *,
    reset: Sequence[str],
    allowed: set[str] | None,
    report: RestoreReport,
) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for name, target in own.items():
            source = tensors.get(name)
            if (
                isinstance(source, torch.Tensor)
                and source.shape == target.shape
                and source.dtype == target.dtype
                and not matches_any(name, reset)
                and (allowed is None or name in allowed)
            ):
                if not _same_memory(source, target):  # read in place: already there
                    target.copy_(source)
                report.transferred.append(name)
            else:
                report.skipped.append(name)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
        and a.shape == b.shape
    )
