"""The node-local tier (issue 16) against the shared tier, torch.save and DCP, in one run.

Run: ``.venv/bin/python bench/tier_bench.py [--size GiB] [--dir DIR] [--json OUT] [--quick]``.
The shared tier is a real S3 server (SeaweedFS, ``tests/s3_server.py``) on this machine; the
local tier is a folder on this machine's disk (``--dir``, default a temporary folder). Every
figure that counts is a ratio of two things measured in the same run, interleaved where they
can be, so the load other processes put on the machine mostly cancels. Four tables:

1. **Local-safe vs shared-durable**: one ``AsyncCheckpointer(s3://..., local_tier=DIR)``
   saves an MLP's model + Adam state (``--size`` GiB, default 0.3) ``--reps`` times (after a
   warm-up save, not counted; one element of every tensor changes before each save, so
   nothing dedups). Per save: seconds from ``save()`` to ``PendingSave.local`` (every object
   and the manifest fsynced on the local tier) and to ``PendingSave.committed`` (drained to
   the S3 server, manifest last), and, interleaved, a save of the same state straight to the
   S3 server without a tier (to ``committed``). Goal: local ÷ shared-durable <= 0.2.
2. **Restore, local tier vs shared tier**: the last checkpoint of table 1, read back in
   place (``load(into=state)``) by a checkpointer with the local tier (every byte from the
   local disk, ``last_load_tiers`` says so) and by one on the S3 server alone, in turn
   (``--restore-rounds``), caches dropped before each read (``echo 3 >
   /proc/sys/vm/drop_caches`` where this process may; else the local tier's files are
   evicted with ``posix_fadvise(DONTNEED)`` and the S3 server's cache stays: the report
   says which). 2b, **restart to first step**: a fresh Python process (what a restarted
   worker is) imports torch and tlreg, builds the model and optimizer, resumes the branch
   through ``tlreg.training.Checkpointer.restore`` (the registry's head, then its bytes
   from the local tier, or with no tier configured from the S3 server), runs one training
   step; timed from its start to that step, tiers in turn, and beside them the floor (the
   same restart restoring nothing). Goal: the local tier >= 3x faster. (Not Ray Train's
   restart of a worker group: that adds the same Ray start-up to both tiers.)
3. **Training slowdown**: a CPU MLP (``--train-size`` GiB of state) whose step takes about
   ``--step-s`` seconds here; phases of ``--persist-every`` steps, plain and checkpointing in
   turn (P C P C ... P, ``--rounds`` checkpointing phases); in a checkpointing phase a save
   every ``--every`` steps to the local tier, the first of them also drained to the S3 server
   (``persist=True``), all completions waited for at the phase's end. The slowdown of a
   phase is its step time over the mean of the plain phases on either side of it, minus 1;
   the median over rounds is reported. The same loop saving every ``--every`` steps straight
   to the S3 server (no tier) is shown beside it, and with ``--drain-bytes-per-s`` the tiered
   loop again with its drain held to that budget. Goal: <= 5% with the tier. (The S3 server
   runs on this machine: its CPU time for a drain is taken from training too, which a
   cluster's shared store would not do.)
4. **MLPerf Storage checkpoint table**: ``--ranks`` processes (simulated ranks, one share
   each of the ``--size`` state) write a checkpoint together, started at one barrier, then
   read it back together after caches are dropped, per method in turn: tlreg to the local
   tier (to ``local``), tlreg to the S3 server (to ``committed``), ``torch.save`` (to a file
   on the local tier's disk, ``fsync``ed with its folder) and ``dcp.save`` (DCP's
   ``FileSystemWriter``, which fsyncs every file). Columns, as the MLPerf Storage checkpoint
   rules define them:

   - *bytes*: the checkpoint's total size, all ranks' shares;
   - *fsync*: how each method's durability is enforced before its clock stops (every
     method's write is timed to durable; an S3 PUT is durable once the server answers);
   - *write s* / *read s*: the **duration**, the slowest rank's time from the common barrier
     to its share being durable (write) or restored in memory (read): the checkpoint is not
     done until every rank is;
   - *write GB/s* / *read GB/s*: the **throughput**, total bytes ÷ duration, so the slowest
     rank limits it;
   - *fastest-rank GB/s*: the fastest rank's own rate times the number of ranks, the
     throughput the storage would give if every rank went as fast as the fastest one (what a
     straggler costs is the gap between the two);
   - *caches*: how the caches were dropped before the reads (see table 2).

``--quick`` (small states, one repetition, short loops) runs every table in well under a
minute: a smoke test of the harness, not a measurement. ``--json OUT`` writes the raw
results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _cache import evict
from ckpt_bench import (
    WIDTH,
    DcpSave,
    GiB,
    TorchSave,
    bump,
    calibrate_batch,
    machine,
    make_training,
    prime,
    state_bytes,
    state_of,
    touch,
)

from tlreg.ckpt import AsyncCheckpointer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import seaweed_server

HEADINGS = (
    "## 1. Local-safe vs shared-durable",
    "## 2. Restore, local tier vs shared tier",
    "## 2b. Restart to first training step",
    "## 3. Training slowdown",
    "## 4. MLPerf Storage checkpoint table",
)
MLPERF_METHODS = ("tlreg local tier", "tlreg shared (S3)", "torch.save", "dcp.save")


# -- the machine --------------------------------------------------------------------------


def drop_caches(*roots: Path) -> str:
    """Drop the page cache before a read: the whole machine's where this process may (the S3
    server's data included), else the files under ``roots`` only. Returns which."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for root in roots:
            if root.exists():
                evict(root)
        return "fadvise (local files only; the S3 server's cache stays)"


