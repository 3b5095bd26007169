"""tlreg.ckpt against torch.save, DCP and safetensors on the same state, in one run.

Run: ``.venv/bin/python bench/ckpt_bench.py [--size GiB] [--reps N] [--dir DIR] [--quick]``
(``make bench``). Prints three Markdown tables and the ratios against torch.save:

1. **Save** of an MLP's model + Adam state (``--size`` GiB, default 1.5): the stall (time
   the calling thread is blocked), the stall over a copy of the state into a pre-faulted
   buffer timed just before each save in the same process (the stall's floor), time until
   the bytes are durable (fsynced), throughput as a fraction of ``dd bs=4M conv=fsync`` to
   the same directory (measured here), and the peak extra memory held during the saves
   (``AnonPages + Shmem``, sampled every 2 ms: children and shared memory included, each
   page once). Medians of ``--reps`` saves, with min-max, after one warm-up
   save reported apart (a training loop saves many times; several methods set up buffers
   on the first). Before every save one element of every tensor changes, so nothing dedups.
1b. **Restore** of the checkpoints table 1 left, one per file format, every restore in one
   process, interleaved (``--restore-rounds``, default 3, the order rotated each round):
   ``torch.load(weights_only=True)``, ``dcp.load`` and tlreg's ``load(into=state)`` in
   place, safetensors' ``load_file`` and tlreg's ``load()`` into new tensors; cold (the
   files dropped from the page cache first) and warm (the checkpoint's files read into the
   page cache first), each after glibc's free heap is handed back and twice the state's
   size of memory is touched and freed (see :func:`prime`); the page faults of the warm
   restores are printed too: every method that allocates its tensors takes the same.
2. **Training loop**: a CPU MLP with ``Adam(fused=True)``, a checkpoint every ``k`` steps
   (``--every``, default 10); the per-step slowdown against the same loop without
   checkpoints, plain and checkpointing phases in turn (``--t2-rounds``), each checkpointing
   phase against the plain phases around it.
2b. **Thread vs process writer** (``--writer-rounds``, default 6; ``--only-t2b`` runs just
   this): both ``AsyncCheckpointer`` writers in one process, interleaved round by round;
   per round, plain steps and then the steps right after a save, paired, so that load from
   other processes hits both writers alike.
3. **Frozen backbone**: bytes the second checkpoint adds to the disk when only the head
   trained in between.

``--methods "torch.save,tlreg eager,..."`` runs only those rows of tables 1 and 2 (the rows
include ``tlreg eager (process writer)`` and ``tlreg lazy (process writer)``); ``--no-t3``
skips table 3.

Every method of tables 1 and 2 runs in a fresh Python process (same seed, so the same state):
the memory it adds is its own and no method inherits another's buffers. A cold restore
reads the disk: ``posix_fadvise(DONTNEED)`` drops the method's (fsynced, so clean) files
from the page cache first, as on a node that did not write them; tlreg's direct-I/O writes
leave nothing there anyway. ``--quick`` (a ~0.05 GiB
state, 1 rep, a short loop) runs everything in this process in well under a minute: a smoke
test, not a measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _cache import cache, evict

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.manifest import manifest_key
from tlreg.ckpt.objects import object_prefix

GiB = 1 << 30
WIDTH = 2048

T1_METHODS = [
    "torch.save",
    "dcp.save",
    "dcp.async_save",
    "dcp.async_save(process)",
    "safetensors",
    "tlreg eager",
    "tlreg lazy",
    "tlreg eager (process writer)",
    "tlreg lazy (process writer)",
]
T2_METHODS = T1_METHODS


# -- state --------------------------------------------------------------------------------


def mlp(layers: int, width: int = WIDTH, *, head: int = 0) -> torch.nn.Sequential:
    """``layers`` Linear+ReLU blocks of ``width``, then an optional small head."""
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    if head:
        mods.append(torch.nn.Linear(width, head))
    return torch.nn.Sequential(*mods)


def layers_for(size_gib: float, width: int = WIDTH) -> int:
    """Layers whose parameters + Adam's two moments come to ``size_gib``."""
    per_layer = (width * width + width) * 4 * 3
    return max(1, round(size_gib * GiB / per_layer))


