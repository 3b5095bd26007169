"""Storage that stays small: stored bytes after ``gc --keep-last 1``, and repack throughput.

    python bench/gc_bench.py                 # the issue's case: 200 saves of a 12-layer model
    python bench/gc_bench.py --saves 20      # fewer saves (the pin comes from the first one)

1. **Stored / unique bytes** (issue 17): back-to-back saves of a 12-layer MLP (12.6 MB; every
   step changes every parameter, as training does; the Checkpointer also saves the RNG state,
   which never changes here), then ``collect_garbage(keep_last=1, grace=0)``. Reported: the
   bytes of the objects left in the store divided by the unique bytes of the kept checkpoint,
   for the four combinations of the pack policy (small tensors packed apart, see
   ``tlreg.ckpt.persist.SMALL_BYTES``) and repacking (``--max-unused 5%`` or off). Before
   issue 17 (policy off, no repack) this was 2.06x; the target is <= 1.05x.
2. **Repack throughput vs a plain copy** of the same bytes: objects whose live half is spread
   over 1 MiB ranges are repacked (read, every tensor's hash checked, written as new packs,
   relocation records written); the peer reads the same ranges and writes them as one file
   with ``store.put``, no hashing. Alternated runs, medians; target >= 50%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

from tlreg.ckpt import persist, read_manifest
from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.objects import (
    chunk_key,
    delete_object,
    read_layout,
    stored_objects,
    write_marker,
    write_unless_stored,
)
from tlreg.ckpt.repack import repack
from tlreg.registry import Registry
from tlreg.storage_backends import Store, open_store
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage


def twelve_layers() -> torch.nn.Module:
    """12 x Linear(512, 512): 12.6 MB of float32 parameters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(12)])


def stored_bytes(store: Store) -> int:
    return sum(read_layout(store, d).nbytes for d in stored_objects(store))


def ratio_case(root: Path, saves: int, policy: bool, max_unused: float | None) -> dict:
    """Saves, then gc --keep-last 1; the stored / unique ratio and what gc did."""
    saved = persist.SMALL_BYTES
    persist.SMALL_BYTES = saved if policy else 0
    try:
        url = str(root / "store")
        registry = Registry(f"sqlite:///{root / 'registry.db'}")
        registry.create_branch("b")
        model = twelve_layers()
        with Checkpointer("b", registry=registry, store=url) as ckpt:
            for step in range(1, saves + 1):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3)
                ckpt.save(step, model=model).result()
        store = open_store(url)
        before = stored_bytes(store)
        start = time.perf_counter()
        plan = collect_garbage(
            registry, store, keep_last=1, grace=timedelta(0), max_unused=max_unused
        )
        gc_s = time.perf_counter() - start
        head = registry.resolve("b").manifest
        unique = {e.hash: e.nbytes for _, e in read_manifest(store, head).stored()}
        after = stored_bytes(store)
        registry.close()
        return {
            "before": before,
            "after": after,
            "unique": sum(unique.values()),
            "ratio": after / sum(unique.values()),
            "repacked": len(plan.repacked),
            "copied": sum(live for _, _, live in plan.repacked),
            "gc_s": gc_s,
        }
    finally:
        persist.SMALL_BYTES = saved


def throughput(root: Path, objects: int, object_mb: int, rounds: int) -> dict:
    """Repack vs a plain copy of the same live bytes (half of each object, in 1 MiB ranges)."""
    store = open_store(str(root / "tp"))
    rng = torch.Generator().manual_seed(1)
    piece = 1 << 20
    chosen = {}
    for _ in range(objects):
        data = torch.randint(0, 256, (object_mb << 20,), dtype=torch.uint8, generator=rng)
        raw = memoryview(data.numpy().data)
        digest = hash_bytes(raw)
        layout = write_unless_stored(store, digest, [raw], len(raw))
        assert layout is not None
        write_marker(store, digest, layout)
        spans = {
            (off, piece, hash_bytes(raw[off : off + piece]))
            for off in range(0, len(raw), 2 * piece)
        }
        chosen[digest] = (len(raw), spans)
    live = sum(n for _, spans in chosen.values() for _, n, _ in spans)

    def plain_copy(tag: int) -> None:
        parts = []
        for digest, (_, spans) in chosen.items():
            layout = read_layout(store, digest)
            for off, n, _ in sorted(spans):
                index, start = divmod(off, layout.chunk)
                parts.append(store.get_range(chunk_key(digest, index), start, n))
        store.put(f"copy/{tag}", b"".join(parts))

    made: set[str] = set()

    def do_repack(tag: int) -> None:
        done, _ = repack(store, chosen)
        made.update(t for r in done for t in r.targets)

    copy_s: list[float] = []
    repack_s: list[float] = []
    for i in range(rounds):
        for fn, out in ((plain_copy, copy_s), (do_repack, repack_s)):
            # every round writes its bytes: the last round's (content-addressed) packs go first
            for target in made:
                delete_object(store, target)
            made.clear()
            store.delete(f"copy/{i - 1}")
            os.sync()
            start = time.perf_counter()
            fn(i)
            os.sync()
            out.append(time.perf_counter() - start)
    c, r = statistics.median(copy_s), statistics.median(repack_s)
    return {"live": live, "copy_s": c, "repack_s": r, "ratio": c / r}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--objects", type=int, default=4, help="objects repacked per round")
    parser.add_argument("--object-mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    print(f"\n{args.saves} saves of a 12-layer model, then gc --keep-last 1 --grace 0s\n")
    print(
        "| pack policy | repack | stored before gc | stored after | unique | ratio "
        "| repacked (copied) | gc s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for policy in (False, True):
        for max_unused in (None, 0.05):
            with tempfile.TemporaryDirectory(prefix="tlreg-gcbench-") as tmp:
                r = ratio_case(Path(tmp), args.saves, policy, max_unused)
            print(
                f"| {'small apart' if policy else 'one pack'} | "
                f"{'off' if max_unused is None else '5%'} | {r['before'] / 1e6:.1f} MB | "
                f"{r['after'] / 1e6:.2f} MB | {r['unique'] / 1e6:.2f} MB | {r['ratio']:.3f}x | "
                f"{r['repacked']} ({r['copied'] / 1e3:.1f} kB) | {r['gc_s']:.2f} |",
                flush=True,
            )
    with tempfile.TemporaryDirectory(prefix="tlreg-gcbench-") as tmp:
        t = throughput(Path(tmp), args.objects, args.object_mb, args.rounds)
    print(
        f"\nrepack throughput: {t['live'] / 2**20:.0f} MiB live bytes; plain copy "
        f"{t['copy_s']:.3f} s, repack {t['repack_s']:.3f} s (medians of {args.rounds}): "
        f"repack runs at {t['ratio']:.0%} of a plain copy's throughput"
    )
    print(f"load average after {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
