"""The store contract: a flat namespace of immutable objects addressed by '/'-separated keys.

Backends implement a handful of primitives; everything else (JSON helpers, put-if-absent,
reading into a caller's buffer) is derived here so that every backend behaves the same.
The API is synchronous: the checkpoint pipeline calls it from its own writer threads.
"""

from __future__ import annotations

import abc
import json
import posixpath
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, TypeAlias

from tlreg.storage_backends.credentials import without_password
from tlreg.storage_backends.errors import InvalidKey

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Anything exposing the buffer protocol as one contiguous block of bytes."""

Data: TypeAlias = Buffer | Sequence[Buffer]
"""One buffer, or several written back to back as a single object (no concatenation copy)."""


def as_parts(data: Data) -> list[memoryview]:
    """Normalise ``data`` to a list of flat byte views."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [memoryview(data).cast("B")]
    return [memoryview(part).cast("B") for part in data]


def check_key(key: str) -> str:
    """Return ``key`` if it is a normalised relative path, else raise :class:`InvalidKey`."""
    if (
        not key
        or key.startswith("/")
        or key.endswith("/")
        or posixpath.normpath(key) != key
        or key.split("/")[0] in (".", "..")
        or any(ord(c) < 32 for c in key)
    ):
        raise InvalidKey(f"invalid store key {key!r}: use a relative path like 'objects/ab/cd/x'")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` without a trailing ``/`` if it names a folder of keys (``""`` is the
    whole store), else raise :class:`InvalidKey`: ``list("..")`` must not walk outside."""
    if not prefix:
        return ""
    folder = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        return check_key(folder)
    except InvalidKey:
        raise InvalidKey(
            f"invalid store prefix {prefix!r}: use a relative folder like 'objects/ab' or ''"
        ) from None


class Store(abc.ABC):
    """A place that holds immutable objects: a local directory, a bucket, any fsspec target.

    Contract for implementations:

    - ``put`` is atomic: a reader sees either no object or the whole object, never a prefix,
      even if the writer dies mid-way. Putting an existing key replaces it atomically.
    - ``get``/``get_range``/``size`` raise :class:`ObjectNotFound` for a missing key.
    - ``list`` yields every key under a prefix, recursively, in no particular order.
    - ``delete`` of a missing key is not an error.
    - Instances pickle (Ray ships them to workers); credentials are never part of the state
      that pickles, they are read from the environment again on the other side.
    - ``url`` is the URL as it may be shown and written down: without the password of a
      ``//user:password@`` login or a secret query parameter (see
      :func:`~tlreg.storage_backends.credentials.without_password`). Messages name it.
    """

    #: whether ``put`` makes data durable (fsync) before returning
    supports_fsync: bool = False
    #: whether ``local_path`` returns a real filesystem path
    supports_local_path: bool = False

    def __init__(self, url: str) -> None:
        self.url = without_password(url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- primitives ---------------------------------------------------------------------

    @abc.abstractmethod
    def put(self, key: str, data: Data) -> None:
        """Store ``data`` under ``key`` atomically."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Return ``length`` bytes from ``start`` (fewer only at the end of the object)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key that starts with ``prefix`` (a '/'-separated folder or '')."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it does not exist."""

    # -- derived operations -------------------------------------------------------------

    def put_if_absent(self, key: str, data: Data) -> bool:
        """Write ``data`` unless ``key`` exists; return whether it was written.

        For content-addressed keys this makes retries and concurrent writers idempotent.
        """
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def get_into(self, key: str, out: memoryview, start: int = 0) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of the object."""
        out = out.cast("B")
        data = self.get_range(key, start, len(out))
        if len(data) != len(out):
            raise EOFError(f"object {key!r} in {self.url} is shorter than expected")
        out[:] = data

    def put_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as UTF-8 JSON (sorted keys, so equal objects give equal bytes)."""
        self.put(key, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def get_json(self, key: str) -> Any:
        """Read a JSON object written by :meth:`put_json`."""
        return json.loads(self.get(key))

    def local_path(self, key: str) -> str | None:
        """The filesystem path of ``key`` if the store is a local directory, else None."""
        return None

    def sweep_abandoned(self, before: datetime, *, dry_run: bool = False) -> int:
        """Remove the remains of writes interrupted before ``before``; return how many.

        A put that dies mid-way (SIGKILL, power loss) leaves no object, but may leave a
        temporary file (local stores) or an open multipart upload (S3) that nothing will ever
        finish. Anything last touched before ``before`` is abandoned; newer remains may be a
        put still in progress and are kept. With ``dry_run`` nothing is removed. Stores whose
        puts leave no remains return 0.
        """
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the store must not be used afterwards."""