def make_training(size_gib: float, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Adam]:
    """An MLP and a fused Adam that has stepped once, so its moments exist."""
    torch.manual_seed(seed)
    model = mlp(layers_for(size_gib))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    model(torch.randn(8, WIDTH)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def tensors_of(state: Any) -> Iterator[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from tensors_of(v)
    elif isinstance(state, list | tuple):
        for v in state:
            yield from tensors_of(v)


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


def bump(state: Any) -> None:
    """Change one element of every tensor: every save writes new bytes."""
    with torch.no_grad():
        for t in tensors_of(state):
            if t.numel():
                t.view(-1)[:1].add_(1)


def touch(state: Any) -> float:
    """Read one value per 4 KiB page of every tensor, so mmapped loads are paid for."""
    total = 0.0
    for t in tensors_of(state):
        flat = t.reshape(-1).view(torch.uint8)
        if flat.numel():
            total += float(flat[::4096].sum())
    return total


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted.path: tensor}`` for safetensors (which stores a flat dict of tensors)."""
    out: dict[str, torch.Tensor] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, dict | list | tuple):
            out |= flat_tensors(v, name + ".")
    return out


# -- measurement helpers ------------------------------------------------------------------


def memory_in_use() -> int:
    """Bytes of this machine's memory that processes hold: ``AnonPages + Shmem`` of
    /proc/meminfo (private and shared anonymous memory; not the page cache, not the kernel's).

    Every page counts once, whichever processes map it. Summing the RSS of a process and its
    children did not measure the memory a save costs: the staging buffer a writer process
    shares with the trainer counted in both processes, and a child sampled between ``fork``
    and ``exec`` reported its parent's whole RSS (tlreg's process writer: 2.05 x the state,
    or 4.23 x when a sample fell in that window, in the fourth run of 2026-12-07).
    ``MemTotal - MemAvailable`` (tried in the fifth run) counts the kernel's own memory too:
    torch.save, which holds no buffer, showed 0.47 GiB."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["AnonPages"] + fields["Shmem"]


class MemoryPeak:
    """Samples :func:`memory_in_use` every ``interval`` seconds in a thread; ``peak`` is the
    maximum seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = memory_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, memory_in_use())

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory_in_use())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dd_bandwidth(directory: Path, nbytes: int) -> float:
    """Bytes/s of ``dd if=/dev/zero bs=4M count=N conv=fsync`` into ``directory``."""
    target = directory / "dd.bin"
    count = max(1, nbytes // (4 << 20))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - start
    target.unlink()
    return count * (4 << 20) / elapsed


def prefaulted(nbytes: int) -> torch.Tensor:
    """A buffer of ``nbytes`` whose pages are already faulted in."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(0)
    return buf


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def release_free_heap() -> None:
    """Hand the memory that freed tensors left in glibc's heap back to the kernel.

    glibc serves allocations below its (self-raising, up to 32 MiB) mmap threshold from its
    heap and keeps freed heap memory, already faulted in: a restore right after another
    one's tensors were freed reuses those pages and skips ~390k page faults of a 1.5 GiB
    state (0.23 s against 1.0 s for torch.load here). Which restore got them depended on
    the order. A restore in a fresh process, the usual case, finds no such memory; this
    gives every restore that condition. (Not glibc: nothing to do.)"""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def prime(nbytes: int) -> None:
    """Release the free heap (:func:`release_free_heap`), then touch ``nbytes`` of new
    memory and free it. On this VM a page of memory costs a page fault in the host too
    (several µs) unless it was used recently: whichever restore followed one that freed its
    tensors got cheap pages, the next one (after the page cache had taken them) paid.
    Priming before every restore gives each the same, recently used pages, as a machine's
    memory is outside a VM."""
    gc.collect()
    release_free_heap()
    prefaulted(nbytes)


def minor_faults() -> int:
    """Page faults this process has taken so far that needed no disk read."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def copy_once(buf: torch.Tensor, tensors: list[torch.Tensor]) -> float:
    """Seconds to copy ``tensors`` once, back to back, into ``buf`` (the stall's floor)."""
    start = time.perf_counter()
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        buf[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
        offset += n
    return time.perf_counter() - start


def copy_time(state: Any, reps: int) -> float:
    """Median time to copy the state once into a pre-faulted buffer."""
    tensors = list(tensors_of(state))
    buf = prefaulted(state_bytes(state))
    return statistics.median([copy_once(buf, tensors) for _ in range(max(3, reps))])


# -- the methods --------------------------------------------------------------------------


@dataclass
class SaveTiming:
    stall: float
    durable: float


class Method:
    """One way to checkpoint: ``save`` returns a waiter for durability; ``restore`` loads."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.last: Any = None

    def attach(self, opt: torch.optim.Optimizer) -> None:
        """Hook into the optimizer (only lazy tlreg needs it)."""

    def save(self, state: Any) -> Callable[[], None]:
        raise NotImplementedError

    def restore(self, state: Any) -> Any:
        raise NotImplementedError

    def cleanup_before(self, keep: int = 1) -> None:
        """Remove all but the newest ``keep`` checkpoints (outside the timed region)."""

    def close(self) -> None:
        pass

    @classmethod
    def reopen(cls, root: Path, last: str) -> Method:
        """This method on a folder written by another process, its newest checkpoint ``last``
        (as :attr:`last` was there, a path or an id)."""
        method = cls(root)
        method.last = Path(last)
        return method

    def files(self) -> list[Path]:
        """The files of the newest checkpoint (what a warm restore finds in the page cache)."""
        last = Path(self.last)
        return sorted(p for p in last.rglob("*") if p.is_file()) if last.is_dir() else [last]

    def timed_save(self, state: Any) -> SaveTiming:
        start = time.perf_counter()
        wait = self.save(state)
        stall = time.perf_counter() - start
        wait()
        return SaveTiming(stall, time.perf_counter() - start)


class TorchSave(Method):
    name = "torch.save"

    def save(self, state: Any) -> Callable[[], None]:
        self.count += 1
        path = self.root / f"ckpt-{self.count}.pt"
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(self.root)
        self.last = path
        return lambda: None

    def restore(self, state: Any) -> Any:
        return torch.load(self.last, weights_only=True)

    def cleanup_before(self, keep: int = 1) -> None:
        for p in sorted(self.root.glob("ckpt-*.pt"), key=os.path.getmtime)[:-keep]:
            p.unlink()


class Safetensors(Method):
    name = "safetensors"

    def save(self, state: Any) -> Callable[[], None]:
        from safetensors.torch import save_file

        self.count += 1
        path = self.root / f"ckpt-{self.count}.safetensors"
        groups = state.get("optimizer", {}).get("param_groups")
        save_file(flat_tensors(state), str(path), metadata={"param_groups": json.dumps(groups)})
        fsync_path(path)  # save_file does not fsync
        fsync_path(self.root)
        self.last = path
        return lambda: None

    def restore(self, state: Any) -> Any:
        from safetensors.torch import load_file

        return load_file(str(self.last))

    cleanup_before = TorchSave.cleanup_before


class DcpSave(Method):
    name = "dcp.save"

    def _dir(self) -> Path:
        self.count += 1
        self.last = self.root / f"ckpt-{self.count}"
        return self.last

    def save(self, state: Any) -> Callable[[], None]:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=str(self._dir()), no_dist=True)
        return lambda: None

    def restore(self, state: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        dcp.load(state, checkpoint_id=str(self.last), no_dist=True)  # in place, like DCP does
        return state

    def cleanup_before(self, keep: int = 1) -> None:
        for p in sorted(self.root.glob("ckpt-*"), key=os.path.getmtime)[:-keep]:
            shutil.rmtree(p)


class DcpAsync(DcpSave):
    name = "dcp.async_save"
    process = False

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._pending: Any = None

    def save(self, state: Any) -> Callable[[], None]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        if self._pending is not None:  # DCP's docs: one async save in flight at a time
            self._pending.result()
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        future = dcp.async_save(
            state,
            checkpoint_id=str(self._dir()),
            no_dist=not self.process,
            async_checkpointer_type=kind,
        )
        waiter: Any = getattr(future, "upload_completion", future)  # (a response, newer torch)
        self._pending = waiter
        return lambda: waiter.result()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()


class DcpAsyncProcess(DcpAsync):
    """DCP's writer process needs a process group: a one-rank gloo group on a FileStore."""

    name = "dcp.async_save(process)"
    process = True

    def __init__(self, root: Path) -> None:
        import torch.distributed as dist

        super().__init__(root)
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1
            )


class Tlreg(Method):
    lazy = False
    writer = "thread"
    name = "tlreg eager"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ckpt = AsyncCheckpointer(str(root / "store"), lazy=self.lazy, writer=self.writer)

    def attach(self, opt: torch.optim.Optimizer) -> None:
        self.ckpt.attach_optimizer(opt)

    def save(self, state: Any) -> Callable[[], None]:
        pending = self.ckpt.save(state)

        def wait() -> None:
            self.last = pending.result()

        return wait

    def restore(self, state: Any) -> Any:
        with AsyncCheckpointer(self.ckpt.store) as reader:
            return reader.load(self.last, into=state)  # in place, as DCP's row

    def restore_new(self) -> Any:
        """Into new tensors, as torch.load does."""
        with AsyncCheckpointer(self.ckpt.store) as reader:
            return reader.load(self.last)

    @classmethod
    def reopen(cls, root: Path, last: str) -> Method:
        method = super().reopen(root, last)
        method.last = last  # a manifest id, not a path
        return method

    def files(self) -> list[Path]:
        store = self.root / "store"
        manifest = self.ckpt.manifest(self.last)
        out = [store / manifest_key(self.last)]
        for digest in manifest.objects:
            out += sorted(p for p in (store / object_prefix(digest)).rglob("*") if p.is_file())
        return out

    def close(self) -> None:
        self.ckpt.close()


class TlregLazy(Tlreg):
    lazy = True
    name = "tlreg lazy"


class TlregProcess(Tlreg):
    writer = "process"
    name = "tlreg eager (process writer)"


class TlregLazyProcess(Tlreg):
    lazy = True
    writer = "process"
    name = "tlreg lazy (process writer)"


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        TorchSave,
        DcpSave,
        DcpAsync,
        DcpAsyncProcess,
        Safetensors,
        Tlreg,
        TlregLazy,
        TlregProcess,
        TlregLazyProcess,
    )
}