@contextlib.contextmanager
def s3_bucket() -> Iterator[str]:
    """A SeaweedFS S3 server with one fresh bucket; yields ``s3://bucket``. The credentials
    go to this process's environment, so rank and restart processes inherit them."""
    with seaweed_server() as server:
        bucket = f"tiers-{uuid.uuid4().hex[:12]}"
        server.fs.mkdir(bucket)
        os.environ |= {
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        yield f"s3://{bucket}"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


# -- 1. local-safe vs shared-durable ------------------------------------------------------


def run_t1(size: float, reps: int, shared: str, root: Path) -> dict[str, Any]:
    model, opt = make_training(size)
    state = state_of(model, opt)
    tiered = AsyncCheckpointer(f"{shared}/t1-tiered", local_tier=str(root / "t1-local"))
    direct = AsyncCheckpointer(f"{shared}/t1-direct")
    local_s: list[float] = []
    tiered_s: list[float] = []
    direct_s: list[float] = []
    last = ""
    try:
        for rep in range(reps + 1):  # the first save of each is a warm-up
            bump(state)
            start = time.perf_counter()
            pending = tiered.save(state, step=rep)
            pending.local.result()
            local = time.perf_counter() - start
            last = pending.result()
            shared_durable = time.perf_counter() - start
            bump(state)
            start = time.perf_counter()
            direct.save(state, step=rep).result()
            straight = time.perf_counter() - start
            if rep:
                local_s.append(local)
                tiered_s.append(shared_durable)
                direct_s.append(straight)
    finally:
        tiered.close()
        direct.close()
    return {
        "bytes": state_bytes(state),
        "local_s": local_s,
        "shared_durable_s": tiered_s,
        "direct_s": direct_s,
        "ratio": [a / b for a, b in zip(local_s, tiered_s, strict=True)],
        "ratio_direct": [a / b for a, b in zip(local_s, direct_s, strict=True)],
        "manifest": last,
        "size": size,
    }


def table1(r: dict[str, Any]) -> list[str]:
    ratio = med(r["ratio"])
    return [
        f"{HEADINGS[0]}: {r['bytes'] / GiB:.2f} GiB, {len(r['local_s'])} saves, medians (min-max)",
        "",
        "| save | seconds |",
        "|---|---|",
        f"| tiered, to local-safe (`PendingSave.local`) | {spread(r['local_s'])} |",
        f"| tiered, to shared-durable (`committed`, drained) | {spread(r['shared_durable_s'])} |",
        f"| no tier, straight to S3 (`committed`) | {spread(r['direct_s'])} |",
        "",
        f"local-safe ÷ shared-durable: **{ratio:.3f}** (goal <= 0.2: "
        f"{'met' if ratio <= 0.2 else 'NOT met'}); "
        f"local-safe ÷ a save straight to S3: {med(r['ratio_direct']):.3f}",
    ]


# -- 2. restore ---------------------------------------------------------------------------


def run_t2(t1: dict[str, Any], rounds: int, shared: str, root: Path) -> dict[str, Any]:
    model, opt = make_training(t1["size"])
    state = state_of(model, opt)
    nbytes = state_bytes(state)
    url, local = f"{shared}/t1-tiered", str(root / "t1-local")
    times: dict[str, list[float]] = {"local": [], "shared": []}
    tiers: dict[str, dict[str, int]] = {}
    caches = ""
    for i in range(rounds):
        for tier in ("local", "shared") if i % 2 == 0 else ("shared", "local"):
            prime(nbytes)
            caches = drop_caches(root)
            kwargs: dict[str, Any] = {"local_tier": local} if tier == "local" else {}
            start = time.perf_counter()
            with AsyncCheckpointer(url, **kwargs) as reader:
                reader.load(t1["manifest"], into=state)
                touch(state)
                times[tier].append(time.perf_counter() - start)
                tiers[tier] = dict(reader.last_load_tiers)
    return {"times": times, "tiers": tiers, "caches": caches, "bytes": nbytes}


def restart_child(spec: dict[str, Any]) -> None:
    """A restarted worker, through ``tlreg.training``'s resume path: build the model and
    optimizer, restore the branch head (registry lookup, then the nearest tier), one step;
    then print FIRST_STEP and where the bytes came from."""
    from tlreg.registry import Registry
    from tlreg.training import Checkpointer

    model, opt = make_training(spec["size"])
    tiers: dict[str, int] = {}
    if spec["tier"] != "none":  # (none: the floor, a restart that restores nothing)
        local = spec["local"] if spec["tier"] == "local" else None
        with (
            Registry(spec["registry"]) as registry,
            Checkpointer("bench", registry=registry, store=spec["url"], local_tier=local) as ckpt,
        ):
            ckpt.restore(model=model, optimizer=opt)
            tiers = dict(ckpt.engine.last_load_tiers)  # (the run reports only tiered reads)
    opt.zero_grad(set_to_none=False)
    model(torch.randn(8, WIDTH)).square().mean().backward()
    opt.step()
    print("FIRST_STEP " + json.dumps(tiers), flush=True)


def restart_checkpoint(size: float, shared: str, root: Path) -> dict[str, Any]:
    """A branch whose head is a checkpoint of the ``size`` state on both tiers, committed
    through ``tlreg.training`` as a run would (registry on SQLite)."""
    from tlreg.registry import Registry
    from tlreg.training import Checkpointer

    spec = {
        "registry": f"sqlite:///{root / 'registry.db'}",
        "url": f"{shared}/t2b",
        "local": str(root / "t2b-local"),
        "size": size,
    }
    model, opt = make_training(size)
    with Registry(spec["registry"]) as registry:
        registry.create_branch("bench")
        with Checkpointer(
            "bench", registry=registry, store=spec["url"], local_tier=spec["local"]
        ) as ckpt:
            ckpt.save(1, model=model, optimizer=opt, persist=True).result()
    return spec


def run_t2b(t1: dict[str, Any], rounds: int, shared: str, root: Path) -> dict[str, Any]:
    """Restarts from each tier, and the floor: a restart that restores nothing."""
    base = restart_checkpoint(t1["size"], shared, root)
    times: dict[str, list[float]] = {"local": [], "shared": [], "none": []}
    tiers: dict[str, dict[str, int]] = {}
    order = ["local", "shared", "none"]
    for i in range(rounds):
        for tier in order[i % 3 :] + order[: i % 3]:
            drop_caches(root)
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, __file__, "--restart-child", json.dumps(base | {"tier": tier})],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            elapsed = time.perf_counter() - start
            proc.wait()
            if proc.returncode != 0 or not line.startswith("FIRST_STEP "):
                raise RuntimeError(f"restart child ({tier}) failed: exit {proc.returncode}")
            times[tier].append(elapsed)
            if tier != "none":
                tiers[tier] = json.loads(line.split(" ", 1)[1])
    return {"times": times, "tiers": tiers}


