"""What checkpointing costs a Ray Train step: tlreg vs Ray's own checkpointing, same run.

Each method runs the same 2-worker DDP loop (gloo, CPU) on the same MLP and checkpoints
every ``--every`` steps:

- ``none``: no checkpoints (the baseline);
- ``ray+torch.save``: rank 0 writes ``torch.save`` into a temp dir and passes
  ``ray.train.Checkpoint.from_directory(dir)`` to ``ray.train.report`` (Ray copies it into
  the run's storage path), as the Ray Train docs show;
- ``tlreg``: every rank calls ``Checkpointer.save`` (each writes its byte-balanced share;
  rank 0 commits to the registry) and reports only metrics.

Printed: mean step time over the measured steps (checkpoint steps included), the slowdown
vs ``none``, the mean time the training thread was blocked at a checkpoint step, and the
checkpoints written.

    python bench/ray_overhead_bench.py --hidden 2048 --steps 60 --every 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from tlreg.registry import Registry
    from tlreg.training import Checkpointer

    torch.manual_seed(0)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    h = config["hidden"]
    model = torch.nn.Sequential(
        *[m for _ in range(4) for m in (torch.nn.Linear(h, h), torch.nn.ReLU())]
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ddp = prepare_model(model)
    method = config["method"]
    ckpt = None
    if method == "tlreg":
        ckpt = Checkpointer(
            "bench",
            registry=Registry(config["registry_url"]),
            store=config["store_url"],
            process_group=dist.group.WORLD,
        )
    x = torch.randn(64, h)
    times, stalls, pending = [], [], []
    for step in range(1, config["steps"] + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
        checkpoint = None
        stall = 0.0
        if step % config["every"] == 0:
            s0 = time.perf_counter()
            if method == "tlreg":
                assert ckpt is not None
                pending.append(ckpt.save(step, model=model, optimizer=opt))
            elif method == "ray+torch.save" and rank == 0:
                d = tempfile.mkdtemp()
                torch.save(
                    {"model": model.state_dict(), "optimizer": opt.state_dict()},
                    Path(d) / "state.pt",
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            stall = time.perf_counter() - s0
        ray.train.report({"step": step}, checkpoint=checkpoint)
        if step > config["warmup"]:
            times.append(time.perf_counter() - t0)
            if stall or step % config["every"] == 0:
                stalls.append(stall)
    for p in pending:
        p.result()
    if ckpt is not None:
        ckpt.close()
    if rank == 0:
        config["results"].put(
            {
                "method": method,
                "times": times,
                "stalls": stalls,
                "checkpoints": len(pending) or len(stalls),
            }
        )


def main() -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from tlreg.registry import Registry

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tlreg-ray-bench-"))
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    registry_url = f"sqlite:///{work / 'registry.db'}"
    reg = Registry(registry_url)
    reg.create_branch("bench")
    reg.close()
    results = Queue()
    rows = []
    for method in ("none", "ray+torch.save", "tlreg"):
        cfg = {
            "method": method,
            "hidden": args.hidden,
            "steps": args.steps,
            "every": args.every,
            "warmup": args.warmup,
            "registry_url": registry_url,
            "store_url": str(work / "store"),
            "results": results,
        }
        TorchTrainer(
            loop,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(
                name=f"bench-{method.replace('+', '-')}", storage_path=str(work / "ray")
            ),
        ).fit()
        rows.append(results.get(timeout=60))
    base = statistics.mean(rows[0]["times"])
    state_mb = 4 * (args.hidden * args.hidden + args.hidden) * 4 * 3 / 2**20
    print(
        f"\n2 Ray Train workers (gloo, CPU), MLP 4x{args.hidden} (~{state_mb:.0f} MiB model+Adam),"
        f" checkpoint every {args.every} steps, {args.steps} steps\n"
    )
    print(
        "| method | mean step (s) | slowdown vs none | mean stall at a checkpoint (ms) "
        "| checkpoints |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        med = statistics.mean(r["times"])
        stall = 1e3 * statistics.mean(r["stalls"]) if r["stalls"] else 0.0
        print(
            f"| {r['method']} | {med:.3f} | {med / base - 1:+.1%} | {stall:.1f} | "
            f"{r['checkpoints'] if r['method'] != 'none' else 0} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
