"""What ``--task MODULE:ATTR`` names: a model factory, data, a loss and a metric."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from tlreg.training.errors import TaskNotFound


@runtime_checkable
class Task(Protocol):
    """A supervised learning task tlreg can train.

    Implementations are plain objects (see ``tlreg.training.examples.digits``). Everything
    must be deterministic given ``seed`` so that every Ray worker builds the same model and
    sees the same data split.
    """

    name: str
    """Short name recorded on the branch and in runs."""
    metric_name: str
    """Name of the validation metric, higher is better (e.g. ``val_accuracy``)."""
    reset: Sequence[str]
    """Globs of parameter names that are re-initialised when a branch starts from an
    ancestor trained on another task (typically the classification head)."""

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model."""
        ...

    def datasets(
        self,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((x_train, y_train), (x_val, y_val))`` as CPU tensors."""
        ...

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training loss of one batch."""
        ...

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> float:
        """Validation metric over the whole validation set (higher is better)."""
        ...


def load_task(spec: str) -> Task:
    """Import ``module:attr``; ``attr`` is a :class:`Task` or a zero-argument factory of one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskNotFound(
            f"task {spec!r} is not MODULE:ATTR, e.g. tlreg.training.examples.digits:upper"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskNotFound(f"task {spec!r}: cannot import module {module_name!r} ({e})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise TaskNotFound(
            f"task {spec!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
    task = obj if isinstance(obj, Task) else (obj() if callable(obj) else obj)
    if not isinstance(task, Task):
        raise TaskNotFound(
            f"task {spec!r} is a {type(task).__name__}, not a Task "
            "(needs name, metric_name, reset, build_model, datasets, loss, metric)"
        )
    return task
