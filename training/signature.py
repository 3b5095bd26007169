"""Architecture signatures: which layers of a stored model fit a new one.

A model's signature is the chain of structural hashes of its modules in order (after
EvoStore): one entry per module that owns parameters or buffers, hashing the module's type
and its own tensors' names, shapes and dtypes. Two models share a prefix of length d when
their first d such modules are structurally identical, so exactly those modules' tensors
can be transferred. The registry indexes every prefix (``Registry.best_ancestor``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from torch import nn

from tlreg.registry import CheckpointRecord, Registry


def _owned(module: nn.Module) -> list[tuple[str, list[int], str]]:
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors]


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that own tensors, in registration order, with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if _owned(m)]


def signature(model: nn.Module) -> list[str]:
    """The architecture signature of ``model`` (one 16-hex-digit hash per layer)."""
    out = []
    for _name, module in layers(model):
        doc = json.dumps([type(module).__qualname__, _owned(module)], separators=(",", ":"))
        out.append(hashlib.blake2b(doc.encode(), digest_size=8).hexdigest())
    return out


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common prefix of two signatures."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_tensor_names(model: nn.Module, depth: int) -> set[str]:
    """State-dict names of the tensors owned by the first ``depth`` layers of ``model``."""
    names: set[str] = set()
    for qualname, module in layers(model)[:depth]:
        for local, _shape, _dtype in _owned(module):
            names.add(f"{qualname}.{local}" if qualname else local)
    return names


def best_ancestor_for(
    task_spec: str, registry: Registry, *, seed: int = 0
) -> tuple[CheckpointRecord, int, int] | None:
    """The stored checkpoint sharing the longest layer prefix with ``task_spec``'s model.

    Returns ``(checkpoint, matched layers, layers of the new model)`` or None.
    """
    from tlreg.training.task import load_task

    sig = signature(load_task(task_spec).build_model(seed))
    found = registry.best_ancestor(sig)
    return None if found is None else (found[0], found[1], len(sig))