def table2(r: dict[str, Any], rb: dict[str, Any]) -> list[str]:
    def rows(x: dict[str, Any]) -> list[str]:
        return [
            f"| {tier} | {spread(x['times'][tier])} | {x['tiers'].get(tier, {})} |"
            for tier in ("local", "shared")
        ]

    speedup = med(r["times"]["shared"]) / med(r["times"]["local"])
    restart = med(rb["times"]["shared"]) / med(rb["times"]["local"])
    floor = med(rb["times"]["none"])
    net = (med(rb["times"]["shared"]) - floor) / max(med(rb["times"]["local"]) - floor, 1e-9)
    return [
        f"{HEADINGS[1]}: {r['bytes'] / GiB:.2f} GiB in place, caches: {r['caches']}",
        "",
        "| restore from | seconds | bytes read per tier |",
        "|---|---|---|",
        *rows(r),
        "",
        f"shared ÷ local: **{speedup:.2f}x** (goal >= 3x: {'met' if speedup >= 3 else 'NOT met'})",
        "",
        f"{HEADINGS[2]}: a fresh process builds the model, resumes the branch "
        "(`tlreg.training.Checkpointer.restore`), steps once",
        "",
        "| restore from | seconds to first step | bytes read per tier |",
        "|---|---|---|",
        *rows(rb),
        f"| nothing (the floor: start, import, build, one step) | {spread(rb['times']['none'])} "
        "| {} |",
        "",
        f"shared ÷ local: **{restart:.2f}x** (goal >= 3x: {'met' if restart >= 3 else 'NOT met'}); "
        f"above the floor (the restore's own share): {net:.2f}x",
    ]


