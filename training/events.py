"""Progress events of a training run: what rank 0 reports while it trains.

Rank 0's worker puts them on a Ray queue (the driver makes the two about starting Ray);
the driver takes them off, folds them into the run's
:class:`~tlreg.training.driver.TrainSummary` and hands them to ``train(on_event=...)``
(``tlreg train`` prints them). They cross that one process boundary pickled by Ray, between
the processes of one run; none is ever stored or read back from a store.

Consumers subclass :class:`ProgressListener` and override the kinds they need: the
dispatch on the kind of an event is written once, in :meth:`ProgressListener.on_event`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

ProgressFactory = Callable[..., AbstractContextManager[Any]]
"""``factory(desc, total=..., unit=...)`` -> a context manager whose value has
``update(n)``: how long library calls (gc, import, export) report progress;
``tlreg.cli.progress.progress`` is one."""


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass


def open_bar(
    progress: ProgressFactory | None, desc: str, total: int | None, unit: str = "B"
) -> AbstractContextManager[Any]:
    """``progress(desc, total=total, unit=unit)``, or a bar that shows nothing for None."""
    if progress is None:
        return nullcontext(_NoBar())
    return progress(desc, total=total, unit=unit)


@dataclass(frozen=True, slots=True)
class RayStarting:
    """The driver is starting (or joining) Ray; nothing is shown of it until it is up."""

    kind: ClassVar[str] = "ray_starting"
    joining: bool
    """True when joining a running cluster (``RAY_ADDRESS``), False for a local Ray."""


@dataclass(frozen=True, slots=True)
class RayStarted:
    """Ray is up; the worker group starts next (each worker then restores the branch)."""

    kind: ClassVar[str] = "ray_started"
    elapsed_s: float
    """Seconds it took to start or join Ray."""
    workers: int


@dataclass(frozen=True, slots=True)
class Restored:
    """The workers restored the branch: a resume, a transfer, or a start from scratch."""

    kind: ClassVar[str] = "restore"
    step: int
    """The step training starts after (0 unless resuming)."""
    checkpoint: str | None
    """The checkpoint read, or None on an empty branch."""
    resumed: bool
    """True for a resume of this branch, False for a transfer from an ancestor."""
    transferred: tuple[str, ...]
    """Model tensors loaded from the checkpoint."""
    skipped: tuple[str, ...]
    """Model tensors left as initialised."""
    frozen: tuple[str, ...]
    """Parameters that do not train."""
    matched_layers: int | None
    """Layers whose structure matched the checkpoint's (a transfer with a signature)."""
    tier: str | None = None
    """Where the bytes came from with a local tier: "local" (this node's tier or a peer's),
    "shared" (the store), "local+shared" (both); None without a local tier."""
    lost: tuple[str, ...] = ()
    """Checkpoints marked lost before the restore (local-only on a node that is gone)."""


@dataclass(frozen=True, slots=True)
class Evaluated:
    """Rank 0 evaluated the validation metric."""

    kind: ClassVar[str] = "eval"
    step: int
    loss: float
    """Training loss of this step's batch."""
    metric: float
    metric_name: str
    elapsed_s: float
    """Seconds since training (after the restore) started."""
    checkpoint: str | None
    """The newest committed checkpoint at this point."""


@dataclass(frozen=True, slots=True)
class Checkpointed:
    """A checkpoint was committed: durable and the branch head."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    id: str
    stall_ms: float
    """How long ``save`` held the training loop."""
    new_bytes: int
    """Bytes this checkpoint added to the store."""
    logical_bytes: int
    """Bytes of the state it holds."""


@dataclass(frozen=True, slots=True)
class CheckpointFailed:
    """A checkpoint failed; the branch head did not move."""

    kind: ClassVar[str] = "checkpoint_failed"
    step: int
    error: str


ProgressEvent = RayStarting | RayStarted | Restored | Evaluated | Checkpointed | CheckpointFailed


def event_json(event: ProgressEvent) -> dict[str, Any]:
    """A JSON-safe dict of ``event``, its kind under ``"type"``."""
    return {"type": event.kind, **dataclasses.asdict(event)}


class ProgressListener:
    """Receives a run's progress events: pass :meth:`on_event` as the callback and override
    the methods of the kinds you need (the others ignore their event)."""

    __slots__ = ()

    def on_event(self, event: ProgressEvent) -> None:
        """Hand ``event`` to the method for its kind."""
        if isinstance(event, RayStarting):
            self.ray_starting(event)
        elif isinstance(event, RayStarted):
            self.ray_started(event)
        elif isinstance(event, Restored):
            self.restored(event)
        elif isinstance(event, Evaluated):
            self.evaluated(event)
        elif isinstance(event, Checkpointed):
            self.checkpointed(event)
        elif isinstance(event, CheckpointFailed):
            self.checkpoint_failed(event)
        else:
            raise TypeError(f"not a progress event: {event!r}")

    def ray_starting(self, event: RayStarting) -> None:
        """The driver is starting or joining Ray."""

    def ray_started(self, event: RayStarted) -> None:
        """Ray is up; the workers start next."""

    def restored(self, event: Restored) -> None:
        """The workers restored the branch."""

    def evaluated(self, event: Evaluated) -> None:
        """Rank 0 evaluated the validation metric."""

    def checkpointed(self, event: Checkpointed) -> None:
        """A checkpoint was committed."""

    def checkpoint_failed(self, event: CheckpointFailed) -> None:
        """A checkpoint failed."""
