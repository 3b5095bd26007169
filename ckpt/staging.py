"""Staging: copy a state's tensors into host buffers that the background writer owns.

This is the only work on the training path. Each save gets one *arena*, a flat uint8 host
buffer holding every tensor at a 64-byte aligned offset. Arenas are reused across saves (a
training loop saves the same shapes every time), and a fresh one is pre-faulted so the first
copy does not pay a page fault per 4 KiB. With CUDA tensors the arena is pinned and the
copies run as non-blocking copies on a side stream, ordered after the work already queued on
the caller's stream.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from tlreg.ckpt.dtypes import tensor_nbytes

ALIGN = 64
"""Byte alignment of every tensor in an arena and in a pack (cache lines, and any dtype)."""
PAGE = 4096
"""Alignment of an arena's start and of its large tensors, so that a direct-I/O store
(``LocalStore(direct_io=True)``) writes them from the arena without a bounce copy."""
PAGE_ALIGN_BYTES = 1 << 20  # tensors this large start on a page (costs < 0.4% of them)

_GRANULE = 1 << 20  # arenas are sized in MiB steps so slightly different states share them
_FAN_OUT_BYTES = 8 << 20  # below this a state is copied on the calling thread


def align(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def place(end: int, nbytes: int) -> int:
    """Where a tensor of ``nbytes`` goes in an arena filled up to ``end``: the next
    :data:`ALIGN` boundary, or the next :data:`PAGE` boundary for a large tensor."""
    if nbytes >= PAGE_ALIGN_BYTES:
        return -(-end // PAGE) * PAGE
    return align(end)


def page_aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` starting on a :data:`PAGE` boundary
    (torch's allocator aligns to 64 bytes), so direct I/O can read into it."""
    block = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    shift = -block.data_ptr() % PAGE
    return block[shift : shift + nbytes]


def arena_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned offsets of ``tensors`` in an arena, and the bytes it needs."""
    offsets, end = [], 0
    for t in tensors:
        nbytes = tensor_nbytes(t)
        offsets.append(place(end, nbytes))
        end = align(offsets[-1] + nbytes)
    return offsets, end


def arena_slice(arena: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``arena`` that holds ``tensor``, viewed with its dtype and shape."""
    return arena[offset : offset + tensor_nbytes(tensor)].view(tensor.dtype).view(tensor.shape)


class Arenas(Protocol):
    """Where arenas come from when they must be shared with another process."""

    def new(self, nbytes: int) -> torch.Tensor:
        """A new uint8 tensor of ``nbytes`` in shared memory."""

    def name(self, arena: torch.Tensor) -> str:
        """The name another process opens ``arena`` by."""

    def drop(self, arena: torch.Tensor) -> str | None:
        """Release ``arena``'s shared memory; returns its name."""

    def drop_all(self) -> list[str]:
        """Release every arena still allocated; returns their names."""


@dataclass
class Event:
    """Where the caller's CUDA streams were when save() was called (the copy waits for it)."""

    events: dict[torch.device, torch.cuda.Event]


