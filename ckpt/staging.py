"""Staging: copy a state's tensors into host buffers that the background writer owns.

This is the only work on the training path. Each save gets one *arena*, a flat uint8 host
buffer holding every tensor at a 64-byte aligned offset. Arenas are reused across saves (a
training loop saves the same shapes every time), and a fresh one is pre-faulted so the first
copy does not pay a page fault per 4 KiB. With CUDA tensors the arena is pinned and the
copies run as non-blocking copies on a side stream, ordered after the work already queued on
the caller's stream.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tlreg.ckpt.dtypes import tensor_nbytes

ALIGN = 64
"""Byte alignment of every tensor in an arena and in a pack (cache lines, and any dtype)."""

_GRANULE = 1 << 20  # arenas are sized in MiB steps so slightly different states share them


def align(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def arena_layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Aligned offsets of ``tensors`` in an arena, and the bytes it needs."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = align(end + tensor_nbytes(t))
    return offsets, end


def arena_slice(arena: torch.Tensor, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``arena`` that holds ``tensor``, viewed with its dtype and shape."""
    return arena[offset : offset + tensor_nbytes(tensor)].view(tensor.dtype).view(tensor.shape)


@dataclass
class Event:
    """Where the caller's CUDA streams were when save() was called (the copy waits for it)."""

    events: dict[torch.device, torch.cuda.Event]


class Stager:
    """Owns the arena pool and the CUDA side streams of one checkpointer."""

    def __init__(self, *, keep: int = 4) -> None:
        self._keep = keep
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    # -- arenas -------------------------------------------------------------------------

    def acquire(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        """An arena of at least ``nbytes``: a free one of the same size, else a new one."""
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        with self._lock:
            free = self._free.get((size, pinned))
            if free:
                return free.pop()
        arena = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        if not pinned:
            arena.zero_()  # fault the pages in now, not during the first copy (cudaHostAlloc already did)
        return arena

    def release(self, arena: torch.Tensor) -> None:
        """Give an arena back once the writer is done with it."""
        key = (arena.numel(), arena.is_pinned())
        with self._lock:
            # A state whose size changed will not come back to the old size: drop those arenas.
            for other in [k for k in self._free if k != key]:
                del self._free[other]
            free = self._free.setdefault(key, [])
            if len(free) < self._keep:
                free.append(arena)

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
        for tensor, offset in zip(tensors, offsets, strict=True):
            dst = arena_slice(arena, offset, tensor)
            if tensor.device.type == "cuda":
                on_device.setdefault(tensor.device, []).append((tensor, dst))
            else:
                dst.copy_(tensor)
        streams = []
        for device, pairs in on_device.items():
            stream = self._stream(device)
            if mark is not None and device in mark.events:
                stream.wait_event(mark.events[device])
            with torch.cuda.stream(stream):
                for tensor, dst in pairs:
                    dst.copy_(tensor, non_blocking=True)
            streams.append(stream)
        for stream in streams:
            stream.synchronize()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            return stream
