"""The freeze policy: which parameters train, and at which learning rate.

Feature extraction freezes parameters by glob (``--freeze``); fine-tuning trains everything,
the backbone optionally at a smaller learning rate (``--backbone-lr-mult``). The backbone
is every trainable parameter outside the task's head, its ``reset`` globs: the tensors that
are re-initialised, not transferred, when a branch starts from another task's checkpoint.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn

from tlreg.training.config import TrainConfig
from tlreg.training.errors import ConfigError


def matches_any(name: str, globs: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch-style ``globs``."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def apply_freeze(model: nn.Module, globs: Sequence[str]) -> list[str]:
    """Stop the parameters matching ``globs`` from training (every other one trains);
    return the names of the frozen ones."""
    frozen = []
    for name, param in model.named_parameters():
        param.requires_grad_(not matches_any(name, globs))
        if not param.requires_grad:
            frozen.append(name)
    return frozen


def param_groups(
    model: nn.Module, config: TrainConfig, head: Sequence[str]
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: those matching the ``head`` globs at
    ``config.lr``, the backbone at ``config.lr * config.backbone_lr_mult``."""
    groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[matches_any(name, head)].append(param)
    if not groups[True] and not groups[False]:
        raise ConfigError(f"--freeze {list(config.freeze)} froze every parameter: nothing to train")
    out = [{"params": groups[True], "lr": config.lr}] if groups[True] else []
    if groups[False]:
        out.append({"params": groups[False], "lr": config.lr * config.backbone_lr_mult})
    return out
