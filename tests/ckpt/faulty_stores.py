"""Stores that inject faults, importable by the writer process (no torch, no pytest)."""

from __future__ import annotations

import threading
import time
from typing import Any

from tlreg.storage_backends import LocalStore


class FailingStore(LocalStore):
    """Fails the ``fail_at``-th chunk put, and sleeps ``delay`` s before each put.

    It pickles as itself (``LocalStore`` pickles as a plain ``LocalStore``), so that the
    writer process, which imports this module, injects the same faults.
    """

    def __init__(self, root: str, fail_at: int = -1, delay: float = 0.0) -> None:
        super().__init__(root)
        self.fail_at = fail_at
        self.delay = delay
        self.chunk_puts = 0
        self.lock = threading.Lock()

    def __reduce__(self) -> tuple[object, ...]:
        return (FailingStore, (str(self.root), self.fail_at, self.delay))

    def put(self, key: str, data: Any) -> None:
        time.sleep(self.delay)
        if "/c/" in key:
            with self.lock:
                self.chunk_puts += 1
                fail = self.chunk_puts == self.fail_at
            if fail:
                raise OSError(28, f"injected: no space left writing {key}")
        super().put(key, data)
