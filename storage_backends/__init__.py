"""URL -> store. ``open_store`` is the only way the rest of tlreg reaches storage.

Rooms:

- ``base``: the :class:`Store` contract: a few primitives, the operations derived from them.
- ``local``: :class:`LocalStore`, a local or parallel-filesystem directory (atomic renames).
- ``memory``: :class:`MemoryStore`, in-process, for tests and scratch work.
- ``s3``: ``S3Store``, an S3 bucket on s3fs and botocore (retries, errors naming the bucket).
- ``s3_transfer``: how a large S3 object travels in parts (multipart bodies, ranged reads).
- ``fsspec_store``: ``FsspecStore``, any other fsspec protocol.
- ``credentials``: the one list of option names that carry a secret, refused by every backend.
- ``errors``: the store errors, and ``TlregError``, the root of every tlreg error.
- ``testing``: the conformance suite every backend's tests subclass (needs pytest).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tlreg.storage_backends.base import Buffer, Data, Store
from tlreg.storage_backends.errors import (
    BackendMissing,
    InvalidKey,
    ObjectNotFound,
    StoreError,
    StoreUnavailable,
    TlregError,
    UnknownScheme,
)
from tlreg.storage_backends.local import LocalStore
from tlreg.storage_backends.memory import MemoryStore

__all__ = [
    "BackendMissing",
    "Buffer",
    "Data",
    "InvalidKey",
    "LocalStore",
    "MemoryStore",
    "ObjectNotFound",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TlregError",
    "UnknownScheme",
    "open_store",
]


def open_store(url: str | Store, **options: Any) -> Store:
    """Open the store at ``url``.

    ``url`` is a plain path, ``file://``, ``memory://``, ``s3://bucket/prefix`` (needs
    ``tlreg[s3]``) or any other fsspec protocol. ``options`` go to the backend (e.g.
    ``durability="file"`` for a local store, ``endpoint_url=...`` for S3). A :class:`Store` is
    returned unchanged.
    """
    if isinstance(url, Store):
        return url
    if not url:
        raise UnknownScheme(
            "empty store URL: pass a directory path or a URL like s3://bucket/prefix"
        )
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file"):
        path = url[len("file://") :] if scheme == "file" else url
        return LocalStore(path, **options)
    if scheme == "memory":
        return MemoryStore(url)
    if scheme in ("s3", "s3a"):
        try:
            from tlreg.storage_backends.s3 import S3Store
        except ImportError as e:
            raise BackendMissing(
                f"cannot open {url}: install s3fs to use s3:// stores (pip install 'tlreg[s3]')"
            ) from e
        return S3Store(url, **options)
    from tlreg.storage_backends.fsspec_store import FsspecStore

    return FsspecStore(url, **options)
