"""A store over any fsspec filesystem (gcs://, abfs://, sftp://, memory://, file://, ...)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import fsspec
import fsspec.core
from fsspec.registry import known_implementations

from tlreg.storage_backends.base import Data, Store, as_parts, check_key, check_prefix
from tlreg.storage_backends.credentials import (
    has_login_without_password,
    scrub,
    secret_options,
    without_password,
)
from tlreg.storage_backends.errors import (
    BackendMissing,
    ObjectNotFound,
    StoreUnavailable,
    UnknownScheme,
)

# Protocols whose single upload of a whole object is atomic (object stores, and fsspec's
# in-memory filesystem, which publishes a file when it is closed). Everything else is treated
# as a filesystem: write a temporary name, then rename it into place.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "tos", "memory"}
)

_TMP_MARK = ".tmp-"

# Protocols whose filesystem object talks over one connection (ftplib, paramiko's SFTP
# channel, an SMB session) that concurrent threads would interleave.
_ONE_CONNECTION = frozenset({"ftp", "sftp", "ssh", "smb"})


def url_protocol(url: str) -> str:
    """The fsspec protocol of ``url`` ('file' for a plain path; the outermost of a chain)."""
    first = url.split("::", 1)[0]
    return first.split("://", 1)[0] if "://" in first else "file"


def check_protocol(url: str) -> None:
    """Raise :class:`UnknownScheme` or :class:`BackendMissing` unless fsspec can open ``url``."""
    protocol = url_protocol(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        hint = known_implementations.get(protocol, {}).get("err") or _first_line(e)
        raise BackendMissing(
            f"cannot open {without_password(url)}: {hint} (pip install it into this env)"
        ) from None
    except ValueError:
        raise UnknownScheme(
            f"unknown store URL scheme '{protocol}://': use a path, file://, memory://, s3:// "
            "or an installed fsspec protocol"
        ) from None


def _configured_password(url: str) -> bool:
    """Whether fsspec's configuration (``FSSPEC_<PROTOCOL>_PASSWORD``, ``~/.config/fsspec``)
    gives the password of ``url``'s protocol."""
    import fsspec.config

    return bool(fsspec.config.conf.get(url_protocol(url), {}).get("password"))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


