"""Families: stored bytes of K branches off one ancestor, against (1 + K·f)·S.

    python bench/family_bench.py                 # K = 100 head-only, K = 10 full fine-tunes

One ancestor of S bytes (a 12-layer backbone and a head) is imported; then K branches are
made from it (``Registry.create_branch(from_ref=...)``), and each branch, as a fine-tuning job
would, restores the ancestor through its own ``Checkpointer``, changes what it trains and
saves once:

- **head-only** (feature extraction): only the head changes, a fraction f of S;
- **full fine-tune**: every parameter changes (f = 1).

Reported: the store's bytes (every object's size, manifests apart) against the ideal
(1 + K·f)·S, for the target <= 1.02x on the head-only family; and the manifests' bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from tlreg.ckpt.objects import read_layout, stored_objects
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import Checkpointer


def build(width: int, layers: int, classes: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    backbone = [torch.nn.Linear(width, width) for _ in range(layers)]
    return torch.nn.Sequential(*backbone, torch.nn.Linear(width, classes))


def family(root: Path, k: int, head_only: bool, width: int, layers: int, classes: int) -> dict:
    url = str(root / "store")
    registry = Registry(f"sqlite:///{root / 'registry.db'}")
    registry.create_branch("base")
    model = build(width, layers, classes)
    with Checkpointer("base", registry=registry, store=url) as ckpt:
        base = ckpt.save(0, model=model).result()
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    head = model[-1]
    trained = sum(p.numel() * p.element_size() for p in head.state_dict().values())
    fraction = trained / size if head_only else 1.0
    for i in range(k):
        name = f"task-{i}"
        registry.create_branch(name, from_ref=base)
        mine = build(width, layers, classes)
        with Checkpointer(name, registry=registry, store=url) as ckpt:
            ckpt.restore(model=mine)
            with torch.no_grad():
                for p in mine[-1].parameters() if head_only else mine.parameters():
                    p.add_(0.01 * (i + 1))
            ckpt.save(1, model=mine).result()
    store = open_store(url)
    stored = sum(read_layout(store, d).nbytes for d in stored_objects(store))
    manifests = sum(store.size(key) for key in store.list("manifests"))
    registry.close()
    ideal = (1 + k * fraction) * size
    return {"S": size, "f": fraction, "stored": stored, "ideal": ideal, "manifests": manifests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=100, help="K of the head-only family")
    parser.add_argument("--full", type=int, default=10, help="K of the full fine-tune family")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    print(
        "\n| family | K | S | f | stored | (1 + K·f)·S | stored / ideal | manifests |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for label, k, head_only in (("head-only", args.heads, True), ("full", args.full, False)):
        with tempfile.TemporaryDirectory(prefix="tlreg-family-") as tmp:
            r = family(Path(tmp), k, head_only, args.width, args.layers, args.classes)
        print(
            f"| {label} | {k} | {r['S'] / 1e6:.2f} MB | {r['f']:.4f} | {r['stored'] / 1e6:.2f} MB "
            f"| {r['ideal'] / 1e6:.2f} MB | {r['stored'] / r['ideal']:.4f}x "
            f"| {r['manifests'] / 1e3:.0f} kB |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
