"""Quick measurement: tlreg.ckpt vs torch.save/torch.load on a ~500 MB state.

Run: .venv/bin/python bench/ckpt_quick.py [DIR]   (DIR defaults to a fresh temp dir)

Durable = until the bytes are fsynced (torch.save is followed by fsync of the file and its
directory; the checkpointer's LocalStore fsyncs every object and the manifest).
Page cache is not dropped, so both load times are warm-cache numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from tlreg.ckpt import AsyncCheckpointer


def make_state() -> dict:
    torch.manual_seed(0)
    model = {}
    for i in range(8):
        model[f"big.{i}.weight"] = torch.randn(5 << 20)  # 20 MiB: own objects
    for i in range(40):
        model[f"mid.{i}.weight"] = torch.randn(2 << 20)  # 8 MiB: packed
    for i in range(2000):
        model[f"small.{i}.weight"] = torch.randn(4096)  # 16 KiB: packed
    return {"model": model, "step": 1, "extra": {"betas": (0.9, 0.999)}}


def bump(state: dict) -> None:
    for t in state["model"].values():
        t.add_(1.0)


def torch_save(state: dict, path: str) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tlreg-bench-")
    state = make_state()
    nbytes = sum(t.nbytes for t in state["model"].values())
    print(f"state: {len(state['model'])} tensors, {nbytes / 2**20:.0f} MiB; dir {root}")

    pt = os.path.join(root, "state.pt")
    for run in range(2):
        bump(state)
        print(f"torch.save+fsync #{run}: {torch_save(state, pt):.2f} s")

    for lazy in (False, True):
        with AsyncCheckpointer(os.path.join(root, f"store-{lazy}"), lazy=lazy) as ckpt:
            for run in range(3):
                bump(state)  # new bytes every time: no dedup
                start = time.perf_counter()
                pending = ckpt.save(state, step=run)
                returned = time.perf_counter() - start
                pending.staged.result()
                staged = time.perf_counter() - start
                pending.result()
                durable = time.perf_counter() - start
                s = pending.stats
                print(
                    f"ckpt lazy={lazy} #{run}: save() returned {returned * 1e3:.1f} ms, "
                    f"staged {staged * 1e3:.0f} ms, durable {durable:.2f} s "
                    f"(stall {s.stall_s * 1e3:.1f} ms, stage {s.stage_s * 1e3:.0f} ms, "
                    f"persist {s.persist_s:.2f} s, new {s.new_bytes / 2**20:.0f} MiB, "
                    f"objects {s.objects_written})"
                )
            start = time.perf_counter()
            pending = ckpt.save(state, step=99)
            pending.result()
            print(
                f"ckpt lazy={lazy} unchanged state: durable {time.perf_counter() - start:.2f} s, "
                f"stall {pending.stats.stall_s * 1e3:.1f} ms, new {pending.stats.new_bytes} B"
            )

    with AsyncCheckpointer(os.path.join(root, "store-False")) as ckpt:
        for run in range(2):
            start = time.perf_counter()
            ckpt.load(ckpt_last(ckpt))
            print(f"ckpt.load #{run} (hash-verified): {time.perf_counter() - start:.2f} s")
    for run in range(2):
        start = time.perf_counter()
        torch.load(pt, weights_only=True)
        print(f"torch.load #{run} (weights_only): {time.perf_counter() - start:.2f} s")


def ckpt_last(ckpt: AsyncCheckpointer) -> str:
    names = sorted(k for k in ckpt.store.list("manifests"))
    return names[-1].removeprefix("manifests/").removesuffix(".json")


if __name__ == "__main__":
    main()
