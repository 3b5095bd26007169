"""A ``tlreg gc`` that SIGKILLs itself at a chosen step, to test that a repack is crash-safe.

``python repacker.py REGISTRY_URL STORE KILL_AT`` runs ``collect_garbage(keep_last=1,
grace=0)`` (repacking at the default 5%) and counts every store write and delete and every
registry call of the protocol; at call number ``KILL_AT`` it sends itself SIGKILL, so the
process dies between two steps exactly as a killed node would. It prints ``ops N`` and
``done`` when it was not killed.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from typing import Any


def main(argv: list[str]) -> None:
    from tlreg.registry import Registry
    from tlreg.storage_backends import open_store
    from tlreg.training.gc import collect_garbage

    registry_url, store_url, kill_at = argv[0], argv[1], int(argv[2])
    registry = Registry(registry_url)
    store = open_store(store_url)
    ops = 0

    def counted(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal ops
            ops += 1
            if ops == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, call)

    for name in ("put", "delete"):
        counted(store, name)
    for name in ("apply_gc", "forget_objects", "relocate"):
        counted(registry, name)
    collect_garbage(registry, store, keep_last=1, grace=timedelta(0))
    print(f"ops {ops}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
