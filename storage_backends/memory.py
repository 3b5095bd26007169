"""An in-process store, for tests and scratch work."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from tlreg.storage_backends.base import Data, Store, as_parts, check_key, check_prefix
from tlreg.storage_backends.errors import ObjectNotFound


class MemoryStore(Store):
    """Objects in a dict owned by this instance.

    Every ``open_store("memory://...")`` is a new, empty store; pickling copies the contents
    (a worker process gets a snapshot, not a shared view).
    """

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        with self._lock:
            return {"url": self.url, "objects": dict(self._objects)}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.url = str(state["url"])
        self._objects = dict(state["objects"])  # type: ignore[call-overload]
        self._lock = threading.Lock()

    def _read(self, key: str) -> bytes:
        try:
            return self._objects[check_key(key)]
        except KeyError:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    # docstring inherited
    def put(self, key: str, data: Data) -> None:
        blob = b"".join(as_parts(data))
        with self._lock:
            self._objects[check_key(key)] = blob

    # docstring inherited
    def get(self, key: str) -> bytes:
        return self._read(key)

    # docstring inherited
    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._read(key)[start : start + length]

    # docstring inherited
    def exists(self, key: str) -> bool:
        return check_key(key) in self._objects

    # docstring inherited
    def size(self, key: str) -> int:
        return len(self._read(key))

    # docstring inherited
    def list(self, prefix: str = "") -> Iterator[str]:
        with self._lock:
            keys = list(self._objects)
        folder = check_prefix(prefix)
        p = folder + "/" if folder else ""
        yield from (k for k in keys if k.startswith(p))

    # docstring inherited
    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)
