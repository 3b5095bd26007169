"""Page-cache helpers shared by the benchmarks."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def _files(root: Path) -> Iterator[str]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield os.path.join(dirpath, name)


def evict(root: Path) -> None:
    """Drop every file under ``root`` from the page cache (their pages are clean: every
    method fsyncs), so the next read hits the disk, as after a restart elsewhere."""
    for path in _files(root):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cache(files: Path | Iterable[Path]) -> None:
    """Read ``files`` (or every file under a folder) through the page cache, so the next
    restore finds their bytes there whatever the method's own reads do (tlreg's direct
    reads fill nothing)."""
    paths = _files(files) if isinstance(files, Path) else files
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
