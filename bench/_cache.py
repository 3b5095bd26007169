"""Page-cache helper shared by the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path


def evict(root: Path) -> None:
    """Drop every file under ``root`` from the page cache (their pages are clean: every
    method fsyncs), so the next read hits the disk, as after a restart elsewhere."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cache(root: Path) -> None:
    """Read every file under ``root`` through the page cache, so the next restore finds its
    bytes there whatever the method's own reads do (tlreg's direct reads fill nothing)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while f.read(16 << 20):
                    pass
