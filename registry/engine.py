"""The registry's database connection: engine creation (SQLite in WAL mode, refused on a
network filesystem; PostgreSQL without JIT), "the database is not there" as
RegistryUnavailable, and :class:`Database`, the one session scope every room of the
Registry works through.

Every public call opens one session and one transaction; a call that raises rolls its
transaction back, so a failed call leaves the database unchanged. SQLite transactions begin
explicitly: ``BEGIN IMMEDIATE`` for writers, so that a commit holds the write lock from its
first read of the branch head.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from tlreg.registry.errors import RegistryUnavailable, UnsafeFilesystem, UnsupportedDatabase
from tlreg.storage_backends.credentials import without_password

T = TypeVar("T")
_SCHEMA_LOCK_KEY = 0x746C726567  # "tlreg": serialises schema creation across processes
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit

NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
     "glusterfs", "9p", "afs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs",
     "fuse.ceph", "fuse.juicefs", "fuse.rclone", "fuse.goofys", "fuse.mountpoint-s3"}
)  # fmt: skip
"""Filesystem types (as /proc/mounts names them) whose locks SQLite cannot rely on."""
MOUNTS = Path("/proc/mounts")

FORCE_ENV = "TLREG_SQLITE_FORCE"
"""Set to 1 to allow a SQLite registry on a network filesystem (``tlreg --force``); an
environment variable so that local Ray workers started by the same command inherit it."""

SQLITE_BUSY_TIMEOUT = 60.0
"""Seconds a SQLite write waits for another process's lock before RegistryUnavailable."""


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in slices short enough for one ``IN (...)`` list on either backend."""
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def schema_lock(conn: Connection) -> None:
    """Serialise schema creation and upgrades across processes (SQLite: BEGIN IMMEDIATE
    already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})


def filesystem_type(path: Path, mounts: Path | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (the longest matching mount point in
    /proc/mounts), or None where that file is missing (not Linux)."""
    try:
        lines = (mounts or MOUNTS).read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces and tabs in mount points as octal.
        point = fields[1].replace("\\040", " ").replace("\\011", "\t")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def open_engine(url: str, *, force: bool | None = None) -> Engine:
    """An engine for the registry at ``url`` (see :class:`~tlreg.registry.Registry`); raises
    UnsupportedDatabase, UnsafeFilesystem."""
    if force is None:
        force = os.environ.get(FORCE_ENV) == "1"
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise UnsupportedDatabase(
            f"cannot parse registry URL {without_password(url, mask=True)!r}: "
            "use sqlite:///path.db or postgresql+psycopg://user@host/db"
        ) from e
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # No JIT: registry statements are index lookups of a few milliseconds, which JIT
        # compilation alone can outlast (see docs/performance.md, Registry).
        # (appended to the URL's own options, e.g. a search_path, which connect_args replace)
        own = parsed.query.get("options", "")
        own = " ".join(own) if isinstance(own, tuple) else own
        options = f"{own} -c jit=off".strip()
        pg = create_engine(parsed, pool_pre_ping=True, connect_args={"options": options})
        return _watch_errors(pg, url)
    if backend != "sqlite":
        raise UnsupportedDatabase(
            f"registry URL {without_password(url, mask=True)!r} names a {backend} "
            "database: use sqlite:///path.db or postgresql+psycopg://user@host/db"
        )
    database = parsed.database or ""
    memory = database in ("", ":memory:") or database.startswith("file:")
    # How long a write waits for another writer's lock: sqlite:///x.db?timeout=SECONDS
    try:
        busy = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT))  # type: ignore[arg-type]
    except ValueError:
        raise UnsupportedDatabase(
            f"registry URL {without_password(url, mask=True)!r}: "
            "timeout must be a number of seconds, e.g. ?timeout=60"
        ) from None
    parsed = parsed.difference_update_query(["timeout"])
    if memory:
        # One shared connection, or every connection would see its own empty database.
        engine = create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        path = Path(database).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fs_type = filesystem_type(path.parent)
        if not force and fs_type is not None and fs_type in NETWORK_FILESYSTEMS:
            raise UnsafeFilesystem(
                f"registry file {str(path)!r} is on a {fs_type} filesystem, where SQLite's "
                "locks do not hold across machines: use PostgreSQL "
                "(postgresql+psycopg://user@host/db), or pass --force (TLREG_SQLITE_FORCE=1) "
                "if only one machine ever writes it"
            )
        try:
            # Owner-only: the registry names every checkpoint and run config. SQLite gives
            # its -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        engine = create_engine(parsed.set(database=str(path)), connect_args={"timeout": busy})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Issue BEGIN ourselves (below) instead of letting pysqlite defer it: a commit must
        # hold the write lock from its first read of the branch head.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy * 1000)}")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        write = conn.get_execution_options().get("tlreg_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return _watch_errors(engine, url)


def _watch_errors(engine: Engine, url: str) -> Engine:
    """Turn "the database is not there" into :class:`RegistryUnavailable`, one line long.

    A connection that cannot be made or is lost mid-way (server stopped, network cut) and a
    SQLite file that stays locked past the busy timeout are conditions to fix outside
    tlreg, not bugs: they get a message naming the database (password hidden) and what to
    check. Every other database error passes through unchanged.
    """
    shown = without_password(url, mask=True)

    @event.listens_for(engine, "handle_error")
    def _unavailable(context: ExceptionContext) -> None:
        error = context.original_exception
        if context.is_pre_ping or not isinstance(
            context.sqlalchemy_exception, OperationalError | InterfaceError
        ):
            return
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if context.connection is None or context.is_disconnect:
            raise RegistryUnavailable(
                f"registry database {shown} is unreachable ({first}); check that its server "
                "is running and reachable, then retry"
            ) from error
        if "database is locked" in first:
            raise RegistryUnavailable(
                f"registry database {shown} stayed locked by another process ({first}); "
                "retry when it is done"
            ) from error

    return engine


class Database:
    """The engine of one registry and its session scope; the base of every room of
    :class:`~tlreg.registry.Registry`."""

    _engine: Engine
    _writer: Engine
    """The same engine, whose transactions take SQLite's write lock at BEGIN."""
    _dialect: str
    """"sqlite" or "postgresql"."""

    def _connect(self, url: str, *, force: bool | None) -> None:
        self._engine = open_engine(url, force=force)
        self._writer = self._engine.execution_options(tlreg_write=True)
        self._dialect = self._engine.dialect.name

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """One session and one transaction; committed on success, rolled back on error."""
        with Session(self._writer if write else self._engine, expire_on_commit=False) as s:
            with s.begin():
                yield s

    def _insert(self, model: Any) -> sqlite.Insert | postgresql.Insert:
        """An ``INSERT`` with this backend's ``ON CONFLICT`` clauses."""
        if self._dialect == "postgresql":
            return postgresql.insert(model)
        return sqlite.insert(model)
