"""A store in a local (or parallel-filesystem) directory."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from tlreg.storage_backends.base import Data, Store, as_parts, check_key
from tlreg.storage_backends.errors import ObjectNotFound, StoreError

# writev takes at most IOV_MAX buffers and at most ~2 GiB per call on Linux.
_MAX_WRITE = 1 << 30
_TMP_MARK = ".tmp-"
"""Temporary files of atomic puts are named ``.<name>.tmp-<uuid>`` beside their target."""


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view[:_MAX_WRITE])
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DURABILITY = ("full", "file", "none")
"""Durability policies of a local store, strongest first (see :class:`LocalStore`)."""
DURABILITY_ENV = "TLREG_DURABILITY"


class LocalStore(Store):
    """Objects as files under ``root``, for local disks and parallel filesystems.

    A put writes a hidden temporary file in the target directory, then renames it into
    place: on POSIX filesystems, Lustre and GPFS included, rename is the atomic commit, and
    nothing relies on file locks. Objects fan out over two directory levels (see
    :mod:`tlreg.ckpt.objects`), so no directory grows past a few thousand entries.

    ``durability`` (default: ``$TLREG_DURABILITY``, else ``"full"``) says what a put makes
    durable before it returns:

    - ``"full"``: the file is fsynced before the rename and its directory after it, so a
      returned put survives a crash or power loss. What the checkpoint protocol assumes.
    - ``"file"``: the file's data is fsynced, the rename is not (a crash may lose the name of
      a just-written object, never expose a partial one). Saves a directory fsync per put
      on filesystems where those are slow.
    - ``"none"``: no fsync (the page cache, a burst buffer or a node-local scratch disk
      flushes on its own). A crash may lose recently committed checkpoints' objects;
      ``tlreg verify`` finds them.
    """

    supports_local_path = True

    def __init__(self, root: str | os.PathLike[str], *, durability: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        super().__init__(self.root.as_uri())
        chosen = durability or os.environ.get(DURABILITY_ENV) or "full"
        if chosen not in DURABILITY:
            raise StoreError(
                f"unknown durability {chosen!r} for store {self.url}: "
                f"use one of {', '.join(DURABILITY)} (see {DURABILITY_ENV})"
            )
        self.durability = chosen
        self.supports_fsync = chosen != "none"

    def __reduce__(self) -> tuple[object, ...]:
        return (LocalStore, (str(self.root),), {"durability": self.durability})

    def __setstate__(self, state: dict[str, str]) -> None:
        self.durability = state["durability"]
        self.supports_fsync = self.durability != "none"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    # docstring inherited
    def put(self, key: str, data: Data) -> None:
        path = self._path(key)
        parts = as_parts(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create {path.parent}: {e.strerror}; check the store path"
            ) from e
        tmp = path.parent / f".{path.name}{_TMP_MARK}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                for part in parts:
                    _write_all(fd, part)
                if self.durability != "none":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.durability == "full":
            _fsync_dir(path.parent)

    # docstring inherited
    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    # docstring inherited
    def get_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    # docstring inherited
    def get_into(self, key: str, out: memoryview, start: int = 0) -> None:
        out = out.cast("B")
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                f.seek(start)
                view = out
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"object {key!r} in {self.url} is shorter than expected")
                    view = view[n:]
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    # docstring inherited
    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    # docstring inherited
    def size(self, key: str) -> int:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None
        if not stat.S_ISREG(st.st_mode):  # a folder of keys is not an object
            raise ObjectNotFound(f"no object {key!r} in {self.url}")
        return st.st_size

    # docstring inherited
    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if _is_temporary(name):
                    continue  # an in-flight or abandoned atomic write
                yield name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")

    # docstring inherited
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # prune empty fan-out directories, never the root itself
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise
            parent = parent.parent

    # docstring inherited
    def local_path(self, key: str) -> str | None:
        return str(self._path(key))

    # docstring inherited
    def sweep_abandoned(self, before: datetime, *, dry_run: bool = False) -> int:
        cutoff = before.timestamp()
        swept = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not _is_temporary(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime >= cutoff:
                        continue  # possibly a put still writing
                    if not dry_run:
                        os.unlink(path)
                except FileNotFoundError:
                    continue  # its put finished (renamed) or failed (unlinked) meanwhile
                swept += 1
        return swept
