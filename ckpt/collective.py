"""The ranks that save one checkpoint together, and the two exchanges a save needs.

A collective checkpointer creates its own gloo process group when it is constructed (that
call is collective), and uses it only from its persist thread: training keeps the default
group (NCCL or gloo, DDP's all-reduces) to itself, and the saves, which every rank starts in
the same order, exchange in the same order on every rank. Payloads are JSON bytes sent as
uint8 tensors: nothing is pickled.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class Collective:
    """A private gloo group over the ranks of ``process_group``.

    Must be constructed on every rank of ``process_group`` (and, when it is a subgroup,
    creating the private group needs only its members).
    """

    def __init__(self, process_group: dist.ProcessGroup, *, timeout: timedelta | None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first"
            )
        ranks = dist.get_process_group_ranks(process_group)
        self.rank = dist.get_rank(process_group)
        self.world = len(ranks)
        subgroup = self.world != dist.get_world_size()
        self.group = dist.new_group(
            ranks=ranks,
            backend="gloo",
            timeout=timeout,
            use_local_synchronization=subgroup,
        )

    def __repr__(self) -> str:
        return f"<Collective rank {self.rank} of {self.world}>"

    def gather(self, payload: bytes) -> list[bytes] | None:
        """Every rank's ``payload`` on rank 0 (in rank order); None on the other ranks."""
        length = torch.tensor([len(payload)], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(lengths, length, group=self.group)
        sizes = [int(n.item()) for n in lengths]
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        if self.rank == 0:
            bufs = [torch.empty_like(buf) for _ in range(self.world)]
            dist.gather(buf, bufs, group=self.group, group_dst=0)
            return [b[:n].numpy().tobytes() for b, n in zip(bufs, sizes, strict=True)]
        dist.gather(buf, None, group=self.group, group_dst=0)
        return None

    def broadcast(self, payload: bytes | None) -> bytes:
        """Rank 0's ``payload`` on every rank (the others pass None)."""
        length = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist.broadcast(length, group=self.group, group_src=0)
        buf = torch.zeros(int(length.item()), dtype=torch.uint8)
        if payload:
            buf[:] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist.broadcast(buf, group=self.group, group_src=0)
        return buf.numpy().tobytes()

    def close(self) -> None:
        """Destroy the private group (unless torch.distributed was shut down already)."""
        if dist.is_initialized():
            dist.destroy_process_group(self.group)