# -- 3. training slowdown -----------------------------------------------------------------


def run_t3(args: argparse.Namespace, shared: str, root: Path) -> dict[str, Any]:
    model, opt = make_training(args.train_size, seed=1)
    state = state_of(model, opt)
    batch = calibrate_batch(args.train_size, args.step_s)
    x = torch.randn(batch, WIDTH)
    steps, every = args.persist_every, args.every

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()

    def phase(ckpt: AsyncCheckpointer | None, tier_saves: bool) -> tuple[float, list[float]]:
        pendings = []
        stalls = []
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if ckpt is not None and i % every == 0 and i + every <= steps:
                t0 = time.perf_counter()
                kwargs = {"persist": i == every} if tier_saves else {}
                pendings.append(ckpt.save(state, step=i, **kwargs))
                stalls.append(time.perf_counter() - t0)
        ids = [p.result() for p in pendings]
        elapsed = (time.perf_counter() - start) / steps
        if ckpt is not None and tier_saves and ids:  # outside the clock: keep the tier small
            ckpt.prune_local([ids[-1]])
        return elapsed, stalls

    def tiered(budget: float | None) -> Callable[[], AsyncCheckpointer]:
        return lambda: AsyncCheckpointer(
            f"{shared}/t3-tiered",
            local_tier=str(root / "t3-local"),
            drain_bytes_per_s=budget,
        )

    tier = f"local every {every}, shared every {steps}"
    kinds: dict[str, Callable[[], AsyncCheckpointer]] = {tier: tiered(None)}
    if args.drain_bytes_per_s is not None:
        budget = f"{tier}, drain <= {args.drain_bytes_per_s / 1e6:g} MB/s"
        kinds[budget] = tiered(args.drain_bytes_per_s)
    kinds[f"no tier, S3 every {every}"] = lambda: AsyncCheckpointer(f"{shared}/t3-direct")
    rows = []
    for label, make in kinds.items():
        ckpt = make()
        is_tiered = "local" in label
        plain: list[float] = []
        during: list[float] = []
        stalls: list[float] = []
        try:
            for _ in range(2):
                step()
            plain.append(phase(None, is_tiered)[0])
            for _ in range(args.rounds):
                step_s, s = phase(ckpt, is_tiered)
                during.append(step_s)
                stalls += s
                plain.append(phase(None, is_tiered)[0])
        finally:
            ckpt.close()
        slowdowns = [c / ((plain[i] + plain[i + 1]) / 2) - 1 for i, c in enumerate(during)]
        rows.append(
            {
                "method": label,
                "plain_s": plain,
                "step_s": during,
                "stall": stalls,
                "checkpoints": len(stalls),
                "slowdown": slowdowns,
            }
        )
    return {"bytes": state_bytes(state), "batch": batch, "steps": steps, "rows": rows}


