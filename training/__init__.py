"""Ray Train integration: the glue that turns engine checkpoints into registry commits.

Rooms:

- ``checkpointer``: :class:`Checkpointer`, an async checkpoint engine bound to one registry branch.
- ``config``: where the registry and store live (:class:`Settings`), one run's :class:`TrainConfig`.
- ``driver``: the ``tlreg train`` process: Ray, the ``TorchTrainer``, the Run row, signals.
- ``worker``: the per-rank train loop: restore, freeze, train, checkpoint.
- ``freeze``: the freeze policy: which parameters train, at which learning rate.
- ``events``: the typed progress events rank 0 sends the driver, and their one dispatch.
- ``jobs``: ``tlreg train`` as a Ray job: submit, follow, find the job we are in.
- ``task``: the :class:`Task` protocol that ``--task MODULE:ATTR`` names.
- ``signature``: architecture signatures, for transfer and ``best_ancestor_for``.
- ``weights``: weights in and out of the registry (``tlreg import`` / ``tlreg export``).
- ``gc``: garbage collection across the registry and the store.
- ``errors``: the training layer's errors.
- ``examples``: example tasks and the demo.
"""

from tlreg.training.checkpointer import Checkpointer, RestoreReport
from tlreg.training.config import Settings, TrainConfig, load_settings, write_settings
from tlreg.training.driver import TrainSummary, train
from tlreg.training.errors import (
    CheckpointMismatch,
    ConfigError,
    RunFailed,
    TaskNotFound,
    TrainingError,
    WeightsFormatError,
)
from tlreg.training.events import (
    Checkpointed,
    CheckpointFailed,
    Evaluated,
    ProgressEvent,
    ProgressListener,
    Restored,
)
from tlreg.training.signature import best_ancestor_for, signature
from tlreg.training.task import Task, load_task
from tlreg.training.weights import export_weights, import_weights, read_weights

__all__ = [
    "CheckpointFailed",
    "CheckpointMismatch",
    "Checkpointed",
    "Checkpointer",
    "ConfigError",
    "Evaluated",
    "ProgressEvent",
    "ProgressListener",
    "RestoreReport",
    "Restored",
    "RunFailed",
    "Settings",
    "Task",
    "TaskNotFound",
    "TrainConfig",
    "TrainSummary",
    "TrainingError",
    "WeightsFormatError",
    "best_ancestor_for",
    "export_weights",
    "import_weights",
    "load_settings",
    "load_task",
    "read_weights",
    "signature",
    "train",
    "write_settings",
]