# -- table 1: save and restore ------------------------------------------------------------


def run_t1(method_name: str, size: float, reps: int, root: Path) -> dict[str, Any]:
    """Save the state ``reps`` times (after one warm-up save, reported apart: a training
    loop saves many times, and the first save of several methods sets up buffers), each
    save paired with a copy of the state into a pre-faulted buffer just before it, in this
    process: the stall's floor, measured under the same conditions as the stall. The newest
    checkpoint stays on disk for :func:`run_restore`."""
    model, opt = make_training(size)
    state = state_of(model, opt)
    tensors = list(tensors_of(state))
    buf = prefaulted(state_bytes(state))  # (before the memory baseline: not the method's)
    gc.collect()
    method = METHODS[method_name](root / method_name.replace(" ", "_"))
    base = memory_in_use()
    stalls, durables, copies = [], [], []
    first: SaveTiming | None = None
    try:
        with MemoryPeak() as peak:
            for i in range(reps + 1):
                bump(state)
                copy = copy_once(buf, tensors)
                timing = method.timed_save(state)
                if i == 0:
                    first = timing
                else:
                    copies.append(copy)
                    stalls.append(timing.stall)
                    durables.append(timing.durable)
                method.cleanup_before(keep=1)
    finally:
        method.close()
    assert first is not None
    return {
        "method": method_name,
        "bytes": state_bytes(state),
        "tensors": len(tensors),
        "stall": stalls,
        "durable": durables,
        "copy": copies,
        "first_stall": first.stall,
        "first_durable": first.durable,
        "extra_memory": peak.peak - base,
        "root": str(method.root),
        "last": str(method.last),
    }


