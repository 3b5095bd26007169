"""A training process that does nothing but checkpoint, to be SIGKILLed at a random moment.

``python saver.py REGISTRY_URL STORE BRANCH [--lazy]`` saves steps 1, 2, 3, ... of a model whose
every tensor is :func:`expected_state` of the step, keeping one save in flight while the next
is staged, and prints ``committed <step>`` each time a commit returns. It runs until killed.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

SHAPES = {"0.weight": (512, 1024), "0.bias": (512,), "2.weight": (1024, 512), "2.bias": (1024,)}


def build_model() -> nn.Module:
    """A 4 MiB model (two 2 MiB matrices and two vectors): a save takes tens of milliseconds."""
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 1024))


def expected_state(step: int) -> dict[str, torch.Tensor]:
    """The exact tensors the model holds at ``step``."""
    gen = torch.Generator().manual_seed(step)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def main(argv: list[str]) -> None:
    from tlreg.registry import Registry
    from tlreg.training import Checkpointer

    registry_url, store, branch = argv[:3]
    lazy = "--lazy" in argv
    model = build_model()
    registry = Registry(registry_url)
    ckpt = Checkpointer(branch, registry=registry, store=store, lazy=lazy)
    head = ckpt.restore(model=model)
    step = head.step if head else 0
    previous = None
    while True:
        step += 1
        with torch.no_grad():
            for name, value in expected_state(step).items():
                model.get_parameter(name).copy_(value)
        pending = ckpt.save(step, model=model, extra={"step": step})
        pending.staged.result()  # the state may change from here on
        if previous is not None:
            print(f"committed {previous[0]} {previous[1].result()}", flush=True)
        previous = (step, pending)


if __name__ == "__main__":
    main(sys.argv[1:])