def table3(r: dict[str, Any], every: int) -> list[str]:
    lines = [
        f"{HEADINGS[3]}: {r['bytes'] / GiB:.2f} GiB of state, batch {r['batch']}, "
        f"phases of {r['steps']} steps, a save every {every}",
        "",
        "| saves | plain step s | step s while saving | stall s (median) | slowdown |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['method']} | {spread(row['plain_s'], '{:.3f}')} | "
            f"{spread(row['step_s'], '{:.3f}')} | {med(row['stall']):.3f} | "
            f"{med(row['slowdown']) * 100:+.1f}% |"
        )
    tiered = med(r["rows"][0]["slowdown"])
    lines += [
        "",
        f"slowdown with the tier: **{tiered * 100:+.1f}%** (goal <= 5%: "
        f"{'met' if tiered <= 0.05 else 'NOT met'})",
    ]
    return lines


# -- 4. MLPerf Storage table: simulated ranks ---------------------------------------------


def _rank_saver(method: str, shared: str, root: Path, rank: int) -> Any:
    folder = root / "t4" / f"rank{rank}"
    if method == "tlreg local tier":
        return AsyncCheckpointer(f"{shared}/t4-tiered/rank{rank}", local_tier=str(folder))
    if method == "tlreg shared (S3)":
        return AsyncCheckpointer(f"{shared}/t4-direct/rank{rank}")
    if method == "torch.save":
        return TorchSave(folder / "torch")
    return DcpSave(folder / "dcp")


def rank_main(rank: int, size: float, shared: str, root: str, barrier: Any, out: Any) -> None:
    """One simulated rank: for each method, write its share at the barrier, then (after the
    parent drops the caches) read it back at the next barrier; report both times."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    model, opt = make_training(size, seed=rank)
    state = state_of(model, opt)
    for method in MLPERF_METHODS:
        saver = _rank_saver(method, shared, Path(root), rank)
        if isinstance(saver, AsyncCheckpointer):  # warm-up, as every method gets: not timed
            saver.save(state, step=0, persist=False).result()
        else:
            saver.save(state)()
        bump(state)
        barrier.wait()
        start = time.perf_counter()
        if isinstance(saver, AsyncCheckpointer):
            pending = saver.save(state, step=rank, persist=False)
            last = pending.local.result() if method == "tlreg local tier" else pending.result()
        else:
            saver.save(state)()
        write = time.perf_counter() - start
        barrier.wait()  # every rank wrote; the parent drops the caches
        barrier.wait()
        start = time.perf_counter()
        if isinstance(saver, AsyncCheckpointer):
            saver.load(last, into=state)
        else:
            saver.restore(state)
        touch(state)
        read = time.perf_counter() - start
        out.put((method, rank, state_bytes(state), write, read))
        if isinstance(saver, AsyncCheckpointer):
            saver.close()
        barrier.wait()


def _fastest(sizes: list[int], times: list[float]) -> float:
    """The fastest rank's bytes/s times the number of ranks."""
    return max(n / t for n, t in zip(sizes, times, strict=True)) * len(sizes)


