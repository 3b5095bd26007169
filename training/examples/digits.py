"""Handwritten digits from scikit-learn's bundled ``load_digits`` (no download).

``lower`` classifies digits 0-4, ``upper`` digits 5-9. A model trained on ``lower`` is the
ancestor; ``upper`` branches from it: its ``features`` transfer, its ``head`` is re-initialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_VAL_FRACTION = 0.3
_SPLIT_SEED = 1234


class DigitsNet(nn.Module):
    """A small CNN: ``features`` (the transferable body) and ``head`` (task-specific).

    Convolutional features transfer between the two halves of the digits; a plain MLP's
    last hidden layer specialises to the ancestor's classes and transfers worse.
    """

    def __init__(self, num_classes: int = 5, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(slots=True)
class DigitsTask:
    """Classify a subset of the 8x8 digits (labels renumbered from 0)."""

    name: str
    classes: tuple[int, ...]
    metric_name: str = "val_accuracy"
    reset: tuple[str, ...] = ("head.*",)
    channels: int = 16
    _cache: dict[str, object] = field(default_factory=dict, repr=False)

    def build_model(self, seed: int) -> nn.Module:
        # docstring inherited
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            return DigitsNet(len(self.classes), self.channels)
        finally:
            torch.set_rng_state(generator_state)

    def datasets(
        self,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        # docstring inherited
        if "data" not in self._cache:
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            y = torch.tensor(digits.target, dtype=torch.int64)
            keep = torch.isin(y, torch.tensor(self.classes))
            x, y = x[keep], y[keep]
            remap = torch.full((10,), -1, dtype=torch.int64)
            remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            y = remap[y]
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(_SPLIT_SEED))
            n_val = int(len(x) * _VAL_FRACTION)
            val, train = order[:n_val], order[n_val:]
            self._cache["data"] = ((x[train], y[train]), (x[val], y[val]))
        return self._cache["data"]  # type: ignore[return-value]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # docstring inherited
        return nn.functional.cross_entropy(output, target)

    def metric(self, output: torch.Tensor, target: torch.Tensor) -> float:
        # docstring inherited
        return float((output.argmax(dim=1) == target).float().mean())


lower = DigitsTask(name="digits-lower", classes=(0, 1, 2, 3, 4))
"""Digits 0-4: trains the ancestor."""

upper = DigitsTask(name="digits-upper", classes=(5, 6, 7, 8, 9))
"""Digits 5-9: the transfer target."""

every = DigitsTask(name="digits-all", classes=tuple(range(10)))
"""All ten digits: a different head (10 classes) on the same features, for partial transfer."""