class Stager:
    """Owns the arena pool, the copy threads and the CUDA side streams of one checkpointer.

    Host copies run on ``threads`` copy threads, each taking a contiguous share of the
    tensors by bytes (why not ATen's own parallel copy: docs/performance.md, "Staging copies").
    """

    def __init__(
        self,
        *,
        keep: int = 4,
        threads: int | None = None,
        shared: Arenas | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self._keep = keep
        self._shared = shared
        self._on_drop = on_drop
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tlreg-ckpt-copy")

    def close(self) -> None:
        """Stop the copy threads and drop the free arenas."""
        self._pool.shutdown()
        with self._lock:
            self._free.clear()
        if self._shared is not None:
            self._shared.drop_all()

    def _drop(self, arena: torch.Tensor) -> None:
        if self._shared is not None:
            name = self._shared.drop(arena)
            if name is not None and self._on_drop is not None:
                self._on_drop(name)

    # -- arenas -------------------------------------------------------------------------

    def acquire(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        """An arena of at least ``nbytes``: a free one of the same size, else a new one."""
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        with self._lock:
            free = self._free.get((size, pinned))
            if free:
                return free.pop()
        if self._shared is not None:
            # (not pinned: a writer process reads it, and CUDA copies into pageable memory
            # are correct, only synchronous)
            arena = self._shared.new(size)
        elif pinned:
            arena = torch.empty(size, dtype=torch.uint8, pin_memory=True)  # page-aligned
        else:
            arena = page_aligned_empty(size)
        if not arena.is_pinned():  # (cudaHostAlloc faults pinned pages in itself)
            # fault the pages in now, not during the first copy; on the copy threads
            step = -(-size // self._threads)
            parts = [arena[i : i + step] for i in range(0, size, step)]
            for future in [self._pool.submit(torch.Tensor.zero_, part) for part in parts]:
                future.result()
        return arena

    def release(self, arena: torch.Tensor) -> None:
        """Give an arena back once the writer is done with it."""
        key = (arena.numel(), arena.is_pinned())
        dropped: list[torch.Tensor] = []
        with self._lock:
            # A state whose size changed will not come back to the old size: drop those arenas.
            for other in [k for k in self._free if k != key]:
                dropped += self._free.pop(other)
            free = self._free.setdefault(key, [])
            if len(free) < self._keep:
                free.append(arena)
            else:
                dropped.append(arena)
        for old in dropped:
            self._drop(old)

    def scratch(self, nbytes: int) -> torch.Tensor:
        """A one-off buffer of ``nbytes``, shared like the arenas; give it to :meth:`discard`."""
        if self._shared is not None:
            return self._shared.new(max(nbytes, 1))
        return torch.empty(nbytes, dtype=torch.uint8)

    def discard(self, buffer: torch.Tensor) -> None:
        """Free a buffer from :meth:`scratch`."""
        self._drop(buffer)

    def segment(self, arena: torch.Tensor) -> str:
        """The shared-memory name of an arena (only with ``shared``)."""
        if self._shared is None:
            raise ValueError("arenas are not shared")
        return self._shared.name(arena)

    # -- copies -------------------------------------------------------------------------

    @staticmethod
    def mark(tensors: Sequence[torch.Tensor]) -> Event | None:
        """Record the caller's current CUDA streams (call on the caller's thread)."""
        devices = {t.device for t in tensors if t.device.type == "cuda"}
        if not devices:
            return None
        events = {}
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events[device] = event
        return Event(events)

    def copy(
        self,
        tensors: Sequence[torch.Tensor],
        offsets: Sequence[int],
        arena: torch.Tensor,
        mark: Event | None,
    ) -> None:
        """Copy every tensor into ``arena``; returns when the copies are complete."""
        on_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        on_host: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor, offset in zip(tensors, offsets, strict=True):
            dst = arena_slice(arena, offset, tensor)
            if tensor.device.type == "cuda":
                on_device.setdefault(tensor.device, []).append((tensor, dst))
            else:
                on_host.append((tensor, dst))
        streams = []
        for device, pairs in on_device.items():
            stream = self._stream(device)
            if mark is not None and device in mark.events:
                stream.wait_event(mark.events[device])
            with torch.cuda.stream(stream), torch.no_grad():
                for tensor, dst in pairs:
                    dst.copy_(tensor, non_blocking=True)
            streams.append(stream)
        self._copy_host(on_host)
        for stream in streams:
            stream.synchronize()

    def _copy_host(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        total = sum(tensor_nbytes(dst) for _, dst in pairs)
        if total < _FAN_OUT_BYTES or self._threads == 1:
            _copy_all(pairs)
            return
        share, groups, start, acc = -(-total // self._threads), [], 0, 0
        for i, (_, dst) in enumerate(pairs):
            acc += tensor_nbytes(dst)
            if acc >= share:
                groups.append(pairs[start : i + 1])
                start, acc = i + 1, 0
        groups.append(pairs[start:])
        for future in [self._pool.submit(_copy_all, group) for group in groups if group]:
            future.result()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            return stream


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():  # a parameter (state_dict(keep_vars=True)) must not make dst a graph node
        for src, dst in pairs:
            dst.copy_(src)