def run_t4(size: float, ranks: int, shared: str, root: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(ranks + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=rank_main, args=(r, size / ranks, shared, str(root), barrier, out), daemon=True
        )
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    caches = ""
    results: dict[str, list[tuple[int, int, float, float]]] = {m: [] for m in MLPERF_METHODS}
    try:
        for _ in MLPERF_METHODS:
            barrier.wait(timeout=600)  # the ranks start writing
            barrier.wait(timeout=600)  # every rank's share is durable
            caches = drop_caches(root / "t4")
            barrier.wait(timeout=600)  # the ranks start reading
            barrier.wait(timeout=600)  # every rank restored
            for _ in range(ranks):
                m, rank, nbytes, write, read = out.get(timeout=60)
                results[m].append((rank, nbytes, write, read))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for p in procs:
        if p.exitcode != 0:
            raise RuntimeError(f"simulated rank {p.name} exited with {p.exitcode}")
    rows = []
    for method, per_rank in results.items():
        per_rank.sort()
        total = sum(n for _, n, _, _ in per_rank)
        writes = [w for _, _, w, _ in per_rank]
        reads = [r for _, _, _, r in per_rank]

        sizes = [n for _, n, _, _ in per_rank]

        rows.append(
            {
                "method": method,
                "ranks": len(per_rank),
                "bytes": total,
                "write_s": max(writes),
                "read_s": max(reads),
                "write_rank_s": writes,
                "read_rank_s": reads,
                "write_gbps": total / max(writes) / 1e9,
                "read_gbps": total / max(reads) / 1e9,
                "write_fastest_gbps": _fastest(sizes, writes) / 1e9,
                "read_fastest_gbps": _fastest(sizes, reads) / 1e9,
            }
        )
    return {"rows": rows, "caches": caches, "ranks": ranks}


FSYNC = {
    "tlreg local tier": "every object + manifest fsynced (`local`)",
    "tlreg shared (S3)": "S3 PUT answered (`committed`)",
    "torch.save": "file + folder fsync",
    "dcp.save": "FileSystemWriter fsyncs each file",
}


def table4(r: dict[str, Any]) -> list[str]:
    lines = [
        f"{HEADINGS[4]}: {r['ranks']} simulated ranks, caches before reads: {r['caches']}",
        "",
        "| method | bytes | fsync | write s | write GB/s | fastest-rank GB/s | read s | "
        "read GB/s | fastest-rank GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['method']} | {row['bytes'] / GiB:.2f} GiB | {FSYNC[row['method']]} | "
            f"{row['write_s']:.2f} | {row['write_gbps']:.2f} | {row['write_fastest_gbps']:.2f} | "
            f"{row['read_s']:.2f} | {row['read_gbps']:.2f} | {row['read_fastest_gbps']:.2f} |"
        )
    return lines


# -- main ---------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=float, default=0.3, help="state of tables 1, 2, 4 in GiB")
    p.add_argument("--reps", type=int, default=3, help="table 1 saves per kind")
    p.add_argument("--restore-rounds", type=int, default=3, help="table 2 reads per tier")
    p.add_argument("--restart-rounds", type=int, default=2, help="table 2b restarts per tier")
    p.add_argument("--train-size", type=float, default=0.2, help="table 3 state in GiB")
    p.add_argument("--step-s", type=float, default=0.5, help="table 3 step time to aim for")
    p.add_argument("--every", type=int, default=5, help="table 3: a local save every N steps")
    p.add_argument(
        "--persist-every", type=int, default=50, help="table 3: shared every M steps (phase)"
    )
    p.add_argument("--rounds", type=int, default=2, help="table 3 checkpointing phases")
    p.add_argument(
        "--drain-bytes-per-s",
        type=float,
        default=None,
        help="table 3: also a row with the drain held to this budget",
    )
    p.add_argument("--ranks", type=int, default=2, help="table 4 simulated ranks")
    p.add_argument("--dir", type=Path, default=None, help="local tier's disk (default: tmp)")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--quick", action="store_true", help="a < 60 s smoke run, not a measurement")
    p.add_argument("--restart-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.reps, args.restore_rounds, args.restart_rounds = 0.02, 1, 1, 1
        args.train_size, args.step_s, args.rounds = 0.01, 0.01, 1
        args.every, args.persist_every = 5, 10
    if args.persist_every % args.every:
        p.error(f"--persist-every {args.persist_every} is not a multiple of --every {args.every}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.restart_child is not None:
        restart_child(json.loads(args.restart_child))
        return 0
    # a SIGTERM unwinds like an exception: the S3 server is stopped, the folders removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="tlreg-tier-bench-", dir=args.dir))
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    try:
        with s3_bucket() as shared:
            print(f"# node-local tier vs shared tier ({results['machine']})\n")
            clock = time.perf_counter()
            t1 = run_t1(args.size, args.reps, shared, root)
            results["t1"] = t1
            results.setdefault("elapsed_s", []).append(time.perf_counter() - clock)
            print("\n".join(table1(t1)) + "\n", flush=True)
            t2 = run_t2(t1, args.restore_rounds, shared, root)
            t2b = run_t2b(t1, args.restart_rounds, shared, root)
            results["t2"], results["t2b"] = t2, t2b
            results.setdefault("elapsed_s", []).append(time.perf_counter() - clock)
            print("\n".join(table2(t2, t2b)) + "\n", flush=True)
            t3 = run_t3(args, shared, root)
            results["t3"] = t3
            results.setdefault("elapsed_s", []).append(time.perf_counter() - clock)
            print("\n".join(table3(t3, args.every)) + "\n", flush=True)
            t4 = run_t4(args.size, args.ranks, shared, root)
            results["t4"] = t4
            results.setdefault("elapsed_s", []).append(time.perf_counter() - clock)
            print("\n".join(table4(t4)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
