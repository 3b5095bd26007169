"""Hashing: the BLAKE3 digest that names objects and checks tensors, in one place.

Every digest of tlreg (object names, tensor hashes, manifest checksums, shard lists) is the
lowercase hex BLAKE3 of the bytes. Inputs of :data:`MT_HASH_BYTES` and more are hashed with
several threads (same digest, less time); smaller ones on the calling thread, where starting
threads costs more than it saves. This module imports only ``blake3``, so the writer process
(:mod:`tlreg.ckpt.writer`) uses it without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import blake3

MT_HASH_BYTES = 4 << 20
"""From this many bytes on, BLAKE3 hashes with several threads (see docs/performance.md,
"Hashing threads")."""


def hasher(nbytes: int) -> blake3.blake3:
    """An incremental BLAKE3 hasher for ``nbytes`` in all, threaded when that is large."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO if nbytes >= MT_HASH_BYTES else 1)


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex BLAKE3 digest of ``data``."""
    return blake3.blake3(
        data, max_threads=blake3.blake3.AUTO if len(data) >= MT_HASH_BYTES else 1
    ).hexdigest()


def hash_parts(parts: Iterable[memoryview]) -> str:
    """The hex BLAKE3 digest of ``parts`` back to back (no concatenation copy)."""
    views = list(parts)
    h = hasher(sum(len(p) for p in views))
    for part in views:
        h.update(part)
    return h.hexdigest()