RESTORES = {
    # reader label: (the table 1 row whose checkpoint it reads, in place?)
    "torch.load": ("torch.save", False),
    "dcp.load (in place)": ("dcp.save", True),
    "safetensors load_file": ("safetensors", False),
    "tlreg load(into=state) (in place)": ("tlreg eager", True),
    "tlreg load() (new tensors)": ("tlreg eager", False),
}
"""Restores timed in :func:`run_restore`: one per file format (the async and process rows
write the same files as their synchronous row)."""


def run_restore(
    size: float, rounds: int, written: dict[str, list[str]], root: Path
) -> dict[str, dict[str, list[float]]]:
    """Time every restore of :data:`RESTORES` in this one process, interleaved: per round
    each one cold (its files dropped from the page cache), then each one warm (the files of
    its checkpoint read into the page cache first), the order rotated from round to round,
    so that this VM's drifting memory and disk speed hit every method alike; each restore
    after :func:`prime` (twice the state: new tensors and page cache), with the page faults
    it took (``"cold faults"``, ``"warm faults"``). ``written`` maps table 1 rows to the
    (folder, newest checkpoint) they left."""
    model, opt = make_training(size)
    state = state_of(model, opt)
    methods = {name: METHODS[name].reopen(Path(r), last) for name, (r, last) in written.items()}
    loads: list[tuple[str, Method, Callable[[], Any]]] = []
    for label, (name, in_place) in RESTORES.items():
        method = methods.get(name)
        if method is None:
            continue
        if isinstance(method, Tlreg) and not in_place:
            load: Callable[[], Any] = method.restore_new
        else:  # (torch.load and load_file ignore the state)
            load = functools.partial(method.restore, state)
        loads.append((label, method, load))
    files = {label: method.files() for label, method, _ in loads}
    nbytes = state_bytes(state)
    times: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in loads}
    try:
        for r in range(rounds):
            order = loads[r % len(loads) :] + loads[: r % len(loads)]
            for warm in (False, True):
                for label, method, load in order:
                    evict(method.root)
                    if warm:
                        cache(files[label])
                    prime(2 * nbytes)
                    faults = minor_faults()
                    start = time.perf_counter()
                    restored = load()
                    touch(restored)  # a lazy (mmap) load must really read the bytes too
                    elapsed = time.perf_counter() - start
                    kind = "warm" if warm else "cold"
                    times[label].setdefault(kind, []).append(elapsed)
                    times[label].setdefault(f"{kind} faults", []).append(minor_faults() - faults)
                    del restored
    finally:
        for method in methods.values():
            method.close()
    return times


# -- table 2: training loop ---------------------------------------------------------------


