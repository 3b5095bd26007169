"""The registry: one SQLModel implementation over SQLite (embedded) and PostgreSQL (clusters).

Every public call opens one session and one transaction; a call that raises rolls its
transaction back, so a failed call leaves the database unchanged. Uniqueness (branch, tag and
checkpoint names) is enforced by primary keys and reported from the IntegrityError.

Writers are serialised per branch: a commit locks the branch row (``SELECT ... FOR UPDATE`` on
PostgreSQL; ``BEGIN IMMEDIATE`` takes SQLite's single write lock) before it reads the head, then
moves the head with a compare-and-swap ``UPDATE`` whose row count is checked. This is what makes
concurrent commits from many Ray workers safe without file locks.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import EllipsisType
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    exists,
    func,
    or_,
    text,
)
from sqlalchemy import (
    select as sa_select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import aliased
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, col, delete, select, update

from tlreg.registry import migrations
from tlreg.registry import models as m
from tlreg.registry.errors import (
    AmbiguousRef,
    BeingCollected,
    BranchExists,
    BranchNotFound,
    CheckpointExists,
    CheckpointPruned,
    EmptyBranch,
    HeadMoved,
    NotCollectable,
    RefNotFound,
    RegistryUnavailable,
    RunNotFound,
    TagExists,
    UnsafeFilesystem,
    UnsupportedDatabase,
)
from tlreg.registry.names import shown as _shown
from tlreg.registry.names import validate_name
from tlreg.registry.records import (
    Branch,
    CheckpointRecord,
    Edge,
    GcPlan,
    RecordList,
    Run,
    Tag,
    decode_metrics,
    encode_metrics,
)
from tlreg.registry.records import utc as _utc

CHECKPOINT_KINDS = ("train", "import", "merge")
"""Values of ``CheckpointRecord.kind``."""
RUN_STATUSES = ("running", "succeeded", "failed", "stopped")
"""Values of ``Run.status``."""
MIN_PREFIX = 4
"""Shortest checkpoint id prefix that ``resolve`` accepts."""
RANK_METRIC = "val_accuracy"
"""The metric ``best_ancestor`` breaks ties with (higher is better)."""

_SCHEMA_LOCK_KEY = 0x746C726567  # "tlreg": serialises schema creation across processes
# PostgreSQL: apply_gc holds this exclusively; commits, new branches and tags share it, so a
# checkpoint is never pruned, nor an object doomed, under a transaction that is about to use it.
# (SQLite write transactions are serialised by BEGIN IMMEDIATE already.)
_GC_LOCK_KEY = 0x746C726567C6
T = TypeVar("T")
_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit
_BRANCHES_HINT = "list branches with 'tlreg branches'"
_REFS_HINT = "pass a branch, a tag or a checkpoint id (see 'tlreg branches' and 'tlreg log')"


def prefix_hashes(signature: Sequence[str]) -> list[str]:
    """Hash of ``signature[:d]`` for d = 1..len(signature), chained and length-prefixed so that
    equal hashes mean equal prefixes (of equal depth)."""
    h = hashlib.blake2b(digest_size=20, person=b"tlreg-sig")
    out = []
    for part in signature:
        data = str(part).encode()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
        out.append(h.copy().hexdigest())
    return out


def _quote(value: str | None) -> str:
    return "(empty)" if value is None else repr(value)


def _reopen(url: str, force: bool | None) -> Registry:
    return Registry(url, force=force)


def _schema_lock(conn: Connection) -> None:
    """Serialise schema creation and upgrades across processes (SQLite: BEGIN IMMEDIATE
    already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
     "glusterfs", "9p", "afs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs",
     "fuse.ceph", "fuse.juicefs", "fuse.rclone", "fuse.goofys", "fuse.mountpoint-s3"}
)  # fmt: skip
"""Filesystem types (as /proc/mounts names them) whose locks SQLite cannot rely on."""
MOUNTS = Path("/proc/mounts")


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


FORCE_ENV = "TLREG_SQLITE_FORCE"
"""Set to 1 to allow a SQLite registry on a network filesystem (``tlreg --force``); an
environment variable so that local Ray workers started by the same command inherit it."""


SQLITE_BUSY_TIMEOUT = 60.0
"""Seconds a SQLite write waits for another process's lock before RegistryUnavailable."""