class FsspecStore(Store):
    """Objects as files of an fsspec filesystem under the URL's path.

    ``storage_options`` go to the filesystem's constructor. On object stores a put is one
    upload of the whole object; on other filesystems it is a write to a hidden temporary
    name followed by a rename, which ``list`` never shows. Pickling keeps the URL and the
    options; the filesystem is opened again on the other side. Options that would hold a
    credential (``key``, ``secret``, ``token``, ``password``, ``account_key``, ...: see
    :mod:`~tlreg.storage_backends.credentials`) are refused: they would travel with every
    pickled store.

    A password in the URL (``ftp://user:password@host/path``, as fsspec reads it) opens this
    store and is kept nowhere else: ``url``, messages and the pickled state hold the URL
    without it. A store opened from that URL (the next command reading ``tlreg.toml``, a
    copy unpickled on a Ray worker) takes the password from fsspec's configuration:
    ``FSSPEC_<PROTOCOL>_PASSWORD`` (e.g. ``FSSPEC_FTP_PASSWORD``) or ``~/.config/fsspec/``;
    for sftp also ssh keys and the agent.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        check_protocol(url)
        shown = without_password(url)
        secrets = secret_options(storage_options)
        if secrets:
            raise StoreUnavailable(
                f"store {shown}: credentials cannot be storage options ({', '.join(secrets)}): "
                "they would travel with the store; set them in the environment or the "
                "provider's config file (e.g. AWS_*, GOOGLE_APPLICATION_CREDENTIALS, "
                "AZURE_STORAGE_*, ~/.ssh/config)"
            )
        super().__init__(url)
        self.storage_options = storage_options
        self._connect_url = url  # with its password: used here, never pickled or shown
        self._local = threading.local()
        try:
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as e:
            raise BackendMissing(f"cannot open {shown}: {scrub(_first_line(e), url)}") from None
        except Exception as e:
            # the filesystem's client could not start or log in (no JVM for hdfs://, bad
            # options, a refused login: ftplib's and paramiko's errors are no OSError)
            why = f"{type(e).__name__}: {scrub(_first_line(e), url)}"
            if has_login_without_password(url) and not _configured_password(url):
                protocol = url_protocol(url)
                raise StoreUnavailable(
                    f"cannot open store {shown} ({why}): the URL names a user but no password, "
                    "and tlreg never saves one; set "
                    f"FSSPEC_{protocol.upper()}_PASSWORD or pass the URL with its password again"
                ) from None
            raise StoreUnavailable(
                f"cannot open store {shown}: {why}; check the URL, "
                "the storage options and that the filesystem's client is set up"
            ) from None
        self._shared_fs = fs
        self._local.fs = fs
        self.root = root.rstrip("/")
        protocols = fs.protocol
        names = {protocols} if isinstance(protocols, str) else set(protocols)
        self.atomic_put = bool(names & OBJECT_STORE_PROTOCOLS)
        self._per_thread = bool(names & _ONE_CONNECTION)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.url, self.storage_options))

    @property
    def _fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem; for protocols whose client holds one connection that threads
        cannot share (ftp, sftp, smb), one per thread (fsspec caches instances per thread)."""
        if not self._per_thread:
            return self._shared_fs
        fs = getattr(self._local, "fs", None)
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(self._connect_url, **self.storage_options)
            self._local.fs = fs
        return fs

    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/{key}" if self.root else key

    def _missing(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"no object {key!r} in {self.url}")

    # docstring inherited
    def put(self, key: str, data: Data) -> None:
        path = self._path(key)
        parts = as_parts(data)
        if self.atomic_put:
            # one upload of the whole object; backends differ in which buffer types they take
            blob = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
            self._fs.pipe_file(path, blob)
            self._fs.invalidate_cache(path)
            return
        parent, _, name = path.rpartition("/")
        tmp_name = f".{name}{_TMP_MARK}{uuid.uuid4().hex}"
        tmp = f"{parent}/{tmp_name}" if parent else tmp_name
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        try:
            with self._fs.open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            self._fs.mv(tmp, path)
        except BaseException:
            if self._fs.exists(tmp):
                self._fs.rm_file(tmp)
            raise
        finally:
            self._fs.invalidate_cache(parent)

    # docstring inherited
    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return bytes(self._fs.cat_file(path))
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    # docstring inherited
    def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        if length <= 0:
            self.size(key)  # raises for a missing key
            return b""
        try:
            return bytes(self._fs.cat_file(path, start=start, end=start + length))
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    def _info(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        # another process may have written since; filesystems that answer info() from their
        # parent's listing (ftp, sftp) cache it under the parent
        self._fs.invalidate_cache(path)
        self._fs.invalidate_cache(path.rpartition("/")[0])
        try:
            info: dict[str, Any] = self._fs.info(path)
        except FileNotFoundError:
            return None
        return info if info.get("type") == "file" else None

    # docstring inherited
    def exists(self, key: str) -> bool:
        return self._info(key) is not None

    # docstring inherited
    def size(self, key: str) -> int:
        info = self._info(key)
        if info is None:
            raise self._missing(key)
        return int(info["size"])

    # docstring inherited
    def list(self, prefix: str = "") -> Iterator[str]:
        prefix = check_prefix(prefix)
        base = self._fs._strip_protocol(f"{self.root}/{prefix}" if prefix else self.root)
        base = base.rstrip("/")
        self._fs.invalidate_cache(base)
        root = self._fs._strip_protocol(self.root).rstrip("/")
        root_len = len(root) + 1 if root else 0
        folder = base + "/" if base else ""
        for path in self._fs.find(base, withdirs=False):
            path = path.rstrip("/")
            # find() on a file name returns the file itself: only keys *under* the folder count
            if not path.startswith(folder) or _is_tmp(path.rpartition("/")[2]):
                continue
            yield path[root_len:]

    # docstring inherited
    def sweep_abandoned(self, before: datetime, *, dry_run: bool = False) -> int:
        if self.atomic_put:
            return 0  # one upload per put: nothing to leave behind
        root = self._fs._strip_protocol(self.root).rstrip("/")
        self._fs.invalidate_cache(root)
        swept = 0
        for path in self._fs.find(root, withdirs=False):
            if not _is_tmp(path.rstrip("/").rpartition("/")[2]):
                continue
            try:
                modified = self._fs.modified(path)
            except FileNotFoundError:
                continue  # its put finished or failed meanwhile
            except NotImplementedError:
                continue  # no way to tell an abandoned write from one in progress
            if modified.tzinfo is None:  # fsspec reports naive UTC for some filesystems
                modified = modified.replace(tzinfo=timezone.utc)
            if modified >= before:
                continue
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(path)
            swept += 1
        return swept

    # docstring inherited
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass
        self._fs.invalidate_cache(path)


def _reopen(url: str, storage_options: dict[str, Any]) -> FsspecStore:
    return FsspecStore(url, **storage_options)
