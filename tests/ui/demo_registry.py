"""A registry shaped like ``make demo``'s, built in a second without Ray: real checkpoints of
the digits model in a real store, real runs with evaluation curves.

- ``base`` (3 checkpoints, every tensor changes), tagged ``v1`` at its head;
- ``upper-head`` branched from base's head, only ``head.*`` changes (features shared);
- ``upper-full`` branched from base's head, every tensor changes;
- ``upper-scratch`` a root: a fresh model, nothing shared.

Each branch's run logs ``val_accuracy`` every 10 steps; the transferred branches reach 0.9
sooner (upper-head at step 20, upper-full at 30, upper-scratch at 60).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tlreg.registry import Registry
from tlreg.training import Checkpointer
from tlreg.training.examples.digits import lower

CURVES = {
    "base": [0.3, 0.5, 0.7, 0.8, 0.85, 0.9],
    "upper-head": [0.6, 0.92, 0.94, 0.95, 0.95, 0.96],
    "upper-full": [0.5, 0.8, 0.91, 0.95, 0.97, 0.98],
    "upper-scratch": [0.2, 0.3, 0.45, 0.6, 0.8, 0.9],
}
"""val_accuracy at steps 10, 20, ..., 60 of each branch."""


@dataclass
class Demo:
    heads: dict[str, str]
    """branch -> head checkpoint id"""
    base_head: str
    runs: dict[str, int]


def _train(
    reg: Registry,
    store: str,
    branch: str,
    model: torch.nn.Module,
    *,
    only: str | None,
    seed: int,
) -> int:
    run = reg.start_run(branch, {"steps": 60, "task": "digits"})
    g = torch.Generator().manual_seed(seed)
    with Checkpointer(branch, registry=reg, store=store, run_id=run.id) as ckpt:
        ckpt.restore(model=model)  # a transfer from the ancestor, as the train loop does
        for i, acc in enumerate(CURVES[branch]):
            step = 10 * (i + 1)
            reg.log_metrics(run.id, step, {"val_accuracy": acc}, elapsed_s=0.5 * (i + 1))
            if step % 20 == 0:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if only is None or name.startswith(only):
                            p.add_(torch.randn(p.shape, generator=g) * 0.01)
                ckpt.save(step, metrics={"val_accuracy": acc}, model=model).result()
    reg.finish_run(run.id, status="succeeded")
    return run.id


def build_demo(reg: Registry, store: str) -> Demo:
    """Fill an empty registry and store (see the module docstring)."""
    runs = {}
    reg.create_branch("base", task="digits:lower")
    base_model = lower.build_model(0)
    runs["base"] = _train(reg, store, "base", base_model, only=None, seed=1)
    base_head = reg.get_branch("base").head
    assert base_head is not None
    reg.tag("base", "v1")
    for branch, only in (("upper-head", "head."), ("upper-full", None)):
        reg.create_branch(branch, from_ref="base", task="digits:upper")
        model = lower.build_model(9)  # restore() loads the ancestor's weights into it
        runs[branch] = _train(reg, store, branch, model, only=only, seed=2)
    reg.create_branch("upper-scratch", task="digits:upper")
    runs["upper-scratch"] = _train(
        reg, store, "upper-scratch", lower.build_model(5), only=None, seed=3
    )
    heads = {b.name: b.head for b in reg.branches() if b.head}
    return Demo(heads=heads, base_head=base_head, runs=runs)
