"""Pending saves: what ``AsyncCheckpointer.save`` returns, and what a save cost.

A :class:`PendingSave` has two completion points, as in torchsnapshot and torchtitan:
``staged`` (the caller may mutate the state again) and ``committed`` (objects and manifest
are durable); :meth:`PendingSave.manifest` gives the manifest the commit wrote. A save
through a node-local tier has a third point between them, ``local`` (durable on the node's
own disk), and ``committed`` then means durable in the save's final tier (``tier``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tlreg.ckpt.errors import CheckpointError

if TYPE_CHECKING:
    from tlreg.ckpt.manifest import Manifest


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
    bytes_done: int = 0
    """Bytes of this process's staged tensors stored so far (written, or found already
    stored): live while the save runs, for a progress bar; ``bytes_copied`` once committed."""
    local_s: float = 0.0
    """With a node-local tier: time from ``save()`` to local-safe (``PendingSave.local``)."""
    drain_s: float = 0.0
    """With a node-local tier: time this rank's drain to the shared store took."""
    drained_bytes: int = 0
    """With a node-local tier: bytes this rank copied to the shared store."""


class PendingSave:
    """A save in progress, with its two completion points.

    ``staged`` completes once the state has been copied (the caller may mutate it again);
    ``committed`` completes with the manifest id once objects and manifest are durable, or
    with the background error, which :meth:`result` re-raises with its original traceback.
    With several ranks, every rank's ``committed`` completes with the same manifest id once
    rank 0 has written the manifest, or fails on every rank when any rank failed.

    With a node-local tier, ``local`` completes with the manifest id once every rank's share
    and the manifest are durable on the local tiers (local-safe). ``tier`` is where the save
    ends: ``"shared"`` (``committed`` completes once every rank has drained its share and
    rank 0 has written the manifest to the shared store; if the drain fails, ``committed``
    fails and the checkpoint stays on the local tier) or ``"local"`` (a local-only save,
    ``committed`` completes with ``local``). Without a tier, ``local`` *is* ``committed``.
    """

    def __init__(
        self,
        staged: Future[None],
        committed: Future[str],
        stats: SaveStats | None = None,
        *,
        local: Future[str] | None = None,
        tier: Literal["local", "shared"] = "shared",
    ) -> None:
        self.staged = staged
        self.committed = committed
        self.local: Future[str] = local if local is not None else committed
        self.tier = tier
        self.stats = stats if stats is not None else SaveStats()
        self._manifest: Manifest | None = None
        self._fetch: Callable[[str], Manifest] | None = None
        self.error_seen = False
        """Whether :meth:`result` or :meth:`error` has handed the save's error to a caller
        (an owner that closes with a failure nobody saw must report it)."""

    def result(self, timeout: float | None = None) -> str:
        """Wait for the save to commit and return the manifest id (re-raises its error)."""
        try:
            return self.committed.result(timeout)
        except BaseException:
            if self.committed.done():
                self.error_seen = True
            raise

    def error(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the save to end and return its error (None once committed); like
        :meth:`result`, a returned error counts as seen by the caller."""
        error = self.committed.exception(timeout)
        if error is not None:
            self.error_seen = True
        return error

    def manifest(self, timeout: float | None = None) -> Manifest:
        """Wait for the save's manifest (committed; with a local tier, local-safe) and return
        it (re-raises its error).

        The committer's own copy, held here: no store read. On a rank other than 0 of a
        collective save, which did not write the manifest, it is read from the store once
        (with a local tier, only once the save is in the shared store: the manifest is on
        rank 0's tier until then).
        """
        try:
            manifest_id = self.local.result(timeout)  # the manifest exists from local-safe on
        except BaseException:
            if self.local.done():
                self.error_seen = True
            raise
        if self._manifest is None:
            if self._fetch is None:
                raise CheckpointError(
                    f"this PendingSave holds no manifest of checkpoint {manifest_id}; "
                    "read it with AsyncCheckpointer.manifest(id)"
                )
            self._manifest = self._fetch(manifest_id)
        return self._manifest

    def _finish(
        self,
        manifest_id: str | None,
        error: BaseException | None,
        manifest: Manifest | None = None,
        fetch: Callable[[str], Manifest] | None = None,
    ) -> None:
        """Complete ``committed``, and ``local`` if it is still open (with the manifest, or
        how to read it, set first)."""
        if error is not None:
            if not self.local.done():
                self.local.set_exception(error)
            if not self.committed.done():
                self.committed.set_exception(error)
            return
        assert manifest_id is not None
        if manifest is not None:
            self._manifest = manifest
        if fetch is not None:
            self._fetch = fetch
        if not self.local.done():
            self.local.set_result(manifest_id)
        if not self.committed.done():
            self.committed.set_result(manifest_id)

    def _finish_local(
        self,
        manifest_id: str,
        manifest: Manifest | None,
        fetch: Callable[[str], Manifest] | None,
    ) -> None:
        """Complete ``local``: the save is durable on the node-local tiers."""
        self._manifest, self._fetch = manifest, fetch
        self.local.set_result(manifest_id)

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