def run_t2(
    method_name: str, size: float, steps: int, every: int, batch: int, rounds: int, root: Path
) -> dict:
    """Phases of ``steps`` steps, plain and checkpointing (one save every ``every`` steps, the
    last waited for inside the phase) in turn: P C P C ... P, ``rounds`` checkpointing phases.
    Each checkpointing phase is paired with the mean of the plain phases on either side of
    it, taken seconds apart, so load from other processes on the machine mostly cancels; the
    slowdown is the median over rounds of (checkpointing / plain - 1)."""
    model, opt = make_training(size, seed=1)
    state = state_of(model, opt)
    x = torch.randn(batch, WIDTH)
    method = METHODS[method_name](root / "t2")
    method.attach(opt)

    def step() -> None:
        opt.zero_grad(set_to_none=False)  # steady state: gradients stay allocated
        model(x).square().mean().backward()
        opt.step()

    def loop(checkpoint: bool) -> tuple[float, list[float]]:
        stalls = []
        waits: list[Callable[[], None]] = []
        start = time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if checkpoint and i % every == 0 and i + every <= steps:
                t0 = time.perf_counter()
                waits.append(method.save(state))
                stalls.append(time.perf_counter() - t0)
        for wait in waits:
            wait()
        return (time.perf_counter() - start) / steps, stalls

    plain: list[float] = []
    during: list[float] = []
    stalls: list[float] = []
    try:
        for _ in range(2):  # warm-up: allocator, threads
            step()
        plain.append(loop(False)[0])
        for _ in range(rounds):
            step_s, round_stalls = loop(True)
            during.append(step_s)
            stalls += round_stalls
            plain.append(loop(False)[0])
    finally:
        method.close()
        shutil.rmtree(method.root, ignore_errors=True)
    return {
        "method": method_name,
        "bytes": state_bytes(state),
        "steps": steps,
        "checkpoints": len(stalls),
        "plain_s": plain,
        "step_s": during,
        "stall": stalls,
    }


def calibrate_batch(size: float, target_s: float) -> int:
    """A batch for which a training step takes about ``target_s`` here (linear fit)."""
    model, opt = make_training(size, seed=1)

    def step_time(b: int) -> float:
        x = torch.randn(b, WIDTH)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    lo, hi = 16, 256
    t_lo, t_hi = step_time(lo), step_time(hi)
    per_sample = max((t_hi - t_lo) / (hi - lo), 1e-6)
    return max(8, min(8192, round(lo + (target_s - t_lo) / per_sample)))


# -- table 2b: writer interference, interleaved -------------------------------------------


