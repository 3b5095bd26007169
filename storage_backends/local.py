"""A store in a local (or parallel-filesystem) directory."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tlreg.storage_backends.base import Data, Store, as_parts, check_key, check_prefix
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


BLOCK = 4096
"""Alignment of direct I/O: memory address, file offset and length (any device's block)."""
DIRECT_MIN_BYTES = 1 << 20
"""Puts from this size on bypass the page cache when the store uses direct I/O."""
_BOUNCE_BYTES = 4 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_bounce = threading.local()


def _address(view: memoryview) -> int | None:
    """The address of a writable view's first byte; None for read-only memory."""
    if view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned staging buffer for bytes that are not block-aligned."""
    buffer = getattr(_bounce, "view", None)
    if buffer is None:
        buffer = _bounce.view = memoryview(mmap.mmap(-1, _BOUNCE_BYTES))
    return buffer


def _write_direct(fd: int, parts: list[memoryview]) -> None:
    """Write ``parts`` back to back to ``fd``, opened with ``O_DIRECT`` at offset 0.

    Block-aligned runs of a part go straight from its memory to the device; other bytes
    are gathered in a page-aligned bounce buffer, written a full buffer at a time. The last
    partial block, if any, is written through the page cache (``O_DIRECT`` cleared).
    """
    bounce = _bounce_buffer()
    fill = 0
    for part in parts:
        view = part
        while view:
            if fill == 0 and view.nbytes >= BLOCK:
                address = _address(view)
                if address is not None and address % BLOCK == 0:
                    n = min(view.nbytes, _MAX_WRITE) // BLOCK * BLOCK
                    _write_all(fd, view[:n])
                    view = view[n:]
                    continue
            take = min(bounce.nbytes - fill, view.nbytes)
            bounce[fill : fill + take] = view[:take]
            fill += take
            view = view[take:]
            if fill == bounce.nbytes:
                _write_all(fd, bounce)
                fill = 0
    whole = fill // BLOCK * BLOCK
    if whole:
        _write_all(fd, bounce[:whole])
    if fill > whole:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write_all(fd, bounce[whole:fill])


@functools.cache
def _mincore() -> Any:
    """libc's mincore(2), or None where it cannot be had."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.mincore
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    call.restype = ctypes.c_int
    return call


def _all_cached(path: Path, start: int, length: int) -> bool:
    """Whether the page cache holds every page of ``[start, start + length)`` of ``path``
    (mincore(2) over a mapping of it: nothing is read, no readahead is started)."""
    mincore = _mincore()
    if mincore is None or length <= 0:
        return False
    page = mmap.PAGESIZE
    first = start // page * page
    span = start + length - first
    vector = (ctypes.c_ubyte * -(-span // page))()
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), span, offset=first, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return False  # e.g. the range runs past the end of the file: the read will say so
    try:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if mincore(ctypes.addressof(anchor), span, vector) != 0:
                return False
        finally:
            del anchor
    finally:
        mapped.close()
    return all(v & 1 for v in vector)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DURABILITY = ("full", "file", "none")
"""Durability policies of a local store, strongest first (see :class:`LocalStore`)."""
DURABILITY_ENV = "TLREG_DURABILITY"
DIRECT_IO_ENV = "TLREG_DIRECT_IO"


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

    ``direct_io`` (default: ``$TLREG_DIRECT_IO`` as 1/0, else on) writes puts of at least
    :data:`DIRECT_MIN_BYTES` with ``O_DIRECT``: the bytes go from the caller's memory to the
    device without a copy into the page cache, which on a busy node costs the training
    process more CPU than hashing them (see docs/performance.md). Block-aligned buffers are
    written in place; other bytes through a 4 MiB bounce buffer per thread. On filesystems
    without ``O_DIRECT`` (tmpfs, some FUSE mounts) puts fall back to the page cache. Reads
    into a page-aligned buffer (:meth:`get_into`, as a checkpoint restore reads its large
    tensors) read with ``O_DIRECT`` too, without filling the cache, unless the cache holds
    the whole range already (mincore(2)), which is then copied from there. Durability is the
    same either way: ``fsync`` still flushes the device.
    """

    supports_local_path = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        durability: str | None = None,
        direct_io: bool | None = None,
    ) -> None:
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
        if direct_io is None:
            raw = os.environ.get(DIRECT_IO_ENV, "1").strip().lower()
            if raw not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise StoreError(
                    f"{DIRECT_IO_ENV}={raw!r} for store {self.url}: use 1 (on) or 0 (off)"
                )
            direct_io = raw in ("1", "true", "yes", "on")
        self.direct_io = bool(direct_io and _O_DIRECT)

    def __reduce__(self) -> tuple[object, ...]:
        state = {"durability": self.durability, "direct_io": self.direct_io}
        return (LocalStore, (str(self.root),), state)

    def __setstate__(self, state: dict[str, object]) -> None:
        self.durability = str(state["durability"])
        self.supports_fsync = self.durability != "none"
        self.direct_io = bool(state.get("direct_io", False))

    def _open_new(self, tmp: Path, nbytes: int) -> tuple[int, bool]:
        """Create ``tmp`` for writing; (fd, whether it is open with O_DIRECT)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if self.direct_io and nbytes >= DIRECT_MIN_BYTES:
            try:
                return os.open(tmp, flags | _O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct_io = False  # this filesystem has no direct I/O
                tmp.unlink(missing_ok=True)
        return os.open(tmp, flags, 0o644), False

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
        fd, direct = self._open_new(tmp, sum(p.nbytes for p in parts))
        try:
            try:
                if direct:
                    _write_direct(fd, parts)
                else:
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
        path = self._path(key)
        try:
            if self.direct_io and out.nbytes >= DIRECT_MIN_BYTES and start % BLOCK == 0:
                address = _address(out)
                if address is not None and address % BLOCK == 0:
                    # bytes the page cache holds whole (a checkpoint written or read through
                    # it before) are copied from there; others come straight off the disk
                    if not _all_cached(path, start, out.nbytes):
                        done = self._read_direct(path, out, start)
                        out, start = out[done:], start + done
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                view = out
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"object {key!r} in {self.url} is shorter than expected")
                    view = view[n:]
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    def _read_direct(self, path: Path, out: memoryview, start: int) -> int:
        """Read whole blocks from ``start`` (aligned) straight into ``out`` (aligned),
        bypassing the page cache; returns how many bytes it read (the rest, a partial last
        block or what lies past the end of the file, is for a buffered read)."""
        try:
            fd = os.open(path, os.O_RDONLY | _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct_io = False  # this filesystem has no direct I/O
            return 0
        done = 0
        try:
            whole = out.nbytes // BLOCK * BLOCK
            while done < whole:
                n = os.preadv(fd, [out[done : min(whole, done + _MAX_WRITE)]], start + done)
                done += n
                if n == 0 or n % BLOCK:
                    break  # the end of the file
        finally:
            os.close(fd)
        return done // BLOCK * BLOCK

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
        prefix = check_prefix(prefix)
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
