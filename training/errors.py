"""Errors of the training layer (config, tasks, import/export, Ray runs)."""

from __future__ import annotations

from tlreg.storage_backends.errors import TlregError


class TrainingError(TlregError):
    """Base class; the message names the object and the next step."""


class TaskNotFound(TrainingError, LookupError):
    """``--task MODULE:ATTR`` does not name an importable task."""


class ConfigError(TrainingError, ValueError):
    """A bad setting: flag, environment variable or tlreg.toml entry."""


class WeightsFormatError(TrainingError, ValueError):
    """A weights file that cannot be imported (unknown format, truncated, not a state dict)."""


class RunFailed(TrainingError, RuntimeError):
    """A training run ended with an error; the registry's Run row holds the details."""


class RunStopped(RunFailed):
    """A training run was stopped from outside (SIGTERM: ``ray job stop``, a scheduler's
    time limit); its Run row says "stopped"."""


class CheckpointMismatch(TrainingError, ValueError):
    """A checkpoint's tensors do not fit the model it is restored into."""