def run_writers(size: float, steps: int, rounds: int, batch: int, root: Path) -> list[dict]:
    """The thread and the process writer in one process, interleaved: per round and writer,
    ``steps`` plain training steps, then a save and ``steps`` steps while it persists (timed
    from after ``save()`` returns, so the eager copy is not counted). Adjacent plain and
    checkpointing phases pair up, and the writers alternate, so load from other processes
    hits both alike; the slowdown is the median over rounds of (during / plain - 1)."""
    model, opt = make_training(size, seed=1)
    state = state_of(model, opt)
    x = torch.randn(batch, WIDTH)
    writers = ("thread", "process")
    ckpts = {w: AsyncCheckpointer(str(root / f"t2b-{w}"), writer=w) for w in writers}

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()

    def timed(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n

    rows: dict[str, dict[str, Any]] = {
        w: {"plain": [], "during": [], "stall": [], "durable": [], "late": 0} for w in writers
    }
    try:
        for w in writers:  # warm-up: arenas, the writer process
            ckpts[w].save(state).result()
        step()
        for r in range(rounds):
            for w in writers if r % 2 == 0 else writers[::-1]:
                row = rows[w]
                row["plain"].append(timed(steps))
                t0 = time.perf_counter()
                pending = ckpts[w].save(state)
                row["stall"].append(time.perf_counter() - t0)
                row["during"].append(timed(steps))
                row["late"] += not pending.done()  # still persisting after the timed steps
                pending.result()
                row["durable"].append(time.perf_counter() - t0)
    finally:
        for c in ckpts.values():
            c.close()
        shutil.rmtree(root / "t2b-thread", ignore_errors=True)
        shutil.rmtree(root / "t2b-process", ignore_errors=True)
    return [
        {"method": f"tlreg eager ({w} writer)", "bytes": state_bytes(state), **rows[w]}
        for w in writers
    ]


def table2b(rows: list[dict]) -> list[str]:
    out = [
        "| writer | step s, plain | step s, while persisting | slowdown, median (min-max) "
        "| stall s | durable s | rounds still persisting after the timed steps |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratios = [d / p - 1 for d, p in zip(r["during"], r["plain"], strict=True)]
        out.append(
            f"| {r['method']} | {med(r['plain']):.3f} | {med(r['during']):.3f} "
            f"| {med(ratios):+.1%} ({min(ratios):+.1%} to {max(ratios):+.1%}) "
            f"| {spread(r['stall'], fmt='{:.3f}')} | {spread(r['durable'])} "
            f"| {r['late']} of {len(ratios)} |"
        )
    return out


# -- table 3: frozen backbone -------------------------------------------------------------


def run_t3(size: float, root: Path) -> list[dict[str, Any]]:
    torch.manual_seed(2)
    model = mlp(layers_for(size / 3), head=10)  # backbone of size/3 GiB of weights
    backbone, head = model[:-1], model[-1]
    backbone.requires_grad_(False)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    x = torch.randn(64, WIDTH)

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()

    train(1)
    rows = []
    for name in ("torch.save", "dcp.save", "safetensors", "tlreg eager"):
        method = METHODS[name](root / f"t3-{name.replace(' ', '_')}")
        try:
            state = state_of(model, opt)
            method.timed_save(state)
            before = dir_bytes(method.root)
            train(3)
            timing = method.timed_save(state_of(model, opt))
            added = dir_bytes(method.root) - before
        finally:
            method.close()
            shutil.rmtree(method.root, ignore_errors=True)
        rows.append(
            {
                "method": name,
                "bytes": state_bytes(state),
                "head_bytes": state_bytes({"h": list(head.parameters()), "o": opt.state_dict()}),
                "second": added,
                "durable": timing.durable,
            }
        )
    return rows


# -- orchestration ------------------------------------------------------------------------


def in_subprocess(args: list[str]) -> Any:
    """Run this script's worker mode in a fresh interpreter; its JSON result, or an error."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def worker(args: list[Any]) -> Any:
    kind, *rest = args
    root = Path(rest[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "t1":
            return run_t1(rest[0], rest[1], rest[2], root)
        if kind == "restore":
            return run_restore(rest[0], rest[1], rest[2], root)
        if kind == "t2":
            return run_t2(rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], root)
        if kind == "t3":
            return run_t3(rest[0], root)
        if kind == "t2b":
            return run_writers(rest[0], rest[1], rest[2], rest[3], root)
    raise ValueError(kind)


def call(args: list[Any], isolated: bool) -> Any:
    if isolated:
        return in_subprocess(args)
    try:
        return worker(args)
    except Exception as e:  # a peer that does not work here is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float], unit: float = 1.0, fmt: str = "{:.2f}") -> str:
    m = fmt.format(med(xs) * unit)
    if len(xs) < 2:
        return m
    return f"{m} ({fmt.format(min(xs) * unit)}-{fmt.format(max(xs) * unit)})"


def paired(r: dict) -> list[float]:
    """Each save's stall over the copy of the state timed just before it."""
    return [stall / copy for stall, copy in zip(r["stall"], r["copy"], strict=True)]


def table1(rows: list[dict], dd: float) -> list[str]:
    out = [
        "| method | stall s | stall / copy | durable s | throughput / dd | peak extra memory GiB "
        "| 1st save: stall s, durable s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        thr = r["bytes"] / med(r["durable"]) / dd
        out.append(
            f"| {r['method']} | {spread(r['stall'], fmt='{:.3f}')} "
            f"| {spread(paired(r), fmt='{:.3f}')} | {spread(r['durable'])} "
            f"| {thr:.0%} | {r['extra_memory'] / GiB:.2f} "
            f"| {r['first_stall']:.3f}, {r['first_durable']:.2f} |"
        )
    return out


def table1b(times: dict[str, dict[str, list[float]]]) -> list[str]:
    out = [
        "| restore | cold s | / torch.load | warm s | / torch.load | page faults, warm |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ref = times.get("torch.load", {})
    for label, t in times.items():
        cells = []
        for kind in ("cold", "warm"):
            xs = t[kind]
            base = ref.get(kind)
            cells += [spread(xs, fmt="{:.3f}"), f"{med(xs) / med(base):.2f}x" if base else ""]
        faults = t.get("warm faults")
        cells.append(f"{med(faults) / 1e3:.0f}k" if faults else "")
        out.append(f"| {label} | {' | '.join(cells)} |")
    return out


def ratios1(rows: list[dict], copy_s: float, dd: float) -> list[str]:
    ok = {r["method"]: r for r in rows if "error" not in r}
    ref = ok.get("torch.save")
    if ref is None:
        return ["torch.save failed: no ratios"]
    ts = med(ref["durable"])
    out = [
        f"in-memory copy of the state (pre-faulted buffer), at the start: {copy_s:.3f} s; "
        f"dd: {dd / 1e9:.2f} GB/s"
    ]
    for name, r in ok.items():
        if not name.startswith("tlreg"):
            continue
        stall = med(r["stall"])
        out.append(
            f"{name}: stall = {med(paired(r)):.3f} x the copy before it "
            f"({stall / copy_s:.3f} x the copy at the start); torch.save durable / stall = "
            f"{ts / stall:.0f} (at a stall of exactly one copy: {ts / med(r['copy']):.1f}); "
            f"durable = {med(r['durable']) / ts:.2f} x torch.save; "
            f"extra memory = {r['extra_memory'] / r['bytes']:.2f} x state"
        )
    for name, r in ok.items():
        if not name.startswith("tlreg") and name != "torch.save":
            out.append(
                f"{name}: stall {med(r['stall']) / ts:.2f} x, durable "
                f"{med(r['durable']) / ts:.2f} x torch.save's"
            )
    return out


def t2_slowdowns(r: dict) -> list[float]:
    """Per round: the checkpointing phase against the mean of the plain phases around it."""
    plain = r["plain_s"]
    return [d / ((plain[i] + plain[i + 1]) / 2) - 1 for i, d in enumerate(r["step_s"])]


def table2(rows: list[dict]) -> list[str]:
    out = [
        "| method | step s, no checkpoints | step s, checkpointing | slowdown, median (min-max) "
        "| checkpoints | stall per checkpoint s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        ratios = t2_slowdowns(r)
        out.append(
            f"| {r['method']} | {spread(r['plain_s'], fmt='{:.3f}')} "
            f"| {spread(r['step_s'], fmt='{:.3f}')} "
            f"| {med(ratios):+.1%} ({min(ratios):+.1%} to {max(ratios):+.1%}) "
            f"| {r['checkpoints']} | {spread(r['stall'], fmt='{:.3f}')} |"
        )
    return out


def table3(rows: list[dict]) -> list[str]:
    out = [
        "| method | state GiB | trainable (head + Adam) MiB | 2nd checkpoint writes MiB "
        "| vs torch.save | 2nd durable s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ref = next(r for r in rows if r["method"] == "torch.save")
    for r in rows:
        out.append(
            f"| {r['method']} | {r['bytes'] / GiB:.2f} | {r['head_bytes'] / 2**20:.2f} "
            f"| {r['second'] / 2**20:.2f} | {r['second'] / ref['second']:.4f} "
            f"| {r['durable']:.2f} |"
        )
    return out


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=1.5, help="table 1 state in GiB")
    parser.add_argument("--reps", type=int, default=3, help="saves per method in table 1")
    parser.add_argument(
        "--restore-rounds", type=int, default=3, help="table 1b rounds of every restore"
    )
    parser.add_argument("--train-size", type=float, default=0.75, help="table 2 state, GiB")
    parser.add_argument("--steps", type=int, default=20, help="table 2 steps per phase")
    parser.add_argument("--every", type=int, default=10, help="table 2 checkpoint interval")
    parser.add_argument(
        "--t2-rounds", type=int, default=2, help="table 2 checkpointing phases per method"
    )
    parser.add_argument("--step-s", type=float, default=0.7, help="table 2 target step time")
    parser.add_argument("--frozen-size", type=float, default=0.5, help="table 3 state, GiB")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="small, 1 rep, in-process")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated rows of tables 1-2 to run (default: all), e.g. "
        "'torch.save,tlreg eager,tlreg eager (process writer)'",
    )
    parser.add_argument("--no-t1", action="store_true", help="skip table 1")
    parser.add_argument("--no-t3", action="store_true", help="skip table 3")
    parser.add_argument(
        "--writer-rounds",
        type=int,
        default=6,
        help="table 2b: interleaved rounds of the thread vs the process writer (0: skip)",
    )
    parser.add_argument("--only-t2b", action="store_true", help="run table 2b only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    t1_methods, t2_methods = T1_METHODS, T2_METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
        t1_methods = t2_methods = wanted

    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.size, args.reps, args.train_size, args.steps, args.every = 0.05, 1, 0.02, 6, 2
        args.t2_rounds = args.restore_rounds = 1
        args.writer_rounds = min(args.writer_rounds, 2)
        args.step_s, args.frozen_size = 0.15, 0.05
    if args.every < 1 or args.steps < 2 * args.every:
        # a checkpoint is taken only where `every` more steps follow it, inside the timed loop
        parser.error(
            f"--steps {args.steps} --every {args.every}: table 2 checkpoints only where "
            "--every more steps follow; use --steps of at least twice --every"
        )
    isolated = not args.quick
    root = Path(tempfile.mkdtemp(prefix="tlreg-bench-", dir=args.dir))
    free = shutil.disk_usage(root).free
    need = (args.size * (args.reps + 6) + args.train_size * 3) * GiB
    if free < need:
        sys.exit(f"{root}: {free / GiB:.1f} GiB free, the benchmark needs ~{need / GiB:.0f}")
    results: dict[str, Any] = {"machine": machine(), "dir": str(root)}
    print(f"# tlreg checkpoint benchmark\n\n{results['machine']}; writing to {root}\n")
    try:
        if not args.only_t2b and not args.no_t1:
            model, opt = make_training(args.size)
            state = state_of(model, opt)
            nbytes = state_bytes(state)
            copy_s = copy_time(state, args.reps)
            del model, opt, state
            gc.collect()
            dd = dd_bandwidth(root, nbytes)
            results |= {"dd": dd, "copy_s": copy_s}

            t1 = []
            sources = {name for name, _ in RESTORES.values()}
            for name in t1_methods:
                print(f"table 1: {name} ...", file=sys.stderr, flush=True)
                row = call(["t1", name, args.size, args.reps, str(root)], isolated)
                t1.append(row | {"method": name})
                if name not in sources and "root" in row:
                    shutil.rmtree(row["root"], ignore_errors=True)
            results["t1"] = t1
            written = {
                r["method"]: [r["root"], r["last"]]
                for r in t1
                if "error" not in r and r["method"] in sources
            }
            print("table 1b: restores ...", file=sys.stderr, flush=True)
            restores = call(
                ["restore", args.size, args.restore_rounds, written, str(root)], isolated
            )
            results["restore"] = restores
            for folder, _ in written.values():
                shutil.rmtree(folder, ignore_errors=True)
            lines = [
                f"## 1. Save: {nbytes / GiB:.2f} GiB state "
                f"(MLP {layers_for(args.size)}x{WIDTH}² + Adam), median (min-max) of "
                f"{args.reps} saves after a warm-up save; each save paired with a copy of the "
                f"state timed just before it; dd bs=4M conv=fsync: {dd / 1e9:.2f} GB/s",
                "",
                *table1(t1, dd),
                "",
                *ratios1(t1, copy_s, dd),
                "",
                f"## 1b. Restore: the same checkpoints, every restore in one process, "
                f"interleaved, median (min-max) of {args.restore_rounds} rounds "
                f"({machine()} now)",
                "",
                *([f"failed: {restores['error']}"] if "error" in restores else table1b(restores)),
                "",
            ]
            print("\n".join(lines), flush=True)

        batch = calibrate_batch(args.train_size, args.step_s)
        if not args.only_t2b:
            t2 = []
            for name in t2_methods:
                print(f"table 2: {name} ...", file=sys.stderr, flush=True)
                row = call(
                    [
                        "t2",
                        name,
                        args.train_size,
                        args.steps,
                        args.every,
                        batch,
                        args.t2_rounds,
                        str(root),
                    ],
                    isolated,
                )
                t2.append(row | {"method": name})
            results["t2"] = t2
            t2_bytes = next((r["bytes"] for r in t2 if "bytes" in r), 0)
            lines = [
                f"## 2. Training loop: MLP {layers_for(args.train_size)}x{WIDTH}², "
                f"Adam(fused=True), {t2_bytes / GiB:.2f} GiB state, batch {batch}, "
                f"phases of {args.steps} steps, plain and with a checkpoint every "
                f"{args.every} (the last one waited for) in turn, {args.t2_rounds} "
                "checkpointing phases each paired with the plain phases around it",
                "",
                *table2(t2),
                "",
            ]
            print("\n".join(lines), flush=True)

        if args.writer_rounds:
            print("table 2b: thread vs process writer ...", file=sys.stderr, flush=True)
            start_load = machine()
            t2b = call(
                ["t2b", args.train_size, args.every, args.writer_rounds, batch, str(root)],
                isolated,
            )
            results["t2b"] = t2b
            if isinstance(t2b, dict):
                print(f"## 2b. Thread vs process writer: failed: {t2b['error']}")
            else:
                lines = [
                    f"## 2b. Thread vs process writer, interleaved in one process: "
                    f"{t2b[0]['bytes'] / GiB:.2f} GiB state, batch {batch}, {args.every} "
                    f"steps timed right after each save, {args.writer_rounds} rounds "
                    f"({start_load} at the start)",
                    "",
                    *table2b(t2b),
                    "",
                ]
                print("\n".join(lines), flush=True)

        if not args.no_t3 and not args.only_t2b:
            print("table 3 ...", file=sys.stderr, flush=True)
            t3 = call(["t3", args.frozen_size, str(root)], isolated)
            results["t3"] = t3
            if isinstance(t3, dict):
                print(f"## 3. Frozen backbone: failed: {t3['error']}")
            else:
                print("## 3. Frozen backbone: bytes added by the second checkpoint\n")
                print("\n".join(table3(t3)))
        results["machine_after"] = machine()
        print(f"\n{results['machine_after']} (at the end)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