def _create_engine(url: str, *, force: bool | None = None) -> Engine:
    if force is None:
        force = os.environ.get(FORCE_ENV) == "1"
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise UnsupportedDatabase(
            f"cannot parse registry URL {url!r}: use sqlite:///path.db or "
            "postgresql+psycopg://user@host/db"
        ) from e
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        # No JIT: registry statements are index lookups of a few milliseconds, and JIT
        # compilation alone took 25-450 ms whenever the planner's estimate for a lineage walk
        # crossed jit_above_cost.
        # (appended to the URL's own options, e.g. a search_path, which connect_args replace)
        own = parsed.query.get("options", "")
        own = " ".join(own) if isinstance(own, tuple) else own
        options = f"{own} -c jit=off".strip()
        pg = create_engine(parsed, pool_pre_ping=True, connect_args={"options": options})
        return _watch_errors(pg, parsed)
    if backend != "sqlite":
        raise UnsupportedDatabase(
            f"registry URL {parsed.render_as_string(hide_password=True)!r} names a {backend} "
            "database: use sqlite:///path.db or postgresql+psycopg://user@host/db"
        )
    database = parsed.database or ""
    memory = database in ("", ":memory:") or database.startswith("file:")
    # How long a write waits for another writer's lock: sqlite:///x.db?timeout=SECONDS
    try:
        busy = float(parsed.query.get("timeout", SQLITE_BUSY_TIMEOUT))  # type: ignore[arg-type]
    except ValueError:
        raise UnsupportedDatabase(
            f"registry URL {url!r}: timeout must be a number of seconds, e.g. ?timeout=60"
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

    return _watch_errors(engine, parsed)


def _watch_errors(engine: Engine, url: URL) -> Engine:
    """Turn "the database is not there" into :class:`RegistryUnavailable`, one line long.

    A connection that cannot be made or is lost mid-way (server stopped, network cut) and a
    SQLite file that stays locked past the busy timeout are conditions to fix outside
    tlreg, not bugs: they get a message naming the database (password hidden) and what to
    check. Every other database error passes through unchanged.
    """
    shown = url.render_as_string(hide_password=True)

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


class Registry:
    """The lineage registry: branches, checkpoints, tags, runs and object references.

    ``url`` is ``sqlite:///path.db`` (the file and its parent directories are created; WAL mode)
    or ``postgresql+psycopg://user@host/db``. The schema is created if missing. A Registry is
    thread-safe, and pickles by URL (it reconnects in the receiving process).
    """

    url: str

    def __init__(self, url: str, *, force: bool | None = None) -> None:
        """Open (or create) the registry at ``url``.

        Raises SchemaVersionError when the database has an older schema (the message says to
        run ``tlreg upgrade``, i.e. :meth:`upgrade`) or a newer one (upgrade tlreg);
        UnsafeFilesystem for a SQLite file on a network filesystem unless ``force``;
        UnsupportedDatabase for other URLs.
        """
        self.url = url
        self.force = force
        self._engine = _create_engine(url, force=force)
        self._writer = self._engine.execution_options(tlreg_write=True)
        self._dialect = self._engine.dialect.name
        try:
            self._init_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def upgrade(cls, url: str, *, force: bool | None = None) -> tuple[int, int]:
        """Migrate the registry at ``url`` to this tlreg's schema, in one transaction.

        Returns (from_version, to_version); equal when there was nothing to do, and
        from_version 0 when the database was empty (the current schema is created). Safe to
        run while other processes use the registry: it takes the write lock (SQLite) or an
        advisory lock (PostgreSQL), and a failed step changes nothing. Raises
        SchemaVersionError for a database newer than this tlreg.
        """
        engine = _create_engine(url, force=force)
        try:
            with engine.execution_options(tlreg_write=True).begin() as conn:
                _schema_lock(conn)
                return migrations.upgrade(conn)
        finally:
            engine.dispose()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every pooled connection. The object must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Callable[..., Registry], tuple[str, bool | None]]:
        return (_reopen, (self.url, self.force))

    def __repr__(self) -> str:
        return f"Registry({make_url(self.url).render_as_string(hide_password=True)!r})"

    def _init_schema(self) -> None:
        with self._writer.begin() as conn:
            found = migrations.stored_version(conn)
            if found == m.SCHEMA_VERSION:
                return
            _schema_lock(conn)
            found = migrations.stored_version(conn)  # another process may have created it
            if found is None:
                migrations.create_latest(conn)
            elif found < m.SCHEMA_VERSION:
                raise migrations.older_error(f"registry {self!r}", found)
            elif found > m.SCHEMA_VERSION:
                raise migrations.newer_error(f"registry {self!r}", found)

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """One session and one transaction; committed on success, rolled back on error."""
        with Session(self._writer if write else self._engine, expire_on_commit=False) as s:
            with s.begin():
                yield s

    def _insert(self, model: Any) -> sqlite.Insert | postgresql.Insert:
        if self._dialect == "postgresql":
            return postgresql.insert(model)
        return sqlite.insert(model)

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        with self._session() as s:
            row = s.get(m.Meta, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        stmt = self._insert(m.Meta).values(key=key, value=value)
        stmt = stmt.on_conflict_do_update(index_elements=["key"], set_={"value": value})
        with self._session(write=True) as s:
            s.exec(stmt)

    # -- branches ------------------------------------------------------------------------

    def create_branch(
        self, name: str, *, from_ref: str | None = None, task: str | None = None
    ) -> Branch:
        """Create branch ``name``.

        Without ``from_ref`` the branch is an empty root (head None). Otherwise ``from_ref``
        (branch, tag, checkpoint id or prefix) is resolved and the new branch's head and base
        are that checkpoint, as in git. Raises BranchExists, InvalidName, RefNotFound.
        """
        validate_name(name, "branch")
        with self._session(write=True) as s:
            head = None
            if from_ref is not None:
                self._gc_lock(s, shared=True)
                head = self._live(self._resolve(s, from_ref), f"branch {_shown(name)} from it").id
            row = m.Branch(name=name, head=head, base=head, task=task, created=m.utcnow())
            try:
                s.exec(self._insert(m.Branch).values(**row.model_dump()))
            except IntegrityError:
                raise BranchExists(
                    f"branch {_shown(name)} already exists: pick another name or {_BRANCHES_HINT}"
                ) from None
            return _branch(row)

    def get_branch(self, name: str) -> Branch:
        """The branch called ``name``; raises BranchNotFound."""
        with self._session() as s:
            return _branch(self._branch_row(s, name))

    def branches(self) -> list[Branch]:
        """Every branch, sorted by name."""
        with self._session() as s:
            rows = s.exec(select(m.Branch).order_by(col(m.Branch.name))).all()
            return [_branch(r) for r in rows]

    def delete_branch(self, name: str) -> None:
        """Delete the branch name only; its checkpoints stay (reachable by id and tags)."""
        with self._session(write=True) as s:
            result = s.exec(delete(m.Branch).where(col(m.Branch.name) == name))
            if result.rowcount != 1:
                raise BranchNotFound(f"branch {_shown(name)} does not exist: {_BRANCHES_HINT}")

    def branch_bytes(self, branch: str) -> tuple[int, int]:
        """(logical, new) bytes summed over the checkpoints committed on ``branch``."""
        with self._session() as s:
            self._branch_row(s, branch)
            logical, new = s.exec(
                select(
                    func.coalesce(func.sum(m.Checkpoint.logical_bytes), 0),
                    func.coalesce(func.sum(m.Checkpoint.new_bytes), 0),
                ).where(m.Checkpoint.branch == branch)
            ).one()
            return int(logical), int(new)

    def _branch_row(self, s: Session, name: str, *, lock: bool = False) -> m.Branch:
        stmt = select(m.Branch).where(m.Branch.name == name)
        if lock:
            stmt = stmt.with_for_update()
        row = None if _unstorable(name) else s.exec(stmt).first()
        if row is None:
            raise BranchNotFound(f"branch {_shown(name)} does not exist: {_BRANCHES_HINT}")
        return row

    # -- commit --------------------------------------------------------------------------

    def commit(
        self,
        branch: str,
        manifest_id: str,
        *,
        step: int,
        parents: Sequence[str] | None = None,
        objects: Mapping[str, int],
        metrics: Mapping[str, float] | None = None,
        expected_head: str | EllipsisType | None = ...,
        logical_bytes: int = 0,
        kind: str = "train",
        signature: Sequence[str] | None = None,
        message: str | None = None,
        run_id: int | None = None,
    ) -> CheckpointRecord:
        """Record checkpoint ``manifest_id`` on ``branch`` and move the branch head to it.

        One transaction: the object rows the store gained (``objects`` maps object hash to its
        size; ``new_bytes`` counts only hashes the registry had never seen), the checkpoint, its
        object references, its edges, its architecture-signature prefixes, and the head moved
        by compare-and-swap from ``expected_head``. ``expected_head`` left out means "the head
        as this transaction finds it" (concurrent committers then form one chain); given, a
        different head raises HeadMoved and nothing is written.

        ``parents`` (checkpoint ids, first parent first) default to the current head, or none
        on an empty branch. Edge kinds: "merge" with several parents, else "continue" when the
        parent was committed on this branch and "branch" when not.

        Raises BranchNotFound, RefNotFound (a parent), RunNotFound, CheckpointExists,
        HeadMoved, ValueError (bad arguments).
        """
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind {kind!r} is not one of {CHECKPOINT_KINDS}")
        if not isinstance(manifest_id, str) or not manifest_id:
            raise ValueError(f"manifest_id must be a non-empty string, got {manifest_id!r}")
        parent_ids = None if parents is None else [str(p) for p in parents]
        if parent_ids is not None and len(set(parent_ids)) != len(parent_ids):
            raise ValueError(f"parents of {manifest_id!r} repeat a checkpoint: {parent_ids}")
        sizes = {str(h): int(n) for h, n in objects.items()}
        if any(n < 0 for n in sizes.values()):
            raise ValueError(f"object sizes of {manifest_id!r} must be >= 0")
        stored_metrics = encode_metrics(metrics)
        rank = stored_metrics.get(RANK_METRIC)
        sig = None if signature is None else [str(x) for x in signature]

        with self._session(write=True) as s:
            self._gc_lock(s, shared=True)
            # Core statements on the session's connection: a commit is a dozen small
            # statements, and ORM execution would double their Python overhead.
            conn = s.connection()
            # The head and the branch it was committed on, in the statement that locks the
            # branch row: the default parent needs no query of its own.
            # Also its lane label, and whether its lane goes on past it (then a child of it
            # starts a lane of its own).
            found = conn.execute(
                sa_select(m.Branch.head, *_PARENT_COLUMNS)
                .select_from(m.Branch)
                .outerjoin(m.Checkpoint, col(m.Checkpoint.id) == col(m.Branch.head))
                .where(m.Branch.name == branch)
                .with_for_update(of=m.Branch.__table__)
            ).first()
            if found is None:
                raise BranchNotFound(f"branch {_shown(branch)} does not exist: {_BRANCHES_HINT}")
            current = found[0]
            expected = current if expected_head is ... else expected_head
            if expected != current:
                raise _head_moved(branch, expected, current)
            parent_info: dict[str, tuple[str, str, int, bool]]
            if parent_ids is None and (current is None or found[1] is not None):
                parent_ids = [] if current is None else [current]
                parent_info = {} if current is None else {current: tuple(found[1:])}
            else:
                # (Also when the lock waited for a concurrent commit on PostgreSQL: the row
                # lock then reads the new head, but the head's checkpoint row is newer than
                # the statement's snapshot and joins as NULLs. A new statement sees it.)
                if parent_ids is None:
                    parent_ids = [current]
                parent_info = {
                    row[0]: tuple(row[1:])
                    for row in conn.execute(
                        sa_select(m.Checkpoint.id, *_PARENT_COLUMNS).where(
                            col(m.Checkpoint.id).in_(parent_ids)
                        )
                    ).all()
                }
            for p in parent_ids:
                if p not in parent_info:
                    raise RefNotFound(
                        f"parent checkpoint {p!r} of {manifest_id!r} does not exist: "
                        "pass ids of committed checkpoints"
                    )
            if run_id is not None and s.get(m.Run, run_id) is None:
                raise RunNotFound(f"run {run_id} does not exist: start one with start_run()")
            self._refuse_doomed(s, manifest_id, sorted(sizes))

            # The lane rule of migrations.lane_labels. Only a commit on the first parent's
            # own branch extends its lane, and those hold that branch's row lock, so two
            # commits never claim the same lane position (a unique index backs this up).
            first = parent_info[parent_ids[0]] if parent_ids else None
            if first is not None and len(parent_ids) == 1 and first[0] == branch and not first[3]:
                lane, lane_pos, linked = first[1], first[2] + 1, []
            else:
                lane, lane_pos, linked = manifest_id, 0, parent_ids
            links = [(parent_info[p][1], parent_info[p][2]) for p in linked]

            new_bytes = self._insert_objects(s, sizes)
            created = m.utcnow()
            checkpoint = m.Checkpoint(
                id=manifest_id,
                branch=branch,
                step=int(step),
                manifest=manifest_id,
                metrics=stored_metrics,
                val_accuracy=rank if isinstance(rank, float) else None,
                logical_bytes=int(logical_bytes),
                new_bytes=new_bytes,
                kind=kind,
                message=message,
                signature=sig,
                run_id=run_id,
                created=created,
                lane=lane,
                lane_pos=lane_pos,
            )
            try:
                conn.execute(self._insert(m.Checkpoint).values(**checkpoint.model_dump()))
            except IntegrityError:
                raise CheckpointExists(
                    f"checkpoint {manifest_id!r} is already committed: "
                    "write a new manifest, or tag the existing one"
                ) from None
            refs = list(sizes)
            kinds = [_edge_kind(branch, parent_info[p][0], len(parent_ids)) for p in parent_ids]
            prefixes = prefix_hashes(sig) if sig else []
            if self._dialect == "postgresql":
                # One statement, one round trip, for the rows hanging off the checkpoint.
                conn.execute(
                    _CHILD_ROWS_PG,
                    {"id": manifest_id, "objects": refs, "parents": parent_ids,
                     "kinds": kinds, "prefixes": prefixes, "lane": lane, "lane_pos": lane_pos,
                     "link_lanes": [a for a, _ in links], "link_pos": [b for _, b in links]},
                )  # fmt: skip
            else:
                if refs:
                    conn.execute(
                        self._insert(m.CheckpointObject),
                        [{"checkpoint": manifest_id, "object": h} for h in refs],
                    )
                if parent_ids:
                    conn.execute(
                        self._insert(m.Edge),
                        [
                            {"child": manifest_id, "parent": p, "position": i, "kind": k}
                            for i, (p, k) in enumerate(zip(parent_ids, kinds, strict=True))
                        ],
                    )
                if links:
                    conn.execute(
                        self._insert(m.LaneLink),
                        [
                            {"parent_lane": a, "parent_pos": b, "child_lane": lane,
                             "child_pos": lane_pos}
                            for a, b in links
                        ],
                    )  # fmt: skip
                if prefixes:
                    conn.execute(
                        self._insert(m.LayerPrefix),
                        [
                            {"checkpoint": manifest_id, "depth": d, "prefix": h}
                            for d, h in enumerate(prefixes, start=1)
                        ],
                    )
            moved = conn.execute(
                update(m.Branch)
                .where(
                    col(m.Branch.name) == branch,
                    col(m.Branch.head).is_not_distinct_from(expected),
                )
                .values(head=manifest_id)
            )
            if moved.rowcount != 1:
                actual = s.exec(select(m.Branch.head).where(m.Branch.name == branch)).first()
                raise _head_moved(branch, expected, actual)
            return _record(checkpoint, tuple(parent_ids))

    def _refuse_doomed(self, s: Session, manifest_id: str, hashes: Sequence[str]) -> None:
        """Raise BeingCollected if apply_gc handed out the manifest or an object for deletion
        (the writer may have skipped uploading an object because the store still had it)."""
        cand = m.GcCandidate
        keys = [(cand.kind == "manifest") & (cand.key == manifest_id)]
        keys += [(cand.kind == "object") & col(cand.key).in_(c) for c in _chunks(hashes)]
        doomed: list[str] = []
        # The manifest with the first chunk of objects: one query for a typical commit.
        for group in (keys[:2], *([k] for k in keys[2:])):
            doomed += s.exec(
                select(cand.key).where(or_(*group), col(cand.doomed).is_not(None))
            ).all()
        if doomed:
            shown = ", ".join(sorted(doomed)[:5]) + (", ..." if len(doomed) > 5 else "")
            raise BeingCollected(
                f"checkpoint {manifest_id!r} references store keys that garbage collection is "
                f"deleting ({shown}): save the checkpoint again once 'tlreg gc' has finished"
            )

    def _gc_lock(self, s: Session, *, shared: bool) -> None:
        if self._dialect == "postgresql":
            fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            s.connection().execute(text(f"SELECT {fn}(:k)"), {"k": _GC_LOCK_KEY})

    @staticmethod
    def _live(row: m.Checkpoint, action: str) -> m.Checkpoint:
        if row.pruned is not None:
            raise CheckpointPruned(
                f"checkpoint {row.id!r} was pruned by garbage collection on "
                f"{row.pruned:%Y-%m-%d %H:%M} UTC and its tensors may be gone: cannot {action}; "
                "pick a live checkpoint (see 'tlreg log')"
            )
        return row

    def _insert_objects(self, s: Session, sizes: Mapping[str, int]) -> int:
        """Insert unseen objects; return the bytes of those that were new.

        ``ON CONFLICT DO NOTHING RETURNING`` reports exactly the rows this transaction
        inserted, also when another transaction races to insert the same hash (PostgreSQL
        waits for it, then skips the row), so an object is counted once across all commits.
        Hashes go in sorted order so that two concurrent commits never deadlock on them.
        """
        if not sizes:
            return 0
        now = m.utcnow()
        total = 0
        hashes = sorted(sizes)
        for chunk in _chunks(hashes):
            stmt = (
                self._insert(m.Object)
                .values([{"hash": h, "nbytes": sizes[h], "created": now} for h in chunk])
                .on_conflict_do_nothing(index_elements=["hash"])
                .returning(col(m.Object.nbytes))
            )
            total += sum(int(n) for (n,) in s.connection().execute(stmt).all())
        return total

    # -- reading checkpoints -------------------------------------------------------------

    def get(self, checkpoint_id: str) -> CheckpointRecord:
        """The checkpoint with exactly this id; raises RefNotFound."""
        with self._session() as s:
            row = s.get(m.Checkpoint, checkpoint_id)
            if row is None:
                raise RefNotFound(f"checkpoint {checkpoint_id!r} does not exist: {_REFS_HINT}")
            return self._records(s, [row])[0]

    def resolve(self, ref: str) -> CheckpointRecord:
        """The checkpoint ``ref`` names, trying in order: a branch (its head), a tag, a full
        checkpoint id, a unique id prefix of at least 4 characters.

        Raises EmptyBranch (a branch without checkpoints), AmbiguousRef (a prefix of several
        ids, listed in the message), RefNotFound.
        """
        with self._session() as s:
            return self._records(s, [self._resolve(s, ref)])[0]

    def _resolve(self, s: Session, ref: str) -> m.Checkpoint:
        if not isinstance(ref, str) or not ref:
            raise RefNotFound(f"empty ref {_shown(ref)}: {_REFS_HINT}")
        if _unstorable(ref):
            raise RefNotFound(f"no branch, tag or checkpoint matches {_shown(ref)}: {_REFS_HINT}")
        target: str | None = None
        branch = s.get(m.Branch, ref)
        if branch is not None:
            if branch.head is None:
                raise EmptyBranch(
                    f"branch {_shown(ref)} has no checkpoint yet: commit to it, or branch from a "
                    "ref that has one"
                )
            target = branch.head
        else:
            tag = s.get(m.Tag, ref)
            if tag is not None:
                target = tag.checkpoint
        row = s.get(m.Checkpoint, target if target is not None else ref)
        if row is not None:
            return row
        if target is None and len(ref) >= MIN_PREFIX:
            id_col = col(m.Checkpoint.id)
            stmt = select(m.Checkpoint).where(
                id_col >= ref, id_col.startswith(ref, autoescape=True)
            )
            if ord(ref[-1]) < 0x10FFFF:
                # An explicit upper bound turns the prefix match into an index range scan.
                stmt = stmt.where(id_col < ref[:-1] + chr(ord(ref[-1]) + 1))
            found = s.exec(stmt.order_by(id_col).limit(11)).all()
            if len(found) == 1:
                return found[0]
            if found:
                shown = ", ".join(c.id for c in found[:10]) + (", ..." if len(found) > 10 else "")
                raise AmbiguousRef(
                    f"ref {_shown(ref)} is a prefix of several checkpoints ({shown}): "
                    "type more characters"
                )
        raise RefNotFound(f"no branch, tag or checkpoint matches {_shown(ref)}: {_REFS_HINT}")

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every checkpoint, oldest first."""
        with self._session() as s:
            return _fetch_records(s, _ALL_RECORDS.format(order="c.created, c.id"), {})

    def log(self, branch: str, *, limit: int | None = None) -> list[CheckpointRecord]:
        """The branch's history, newest first: its head, then first parents back to a root,
        across branch points (like ``git log``). Empty for an empty branch."""
        if limit is not None and limit <= 0:
            return []
        with self._session() as s:
            head = self._branch_row(s, branch).head
            if head is None:
                return []
            bound = "" if limit is None else "AND w.n + 1 < :limit"
            chain = _LOG.format(bound=bound)
            params = {"head": head, "limit": limit}
            sql = _RECORDS.format(with_=chain, source="chain", order="w.n")
            return _fetch_records(s, sql, params)

    def ancestors(self, ref: str, *, depth: int | None = None) -> RecordList:
        """Every ancestor of ``ref`` through all parents, nearest first (ties: newest first);
        ``ref`` itself is not included. ``depth`` stops the walk that many edges away.

        A :class:`RecordList`. This call reads the answer's structure: which checkpoints, in
        what order, and each one's ``id``, ``branch``, ``step`` and ``parents``. Every other
        field is deferred: the first access to any record reads them for all records of the
        list at once (one more transaction), not earlier. Checkpoint rows never change once
        committed, except ``pruned`` (set by garbage collection), which is therefore the
        value at that first access; rows are never deleted."""
        return self._walk(ref, up=True, depth=depth)

    def descendants(self, ref: str, *, depth: int | None = None) -> RecordList:
        """Every descendant of ``ref`` through all children, nearest first (ties: oldest
        first); ``ref`` itself is not included. ``depth`` stops the walk that many edges
        away.

        A :class:`RecordList`, as for :meth:`ancestors`: this call reads ``id``, ``branch``,
        ``step`` and ``parents`` of every descendant, in order; the other fields are read for
        all of them at the first access to any record (``pruned`` as it is then)."""
        return self._walk(ref, up=False, depth=depth)

    def _walk(self, ref: str, *, up: bool, depth: int | None) -> RecordList:
        if depth is not None and depth <= 0:
            return RecordList([], {})
        pg = self._dialect == "postgresql"
        params: dict[str, Any] = {"ref": ref}
        if depth is not None:
            params["depth"] = depth
        runs: Sequence[Any] = ()
        with self._session() as s:
            conn = s.connection()
            if isinstance(ref, str) and ref and not _unstorable(ref):
                # One round trip: the statement resolves a branch, a tag or an id itself.
                sql = _lane_walk_sql(up=up, bounded=depth is not None, pg=pg, resolve=True)
                runs = conn.execute(text(sql), params).all()
            if not runs:
                # No start row: an id prefix, or not a ref at all (_resolve says which).
                params["ref"] = self._resolve(s, ref).id
                sql = _lane_walk_sql(up=up, bounded=depth is not None, pg=pg, resolve=False)
                runs = conn.execute(text(sql), params).all()
        rows = _lane_rows(runs, up=up, depth=depth, pg=pg)
        return RecordList(rows, {} if not rows else None, self._deferred_columns)

    def _deferred_columns(self, rows: Sequence[Sequence[Any]]) -> dict[str, Sequence[Any]]:
        """The columns a RecordList defers (see records.Deferred: the id, then those) of its
        rows, by id, read in one transaction; rows that are not in the table are left out.

        Read by lane ranges like the walk (an index range scan per run of consecutive lane
        positions), not by id: 10^4 id lookups took 39 ms on SQLite, the ranges 28 ms.
        """
        by_lane: dict[str, list[int]] = {}
        for row in rows:
            by_lane.setdefault(row[3], []).append(row[4])
        runs: list[tuple[str, int, int]] = []
        for lane, positions in by_lane.items():
            low, high = min(positions), max(positions)
            if high - low + 1 == len(positions):  # the usual case: (lane, pos) are unique
                runs.append((lane, low, high))
                continue
            positions.sort()  # gaps: a depth-bounded walk entered this lane more than once
            start = positions[0]
            for before, pos in itertools.pairwise(positions):
                if pos != before + 1:
                    runs.append((lane, start, before))
                    start = pos
            runs.append((lane, start, positions[-1]))
        pg = self._dialect == "postgresql"
        sql = text(_DEFERRED[pg])
        found: dict[str, Sequence[Any]] = {}
        with self._session() as s:
            conn = s.connection()
            for i in range(0, len(runs), _DEFERRED_CHUNK):
                chunk = runs[i : i + _DEFERRED_CHUNK]
                if pg:
                    lanes, lows, highs = (list(x) for x in zip(*chunk, strict=True))
                    params: dict[str, Any] = {"lanes": lanes, "lows": lows, "highs": highs}
                else:
                    params = {"runs": json.dumps(chunk)}
                found.update({row[0]: row for row in conn.execute(sql, params).all()})
        return found

    def children(self, checkpoint_id: str) -> list[CheckpointRecord]:
        """The direct children of a checkpoint (any ref is accepted), oldest first."""
        with self._session() as s:
            parent = self._resolve(s, checkpoint_id).id
            kids = "WITH kids(id) AS (SELECT child FROM edge WHERE parent = :parent)"
            sql = _RECORDS.format(with_=kids, source="kids", order="c.created, c.id")
            return _fetch_records(s, sql, {"parent": parent})

    def edges(self, ref: str) -> list[Edge]:
        """The edges from the checkpoint ``ref`` resolves to, to its parents, in parent order."""
        with self._session() as s:
            child = self._resolve(s, ref).id
            rows = s.exec(
                select(m.Edge).where(m.Edge.child == child).order_by(col(m.Edge.position))
            ).all()
            return [
                Edge(child=r.child, parent=r.parent, kind=r.kind, position=r.position) for r in rows
            ]

    def best_ancestor(self, signature: Sequence[str]) -> tuple[CheckpointRecord, int] | None:
        """The unpruned checkpoint whose architecture signature shares the longest prefix with
        ``signature``, and the matched depth; ties go to the higher ``val_accuracy`` metric,
        then to the newest. None when not even the first module matches.

        Indexed lookups of ``layer_prefix``: a binary search over the depth finds the deepest
        matching prefix, one more query ranks the checkpoints that share it.
        """
        hashes = prefix_hashes(list(signature))
        if not hashes:
            return None
        live = col(m.Checkpoint.pruned).is_(None)
        joined = select(m.Checkpoint).join(
            m.LayerPrefix, col(m.LayerPrefix.checkpoint) == col(m.Checkpoint.id)
        )
        with self._session() as s:

            def matches(depth: int) -> bool:
                probe = (
                    select(m.LayerPrefix.checkpoint)
                    .join(m.Checkpoint, col(m.Checkpoint.id) == col(m.LayerPrefix.checkpoint))
                    .where(m.LayerPrefix.prefix == hashes[depth - 1], live)
                    .limit(1)
                )
                return s.connection().execute(probe).first() is not None

            # A checkpoint sharing depth d shares every shallower depth too, so the deepest
            # match is found by binary search: ~log2(len) probes of the prefix index, instead
            # of reading every row that shares a short (common) stem.
            low, high = 0, len(hashes)
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if matches(mid) else (low, mid - 1)
            if low == 0:
                return None
            row = s.exec(
                joined.where(m.LayerPrefix.prefix == hashes[low - 1], live)
                .order_by(
                    col(m.Checkpoint.val_accuracy).desc().nulls_last(),
                    col(m.Checkpoint.created).desc(),
                    col(m.Checkpoint.id).desc(),
                )
                .limit(1)
            ).one()
            return self._records(s, [row])[0], low

    def _get_row(self, s: Session, checkpoint_id: str) -> m.Checkpoint:
        row = s.get(m.Checkpoint, checkpoint_id)
        if row is None:
            raise RefNotFound(f"checkpoint {checkpoint_id!r} does not exist: {_REFS_HINT}")
        return row

    def _records(self, s: Session, rows: Sequence[m.Checkpoint]) -> list[CheckpointRecord]:
        """Detach rows into records, fetching every row's parents in a few batched queries."""
        parents: dict[str, list[str]] = {r.id: [] for r in rows}
        for chunk in _chunks(list(parents)):
            edges = s.exec(
                select(m.Edge.child, m.Edge.parent)
                .where(col(m.Edge.child).in_(chunk))
                .order_by(col(m.Edge.child), col(m.Edge.position))
            ).all()
            for child, parent in edges:
                parents[child].append(parent)
        return [_record(r, tuple(parents[r.id])) for r in rows]

    def common_ancestor(self, a: str, b: str) -> CheckpointRecord | None:
        """The lowest common ancestor of refs ``a`` and ``b`` (each counts as its own ancestor,
        so it is ``a`` when ``a`` is an ancestor of ``b``); None when they share no history.

        "Lowest" means no child of it is also a common ancestor. In a DAG with criss-cross
        merges there can be several; the one nearest to both (least summed distance) wins,
        then the newest. One query: two recursive ancestor walks, joined.
        """
        with self._session() as s:
            ids = {"a": self._resolve(s, a).id, "b": self._resolve(s, b).id}
            found = s.connection().execute(_LCA, ids).first()
            if found is None:
                return None
            return self._records(s, [self._get_row(s, found[0])])[0]

    def objects_of(self, ref: str) -> dict[str, int]:
        """The objects the checkpoint ``ref`` resolves to references: hash -> nbytes, sorted by
        hash. A pruned checkpoint lists only the objects garbage collection has not forgotten."""
        with self._session() as s:
            cid = self._resolve(s, ref).id
            rows = s.exec(
                select(m.Object.hash, m.Object.nbytes)
                .join(m.CheckpointObject, col(m.CheckpointObject.object) == col(m.Object.hash))
                .where(m.CheckpointObject.checkpoint == cid)
                .order_by(col(m.Object.hash))
            ).all()
            return {h: int(n) for h, n in rows}

    # -- garbage collection ------------------------------------------------------------

    def gc_plan(
        self,
        *,
        keep_last: int | None = None,
        grace: timedelta = timedelta(hours=24),
        now: datetime | None = None,
        store_objects: Iterable[str] | None = None,
        store_manifests: Iterable[str] | None = None,
    ) -> GcPlan:
        """Plan a collection; nothing is pruned or deleted (apply it with :meth:`apply_gc`).

        Checkpoints are never deleted, only *pruned*: kept are tagged checkpoints, branch heads
        and bases, and either every ancestor of those (``keep_last`` None) or the ``keep_last``
        newest on each branch's first-parent chain; every other checkpoint is pruned. An
        object is deletable when no kept, unpruned checkpoint references it.

        ``store_objects`` / ``store_manifests`` list what the store holds (hashes, manifest
        ids). Keys the registry does not reference are orphans (left by a crashed save, or a
        save still running): planning records when each was first seen, and an orphan is only
        due once that is ``grace`` before ``now`` — no file times involved. An orphan that got
        committed meanwhile, or left a listing, is forgotten; None (the default) skips that
        kind's listing and keeps its record. Planning writes only those records.
        """
        if keep_last is not None and keep_last < 1:
            raise ValueError(
                f"keep_last must be at least 1 (branch heads are kept), not {keep_last}"
            )
        if grace < timedelta(0):
            raise ValueError(f"grace must not be negative, got {grace}")
        now = m.utcnow() if now is None else now
        if now.utcoffset() is None:
            raise ValueError(f"now must be timezone-aware, got {now!r}")
        listed = {
            "object": None if store_objects is None else set(map(str, store_objects)),
            "manifest": None if store_manifests is None else set(map(str, store_manifests)),
        }
        with self._session() as s:
            prune, objects = self._gc_compute(s, keep_last)
        with self._session(write=True) as s:
            for kind, keys in listed.items():
                self._track_orphans(s, kind, keys, now)
            orphans, waiting = self._due_orphans(s, now - grace)
        return GcPlan(
            created=now,
            keep_last=keep_last,
            grace=grace,
            prune=tuple(prune),
            objects=tuple(sorted(objects.items())),
            orphan_objects=tuple(orphans["object"]),
            orphan_manifests=tuple(orphans["manifest"]),
            waiting=waiting,
        )

    def apply_gc(self, plan: GcPlan) -> GcPlan:
        """Carry out the database half of ``plan`` in one transaction; return what may now be
        deleted from the store.

        The plan is re-checked under the GC lock: only what it lists *and* still qualifies is
        acted on (a checkpoint that became a head, base or tag since is kept; an object a new
        checkpoint references is kept; a committed orphan is kept). Pruned checkpoints are
        marked, and every returned key is marked doomed, so commits that reference one are
        refused with BeingCollected until it is forgotten.

        The protocol, safe against a crash at any point: ``done = apply_gc(plan)``; delete
        ``done.objects``, ``done.orphan_objects`` and ``done.orphan_manifests`` from the store
        (deleting a missing key is fine); then ``forget_objects(...)`` with the same keys. A
        crash before ``forget_objects`` leaves the keys doomed, and the next ``gc_plan`` plans
        them again.
        """
        with self._session(write=True) as s:
            self._gc_lock(s, shared=False)
            prune, _ = self._gc_compute(s, plan.keep_last)
            prune = sorted(set(prune) & set(plan.prune))
            now = m.utcnow()
            for chunk in _chunks(prune):
                s.exec(
                    update(m.Checkpoint)
                    .where(col(m.Checkpoint.id).in_(chunk), col(m.Checkpoint.pruned).is_(None))
                    .values(pruned=now)
                )
            _, deletable = self._gc_compute(s, plan.keep_last)
            objects = sorted((h, n) for h, n in plan.objects if h in deletable)
            orphans, _ = self._due_orphans(s, plan.created - plan.grace)
            due = {
                "object": sorted(set(plan.orphan_objects) & set(orphans["object"])),
                "manifest": sorted(set(plan.orphan_manifests) & set(orphans["manifest"])),
            }
            doom = [("object", h) for h, _ in objects]
            doom += [(kind, key) for kind, keys in due.items() for key in keys]
            for i in range(0, len(doom), _CHUNK):
                stmt = self._insert(m.GcCandidate).values(
                    [
                        {"kind": kind, "key": key, "first_seen": now, "doomed": now}
                        for kind, key in doom[i : i + _CHUNK]
                    ]
                )
                s.exec(
                    stmt.on_conflict_do_update(index_elements=["kind", "key"], set_={"doomed": now})
                )
            return GcPlan(
                created=plan.created,
                keep_last=plan.keep_last,
                grace=plan.grace,
                prune=tuple(prune),
                objects=tuple(objects),
                orphan_objects=tuple(due["object"]),
                orphan_manifests=tuple(due["manifest"]),
                waiting=plan.waiting,
            )

    def forget_objects(self, hashes: Iterable[str], *, manifests: Iterable[str] = ()) -> None:
        """Drop the registry's memory of store keys whose bytes the caller deleted after
        :meth:`apply_gc`: object rows (and pruned checkpoints' references to them) and the
        doomed marks, so a later save may write and commit those keys afresh.

        Idempotent. Raises NotCollectable, changing nothing, for a key apply_gc did not hand
        out (it may be live).
        """
        keys = {
            "object": sorted(set(map(str, hashes))),
            "manifest": sorted(set(map(str, manifests))),
        }
        cand = m.GcCandidate
        with self._session(write=True) as s:
            for kind, names in keys.items():
                for chunk in _chunks(names):
                    doomed = set(
                        s.exec(
                            select(cand.key).where(
                                cand.kind == kind,
                                col(cand.key).in_(chunk),
                                col(cand.doomed).is_not(None),
                            )
                        ).all()
                    )
                    table = m.Object.hash if kind == "object" else m.Checkpoint.id
                    known = set(s.exec(select(table).where(col(table).in_(chunk))).all())
                    live = sorted((known - doomed) if kind == "object" else known)
                    if live:
                        raise NotCollectable(
                            f"{kind} {live[0]!r} was not handed out by apply_gc (it may be "
                            "live): forget only the keys apply_gc returned"
                        )
                    if kind == "object":
                        s.exec(
                            delete(m.CheckpointObject).where(
                                col(m.CheckpointObject.object).in_(chunk)
                            )
                        )
                        s.exec(delete(m.Object).where(col(m.Object.hash).in_(chunk)))
                    s.exec(delete(cand).where(cand.kind == kind, col(cand.key).in_(chunk)))

    def _gc_compute(self, s: Session, keep_last: int | None) -> tuple[list[str], dict[str, int]]:
        """(checkpoints to prune, deletable objects hash -> nbytes) as the database is now.

        One statement, so the kept set is walked once for both answers.
        """
        # PostgreSQL estimates a recursive CTE's working table at 10x its seed (hundreds of
        # heads here) and then hash-joins it against a full scan of edge on every iteration:
        # quadratic. A LATERAL subquery behind OFFSET 0 (which stops the planner from
        # flattening it) pins each step to an index lookup. SQLite has no LATERAL and always
        # drives the join from the one queued row.
        if self._dialect == "postgresql":
            step = _GC_STEP_PG
        else:
            step = _GC_STEP_SQLITE
        if keep_last is None:
            walk = step.format(walk="keep", more="", where="")
            keep, params = _KEEP_REACHABLE.format(step=walk), {}
        else:
            where = " WHERE e.position = 0 AND w.n < :n"
            walk = step.format(walk="chain", more=", w.n + 1", where=where)
            keep, params = _KEEP_LAST.format(step=walk), {"n": keep_last}
        prune: list[str] = []
        objects: dict[str, int] = {}
        for kind, key, nbytes in s.connection().execute(text(keep + _GC_ANSWER), params):
            if kind == "p":
                prune.append(key)
            else:
                objects[key] = int(nbytes)
        return sorted(prune), objects

    def _track_orphans(self, s: Session, kind: str, listed: set[str] | None, now: datetime) -> None:
        """Record first sightings of unreferenced keys of ``kind`` and forget candidates that
        got referenced (or, with a listing, left the store)."""
        cand = m.GcCandidate
        table = m.Object.hash if kind == "object" else m.Checkpoint.id
        undoomed = (cand.kind == kind, col(cand.doomed).is_(None))
        s.exec(delete(cand).where(*undoomed, exists().where(col(table) == cand.key)))
        if listed is None:
            return
        names = sorted(listed)
        known: set[str] = set()
        for chunk in _chunks(names):
            known.update(s.exec(select(table).where(col(table).in_(chunk))).all())
        orphans = [k for k in names if k not in known]
        tracked = set(s.exec(select(cand.key).where(*undoomed)).all())
        gone = sorted(tracked - set(orphans))
        for chunk in _chunks(gone):
            s.exec(delete(cand).where(*undoomed, col(cand.key).in_(chunk)))
        for chunk in _chunks(orphans):
            stmt = self._insert(cand).values(
                [{"kind": kind, "key": k, "first_seen": now, "doomed": None} for k in chunk]
            )
            s.exec(stmt.on_conflict_do_nothing(index_elements=["kind", "key"]))

    @staticmethod
    def _due_orphans(s: Session, cutoff: datetime) -> tuple[dict[str, list[str]], int]:
        """Unreferenced candidates that are doomed or were first seen by ``cutoff``, and how
        many more are still waiting out the grace."""
        cand = m.GcCandidate
        due: dict[str, list[str]] = {"object": [], "manifest": []}
        waiting = 0
        for kind, table in (("object", m.Object.hash), ("manifest", m.Checkpoint.id)):
            rows = s.exec(
                select(cand.key, or_(col(cand.doomed).is_not(None), cand.first_seen <= cutoff))
                .where(cand.kind == kind, ~exists().where(col(table) == cand.key))
                .order_by(col(cand.key))
            ).all()
            due[kind] = [k for k, ready in rows if ready]
            waiting += sum(1 for _, ready in rows if not ready)
        return due, waiting

    # -- tags ----------------------------------------------------------------------------

    def tag(self, ref: str, name: str) -> Tag:
        """Name the checkpoint ``ref`` resolves to; raises TagExists, InvalidName, RefNotFound."""
        validate_name(name, "tag")
        with self._session(write=True) as s:
            self._gc_lock(s, shared=True)
            target = self._live(self._resolve(s, ref), f"tag it {_shown(name)}").id
            row = m.Tag(name=name, checkpoint=target, created=m.utcnow())
            try:
                s.exec(self._insert(m.Tag).values(**row.model_dump()))
            except IntegrityError:
                raise TagExists(
                    f"tag {_shown(name)} already exists: pick another name, or delete it with "
                    f"'tlreg tag -d {name}'"
                ) from None
            return Tag(name=row.name, checkpoint=row.checkpoint, created=row.created)

    def tags(self) -> list[Tag]:
        """Every tag, sorted by name."""
        with self._session() as s:
            rows = s.exec(select(m.Tag).order_by(col(m.Tag.name))).all()
            return [Tag(name=r.name, checkpoint=r.checkpoint, created=r.created) for r in rows]

    def delete_tag(self, name: str) -> None:
        """Delete a tag (the checkpoint stays); raises RefNotFound."""
        with self._session(write=True) as s:
            deleted = 0
            if not _unstorable(name):
                deleted = s.exec(delete(m.Tag).where(col(m.Tag.name) == name)).rowcount
            if deleted != 1:
                raise RefNotFound(f"tag {_shown(name)} does not exist: list tags with 'tlreg tag'")

    # -- runs ----------------------------------------------------------------------------

    def start_run(
        self, branch: str, config: Mapping[str, Any], *, ray_job_id: str | None = None
    ) -> Run:
        """Record a run on ``branch`` in status "running". ``config`` must be JSON-serialisable
        (it is stored as JSON; tuples come back as lists). Raises BranchNotFound."""
        stored = json.loads(json.dumps(dict(config), allow_nan=False))
        with self._session(write=True) as s:
            self._branch_row(s, branch)
            row = m.Run(branch=branch, config=stored, ray_job_id=ray_job_id, created=m.utcnow())
            s.add(row)
            s.flush()
            return _run(row)

    def finish_run(self, run_id: int, *, status: str, error: str | None = None) -> Run:
        """Mark a run "succeeded", "failed" or "stopped" (with ``error`` saying why); raises
        RunNotFound."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"a run finishes as one of {RUN_STATUSES[1:]}, not {status!r}")
        with self._session(write=True) as s:
            row = s.get(m.Run, run_id, with_for_update=True)
            if row is None:
                raise RunNotFound(f"run {run_id} does not exist: list runs with Registry.runs()")
            row.status = status
            row.error = error
            row.finished = m.utcnow()
            s.flush()
            return _run(row)

    def runs(self, branch: str | None = None) -> list[Run]:
        """Every run (or those on ``branch``), oldest first."""
        with self._session() as s:
            stmt = select(m.Run).order_by(col(m.Run.id))
            if branch is not None:
                stmt = stmt.where(m.Run.branch == branch)
            return [_run(r) for r in s.exec(stmt).all()]


# A parent's branch, lane and lane position, and whether its lane already goes on past it.
_NEXT = aliased(m.Checkpoint)
_PARENT_COLUMNS = (
    m.Checkpoint.branch,
    m.Checkpoint.lane,
    m.Checkpoint.lane_pos,
    exists()
    .where(
        col(_NEXT.lane) == col(m.Checkpoint.lane),
        col(_NEXT.lane_pos) == col(m.Checkpoint.lane_pos) + 1,
    )
    .correlate(m.Checkpoint)
    .label("extended"),
)

# -- lineage SQL ---------------------------------------------------------------------------
# Plain SQL both backends run. Every step of a walk is an index lookup: edge's primary key
# (child, parent) going up, ix_edge_parent (parent, child) going down.

_LCA = text(
    """
WITH RECURSIVE up_a(id, d) AS (
    SELECT id, 0 FROM checkpoint WHERE id = :a
    UNION SELECT e.parent, u.d + 1 FROM edge e JOIN up_a u ON e.child = u.id
), up_b(id, d) AS (
    SELECT id, 0 FROM checkpoint WHERE id = :b
    UNION SELECT e.parent, u.d + 1 FROM edge e JOIN up_b u ON e.child = u.id
), common(id, d) AS (
    SELECT x.id, min(x.d) + min(y.d) FROM up_a x JOIN up_b y ON x.id = y.id GROUP BY x.id
)
SELECT c.id FROM common c JOIN checkpoint k ON k.id = c.id
WHERE NOT EXISTS (
    SELECT 1 FROM edge e JOIN common below ON below.id = e.child WHERE e.parent = c.id
)
ORDER BY c.d, k.created DESC, k.id DESC
LIMIT 1
"""
)

# A commit's object references, edges and layer prefixes in one PostgreSQL statement (SQLite
# runs in-process: there, three executemany calls cost no round trips). The foreign keys to
# the checkpoint row, inserted just before, are checked at the end of the statement.
_CHILD_ROWS_PG = text(
    """
WITH refs AS (
    INSERT INTO checkpoint_object (checkpoint, object)
    SELECT :id, o FROM unnest(CAST(:objects AS text[])) AS o
), edges AS (
    INSERT INTO edge (child, parent, kind, position)
    SELECT :id, e.parent, e.kind, e.n - 1
    FROM unnest(CAST(:parents AS text[]), CAST(:kinds AS text[])) WITH ORDINALITY
        AS e(parent, kind, n)
), links AS (
    INSERT INTO lane_link (parent_lane, parent_pos, child_lane, child_pos)
    SELECT l.lane, l.pos, :lane, :lane_pos
    FROM unnest(CAST(:link_lanes AS text[]), CAST(:link_pos AS bigint[])) AS l(lane, pos)
)
INSERT INTO layer_prefix (checkpoint, depth, prefix)
SELECT :id, l.n, l.prefix FROM unnest(CAST(:prefixes AS text[])) WITH ORDINALITY AS l(prefix, n)
"""
)

# Records from plain rows (no ORM objects): a checkpoint's columns and its parents in order,
# one output row per parent (a root gets one row with a NULL parent), decoded by
# _fetch_records. ``{with_}`` defines the CTE ``{source}`` of ids (aliased w) that ``{order}``
# sorts by; the rows of one checkpoint stay together, first parent first.
_RECORDS = """{with_}
SELECT c.id, c.branch, c.step, c.manifest, c.created, CAST(c.metrics AS TEXT),
       c.logical_bytes, c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id,
       c.pruned, p.parent
FROM {source} w JOIN checkpoint c ON c.id = w.id
LEFT JOIN edge p ON p.child = c.id
ORDER BY {order}, p.position"""
# checkpoints() reads the whole table.
_ALL_RECORDS = """
SELECT c.id, c.branch, c.step, c.manifest, c.created, CAST(c.metrics AS TEXT),
       c.logical_bytes, c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id,
       c.pruned, p.parent
FROM checkpoint c
LEFT JOIN edge p ON p.child = c.id
ORDER BY {order}, p.position"""
# log: first parents from the head, numbered.
_LOG = """
WITH RECURSIVE chain(id, n) AS (
    SELECT id, 0 FROM checkpoint WHERE id = :head
    UNION ALL SELECT e.parent, w.n + 1 FROM chain w JOIN edge e ON e.child = w.id
    WHERE e.position = 0 {bound}
)"""
# ancestors / descendants over lanes (schema v3; see models.Checkpoint.lane). ``start`` is the
# checkpoint a ref names (a branch's head, a tag's checkpoint, else an id), or the id given.
# ``entry`` walks the few lane links: (lane, pos, d) says that checkpoint ``lane[pos]`` is
# ``d`` edges from the start, and so is every checkpoint of the lane past it (descendants) or
# before it (ancestors) at ``d`` plus the positions between (a lane's positions are 0, 1, 2,
# ... and it is committed on one branch). Parents come from ``edge`` only for the first
# checkpoint of a lane; any other checkpoint's one parent is the one before it in its lane.
# Only the narrow columns that make the answer complete as a structure (records.RecordList
# reads the others, _DEFERRED, on first access).
#
# The statement returns one row per entry, not one per checkpoint: ``run`` is the entry's
# first answer row (its position and distance; one step on from the start itself), then the
# lane's branch, the run's rows in walk order (an index range scan of ``(lane, lane_pos)``) as
# one JSON array of three columns [ids, steps, created], the parents of the lane's first
# checkpoint when the run holds it (the only checkpoint of a lane with edge rows of its own),
# and the lane's previous checkpoint where the run's nearest row (descendants) or its row at
# the depth bound (ancestors) has a parent that may not be a row. _lane_rows merges the runs
# into the answer's order. Producing, sorting and returning the 10^4 rows of a large answer
# one by one (and SQLAlchemy's work per row) cost more than the walk; the runs are ~10 rows.
_LANE_START = {
    True: """start(id) AS (
    SELECT head FROM branch WHERE name = :ref
    UNION ALL SELECT checkpoint FROM tag
    WHERE name = :ref AND NOT EXISTS (SELECT 1 FROM branch WHERE name = :ref)
    UNION ALL SELECT CAST(:ref AS TEXT) WHERE NOT EXISTS (SELECT 1 FROM branch WHERE name = :ref)
        AND NOT EXISTS (SELECT 1 FROM tag WHERE name = :ref)
)""",
    False: "start(id) AS (SELECT CAST(:ref AS TEXT))",
}
_LANE_WALK = """
WITH RECURSIVE {start},
entry(lane, pos, d) AS (
    SELECT c.lane, c.lane_pos, CAST(0 AS BIGINT) FROM start s JOIN checkpoint c ON c.id = s.id
    UNION SELECT {link_lane}, {link_pos}, {step_d}
    FROM entry e {open}lane_link l {on} {link_on} {close_l}
    {bound}
),
run(lane, pos, d) AS (
    SELECT lane, pos {away} CASE WHEN d = 0 THEN 1 ELSE 0 END,
        d + CASE WHEN d = 0 THEN 1 ELSE 0 END
    FROM entry
)
SELECT r.lane, r.pos, r.d,
    (SELECT y.branch FROM checkpoint y WHERE y.lane = r.lane AND y.lane_pos = r.pos),
    (SELECT {columns} FROM (
        SELECT c.id, c.step, {created} AS created FROM checkpoint c
        WHERE c.lane = r.lane AND c.lane_pos BETWEEN {low} AND {high}
        ORDER BY c.lane_pos{dir}) x),
    CASE WHEN {root} THEN {parents} END,
    CASE WHEN {pred_if} THEN (
        SELECT x.id FROM checkpoint x WHERE x.lane = r.lane AND x.lane_pos = {pred_at}
    ) END
FROM run r"""
# Per direction (up=False, up=True): the link's far end and its distance; a run's rows, by
# their lowest and highest position (unbounded, bounded: BETWEEN even without a bound, which
# PostgreSQL estimates as a few rows and reads by an index scan in order, where it chose a
# bitmap scan and a sort for ``>=``); whether the run holds its lane's first checkpoint; and
# which row's previous checkpoint it reports (a condition on the run, that position - 1).
_LAST_POS = str(2**63 - 1)
_LANE_DIRECTION: dict[bool, dict[str, Any]] = {
    False: {
        "link_lane": "l.child_lane",
        "link_pos": "l.child_pos",
        "link_on": "l.parent_lane = e.lane AND l.parent_pos >= e.pos",
        "step_d": "e.d + l.parent_pos - e.pos + 1",
        "away": "+",
        "low": ("r.pos", "r.pos"),
        "high": (_LAST_POS, "r.pos + :depth - r.d"),
        "dir": "",
        "root": ("r.pos = 0", "r.pos = 0"),
        "pred": (("r.d = 1 AND r.pos > 0", "r.pos - 1"),) * 2,
    },
    True: {
        "link_lane": "l.parent_lane",
        "link_pos": "l.parent_pos",
        "link_on": "l.child_lane = e.lane AND l.child_pos <= e.pos",
        "step_d": "e.d + e.pos - l.child_pos + 1",
        "away": "-",
        "low": ("0", "r.pos + r.d - :depth"),
        "high": ("r.pos", "r.pos"),
        "dir": " DESC",
        "root": ("r.pos >= 0", "r.pos >= 0 AND r.pos + r.d - :depth <= 0"),
        "pred": (
            ("1 = 0", "NULL"),
            ("r.pos + r.d - :depth BETWEEN 1 AND r.pos", "r.pos + r.d - :depth - 1"),
        ),
    },
}
# A run's rows as one JSON array of columns (SQLite, PostgreSQL), aggregated in the order of
# the subquery (an index range scan, or its sort).
_LANE_COLUMNS = {
    False: "'[' || json_group_array(x.id) || ',' || json_group_array(x.step) || ','"
    " || json_group_array(x.created) || ']'",
    True: "CAST(json_build_array(json_agg(x.id), json_agg(x.step), json_agg(x.created)) AS TEXT)",
}
# ``created`` only orders rows of several runs at one distance: SQLite's stored text (what
# ORDER BY compared; the registry writes one shape); PostgreSQL's binary form as hex text
# ('\x' and 16 hex digits: microseconds since 2000 as a big-endian int64), which orders
# as the time does while all are on one side of 2000 (see _lane_rows). EXTRACT(EPOCH ...) cost
# 2 ms more per 10^4 rows, to_char 3 ms more.
_LANE_CREATED = {
    False: "c.created",
    True: "timestamptz_send(c.created)",
}
# Backend-specific parts. How ``entry`` rows reach lane rows: an index range scan per entry.
# SQLite plans that join so; PostgreSQL is made to, with a LATERAL subquery kept apart by
# OFFSET 0: left to itself it estimates the few entries as dozens, each matching a thousand
# rows, and hash-joins them against a full scan of the table (40 ms for 1,000 rows at 10^5).
_LANE_JOIN = {
    False: {
        "open": "JOIN ",
        "on": "ON",
        "close_c": "",
        "close_l": "",
    },
    True: {
        "open": "CROSS JOIN LATERAL (SELECT * FROM ",
        "on": "WHERE",
        "close_c": "OFFSET 0) c",
        "close_l": "OFFSET 0) l",
    },
}
# The deferred columns of a RecordList, for a chunk of lane runs (lane, first and last
# position): a JSON array of triples on SQLite, three arrays on PostgreSQL. PostgreSQL sends
# times as UTC text, parsed when a record is built (as SQLite's are): psycopg's timestamptz
# parsing was a fifth of fetching 10^4 rows.
_DEFERRED_COLUMNS = """c.id, c.manifest, {created}, CAST(c.metrics AS TEXT), c.logical_bytes,
       c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id, {pruned}"""
_DEFERRED = {
    False: "SELECT "
    + _DEFERRED_COLUMNS.format(created="c.created", pruned="c.pruned")
    + """
FROM json_each(:runs) r JOIN checkpoint c ON c.lane = json_extract(r.value, '$[0]')
    AND c.lane_pos BETWEEN json_extract(r.value, '$[1]') AND json_extract(r.value, '$[2]')""",
    True: "SELECT "
    + _DEFERRED_COLUMNS.format(
        created="CAST(c.created AT TIME ZONE 'UTC' AS TEXT)",
        pruned="CAST(c.pruned AT TIME ZONE 'UTC' AS TEXT)",
    )
    + """
FROM unnest(CAST(:lanes AS text[]), CAST(:lows AS bigint[]), CAST(:highs AS bigint[]))
    AS r(lane, lo, hi)
CROSS JOIN LATERAL (
    SELECT * FROM checkpoint WHERE lane = r.lane AND lane_pos BETWEEN r.lo AND r.hi OFFSET 0
) c""",
}
_DEFERRED_CHUNK = 1000  # lane runs per statement: bounds a statement's size, not the answer's
# The parents of a run's lane's first checkpoint, in order, as a JSON array of ids (SQLite,
# PostgreSQL); evaluated only for runs that hold it.
_LANE_FIRST = "(SELECT y.id FROM checkpoint y WHERE y.lane = r.lane AND y.lane_pos = 0)"
_LANE_PARENTS = {
    False: f"""(SELECT json_group_array(x.parent) FROM (
            SELECT parent FROM edge WHERE child = {_LANE_FIRST} ORDER BY position) x)""",
    True: f"""(SELECT CAST(json_agg(x.parent ORDER BY x.position) AS TEXT)
            FROM edge x WHERE x.child = {_LANE_FIRST})""",
}


@functools.cache
def _lane_walk_sql(*, up: bool, bounded: bool, pg: bool, resolve: bool) -> str:
    """The lineage statement (see _LANE_WALK) for a direction, a depth bound or none, a
    backend, and a ref to resolve (or a checkpoint id)."""
    way = _LANE_DIRECTION[up]
    pred_if, pred_at = way["pred"][bounded]
    return _LANE_WALK.format(
        start=_LANE_START[resolve],
        link_lane=way["link_lane"],
        link_pos=way["link_pos"],
        link_on=way["link_on"],
        step_d=way["step_d"],
        bound=f"WHERE {way['step_d']} <= :depth" if bounded else "",
        away=way["away"],
        columns=_LANE_COLUMNS[pg],
        created=_LANE_CREATED[pg],
        low=way["low"][bounded],
        high=way["high"][bounded],
        dir=way["dir"],
        root=way["root"][bounded],
        parents=_LANE_PARENTS[pg],
        pred_if=pred_if,
        pred_at=pred_at,
        **_LANE_JOIN[pg],
    )


# Digits (decimal and hex) reversed: ``created.translate(_COMPLEMENT)`` orders texts of one
# shape newest first.
_COMPLEMENT = str.maketrans("0123456789abcdef", "fedcba9876543210")
_SHAPE = str.maketrans("0123456789abcdef", "0000000000000000")


def _lane_rows(
    runs: Sequence[Sequence[Any]], *, up: bool, depth: int | None, pg: bool
) -> list[tuple[Any, ...]]:
    """The rows of a RecordList (id, branch, step, lane, lane_pos, parents, previous) in the
    answer's order, from the runs of the lineage statement (see _LANE_WALK): nearest first,
    ties by ``created`` (oldest first going down, newest first going up), then by id; a
    checkpoint that several runs reach, once, at its nearest.

    Sorted by index, without a tuple per row: by ``created + id`` (texts of one length
    compare as the pairs do; going up, of one shape, digits reversed), then, stably, by
    distance; times of other shapes by id, then by time, then by distance.
    """
    rows: list[tuple[Any, ...]] = []
    ids: list[str] = []
    times: list[Any] = []
    distances: list[int] = []
    lanes: set[str] = set()
    filled = 0
    for lane, pos, d, branch, columns, parents, pred in runs:
        run_ids, steps, run_times = json.loads(columns) if columns is not None else ((), (), ())
        n = len(run_ids or ())
        if not n:
            continue  # nothing past (or before) the entry, or beyond the depth bound
        positions = range(pos, pos - n, -1) if up else range(pos, pos + n)
        nones = [None] * n
        run = list(
            zip(run_ids, [branch] * n, steps, [lane] * n, positions, nones, nones, strict=True)
        )
        if parents is not None:  # the lane's first checkpoint: row 0 going down, pos going up
            i = pos if up else 0
            run[i] = (*run[i][:5], parents, run[i][6])
        if pred is not None:  # the nearest row going down, the one at the depth bound going up
            i = depth - d if up and depth is not None else 0
            run[i] = (*run[i][:6], pred)
        rows += run
        ids += run_ids
        times += run_times
        distances += range(d, d + n)
        lanes.add(lane)
        filled += 1
    order = list(range(len(rows)))
    if filled > 1:
        if pg and min(times)[2] < "8" <= max(times)[2]:
            # Times on both sides of 2000 (a negative int64 is 8... to f... in hex): numbers.
            times = [int.from_bytes(bytes.fromhex(t[2:]), "big", signed=True) for t in times]
            uniform = False
        else:
            uniform = len(set(map(len, times))) == 1
        if up and uniform:
            uniform = len(set(map(str.translate, times, itertools.repeat(_SHAPE)))) == 1
        if uniform:
            if up:
                times = list(map(str.translate, times, itertools.repeat(_COMPLEMENT)))
            order.sort(key=list(map(operator.add, times, ids)).__getitem__)
        else:  # times of several shapes (not as this registry writes them): by id, then time
            order.sort(key=ids.__getitem__)
            order.sort(key=times.__getitem__, reverse=up)
        order.sort(key=distances.__getitem__)
    ordered = list(map(rows.__getitem__, order))
    if len(lanes) < filled:
        # Several runs in one lane (several links into it, or a bounded walk) may reach one
        # checkpoint more than once: keep its first, nearest, occurrence.
        seen: set[str] = set()
        ordered = [r for r in ordered if not (r[0] in seen or seen.add(r[0]))]  # type: ignore[func-returns-value]
    return ordered


# What garbage collection keeps: heads, bases and tags, and then every ancestor of those...
_KEEP_REACHABLE = """
WITH RECURSIVE keep(id) AS (
    SELECT head FROM branch WHERE head IS NOT NULL
    UNION SELECT base FROM branch WHERE base IS NOT NULL
    UNION SELECT checkpoint FROM tag
    UNION {step}
)"""
# ... or only the newest :n on each branch's first-parent chain.
_KEEP_LAST = """
WITH RECURSIVE chain(id, n) AS (
    SELECT head, 1 FROM branch WHERE head IS NOT NULL
    UNION {step}
), keep(id) AS (
    SELECT id FROM chain
    UNION SELECT base FROM branch WHERE base IS NOT NULL
    UNION SELECT checkpoint FROM tag
)"""
# One step of either walk: the parents of a queued row. See Registry._gc_compute for why
# PostgreSQL's differs.
_GC_STEP_SQLITE = "SELECT e.parent{more} FROM {walk} w JOIN edge e ON e.child = w.id{where}"
_GC_STEP_PG = """SELECT e.parent{more} FROM {walk} w CROSS JOIN LATERAL (
        SELECT parent, position FROM edge WHERE child = w.id OFFSET 0
    ) e{where}"""
# Checkpoints to prune ("p") and objects no kept, unpruned checkpoint references ("o").
_GC_ANSWER = """
, live(id) AS (
    SELECT k.id FROM keep k JOIN checkpoint c ON c.id = k.id WHERE c.pruned IS NULL
)
SELECT 'p', c.id, NULL FROM checkpoint c
WHERE c.pruned IS NULL AND NOT EXISTS (SELECT 1 FROM keep k WHERE k.id = c.id)
UNION ALL
SELECT 'o', o.hash, o.nbytes FROM object o
WHERE NOT EXISTS (
    SELECT 1 FROM checkpoint_object r JOIN live l ON l.id = r.checkpoint WHERE r.object = o.hash
)"""


def _unstorable(name: str) -> bool:
    """Whether no stored name can equal ``name`` (PostgreSQL text refuses NUL characters)."""
    return "\x00" in name


def retry_on_head_moved(
    fn: Callable[[], T], *, attempts: int = 5, backoff: float = 0.05, max_backoff: float = 1.0
) -> T:
    """Call ``fn`` until it does not raise HeadMoved, at most ``attempts`` times, sleeping
    ``backoff * 2**i`` seconds (capped at ``max_backoff``, with jitter) between tries; the
    last HeadMoved propagates. ``fn`` must read the branch head afresh on every call, e.g.
    ``lambda: reg.commit(b, cid, ..., expected_head=reg.get_branch(b).head)``.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except HeadMoved:
            if attempt == attempts - 1:
                raise
            time.sleep(min(max_backoff, backoff * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


# -- row -> record -------------------------------------------------------------------------


def _edge_kind(branch: str, parent_branch: str, n_parents: int) -> str:
    if n_parents > 1:
        return "merge"
    return "continue" if parent_branch == branch else "branch"


def _head_moved(branch: str, expected: str | None, actual: str | None) -> HeadMoved:
    return HeadMoved(
        f"branch {_shown(branch)} moved: expected head {_quote(expected)}, found {_quote(actual)}: "
        "resolve the branch again and retry the commit",
        branch=branch,
        expected=expected,
        actual=actual,
    )


def _record(row: m.Checkpoint, parents: tuple[str, ...]) -> CheckpointRecord:
    return CheckpointRecord(
        id=row.id,
        branch=row.branch,
        step=row.step,
        manifest=row.manifest,
        parents=parents,
        created=row.created,
        metrics=decode_metrics(row.metrics),
        logical_bytes=row.logical_bytes,
        new_bytes=row.new_bytes,
        kind=row.kind,
        message=row.message,
        signature=None if row.signature is None else tuple(row.signature),
        run_id=row.run_id,
        pruned=row.pruned,
    )


def _fetch_records(s: Session, sql: str, params: dict[str, Any]) -> list[CheckpointRecord]:
    """Run a _RECORDS query and build its records from the raw driver values.

    No ORM objects and no SQLAlchemy type processing: at 10^4 records those cost ~0.15 ms a
    record, ten times the decoding below. JSON columns arrive as text on both backends (the
    query casts them) and are decoded in one ``json.loads`` per call: the metrics of every
    record as one array, each distinct signature once (a model family shares one).
    """
    used = {k: v for k, v in params.items() if v is not None}
    rows = s.connection().execute(text(sql), used).all()
    groups: list[tuple[Any, tuple[str, ...]]] = []
    i, n = 0, len(rows)
    while i < n:
        row = rows[i]
        parents: tuple[str, ...] = () if row[13] is None else (row[13],)
        i += 1
        while i < n and rows[i][0] == row[0]:  # a merge: one row per parent, in order
            parents += (rows[i][13],)
            i += 1
        groups.append((row, parents))
    metrics = json.loads("[" + ",".join(row[5] for row, _ in groups) + "]")
    signatures: dict[str | None, tuple[str, ...] | None] = {None: None}
    for row, _ in groups:
        if row[10] not in signatures:
            decoded = json.loads(row[10])  # JSON null: no signature
            signatures[row[10]] = None if decoded is None else tuple(decoded)
    return [
        CheckpointRecord(
            id=row[0],
            branch=row[1],
            step=row[2],
            manifest=row[3],
            parents=parents,
            created=_utc(row[4]),
            metrics=decode_metrics(stored),
            logical_bytes=row[6],
            new_bytes=row[7],
            kind=row[8],
            message=row[9],
            signature=signatures[row[10]],
            run_id=row[11],
            pruned=None if row[12] is None else _utc(row[12]),
        )
        for (row, parents), stored in zip(groups, metrics, strict=True)
    ]


def _branch(row: m.Branch) -> Branch:
    return Branch(name=row.name, head=row.head, base=row.base, task=row.task, created=row.created)


def _run(row: m.Run) -> Run:
    assert row.id is not None  # flushed rows have their key
    return Run(
        id=row.id,
        branch=row.branch,
        config=dict(row.config),
        status=row.status,
        error=row.error,
        ray_job_id=row.ray_job_id,
        created=row.created,
        finished=row.finished,
    )
