"""Ray Train integration: the checkpointer glue, the train loop, tasks, weights import/export."""

from tlreg.training.checkpointer import Checkpointer, RestoreReport
from tlreg.training.config import Settings, load_settings, write_settings
from tlreg.training.errors import (
    CheckpointMismatch,
    ConfigError,
    RunFailed,
    TaskNotFound,
    TrainingError,
    WeightsFormatError,
)
from tlreg.training.loop import TrainConfig, TrainSummary, train
from tlreg.training.signature import best_ancestor_for, signature
from tlreg.training.task import Task, load_task
from tlreg.training.weights import export_weights, import_weights, read_weights

__all__ = [
    "CheckpointMismatch",
    "Checkpointer",
    "ConfigError",
    "RestoreReport",
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
