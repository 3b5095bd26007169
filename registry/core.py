"""The registry: one SQLModel implementation over SQLite (embedded) and PostgreSQL (clusters).

:class:`Registry` is composed of one class per room, each in its own module: the
connection and session scope (:mod:`~tlreg.registry.engine`), branches, tags and refs
(:mod:`~tlreg.registry.refs`), the commit transaction (:mod:`~tlreg.registry.commit`), the
lineage walks (:mod:`~tlreg.registry.lineage`), garbage collection
(:mod:`~tlreg.registry.gc`), evaluation curves (:mod:`~tlreg.registry.metrics`) and branch
leases (:mod:`~tlreg.registry.leases`). This
module adds opening, the schema, meta values and runs.

Every public call opens one session and one transaction; a call that raises rolls its
transaction back, so a failed call leaves the database unchanged. Uniqueness (branch, tag and
checkpoint names) is enforced by primary keys and reported from the IntegrityError.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from sqlmodel import col, delete, select

from tlreg.registry import migrations
from tlreg.registry import models as m
from tlreg.registry.commit import (
    CHECKPOINT_KINDS,
    RANK_METRIC,
    TIERS,
    Commits,
    prefix_hashes,
    retry_on_head_moved,
)
from tlreg.registry.engine import (
    FORCE_ENV,
    MOUNTS,
    NETWORK_FILESYSTEMS,
    SQLITE_BUSY_TIMEOUT,
    filesystem_type,
    open_engine,
    schema_lock,
)
from tlreg.registry.errors import RunNotFound
from tlreg.registry.gc import GarbageCollection
from tlreg.registry.leases import Leases
from tlreg.registry.lineage import Lineage
from tlreg.registry.metrics import Browsing, Metrics
from tlreg.registry.records import Run, from_row
from tlreg.registry.refs import MIN_PREFIX, Refs, branch_row, run_nodes
from tlreg.storage_backends.credentials import without_password

__all__ = [
    "CHECKPOINT_KINDS",
    "FORCE_ENV",
    "MIN_PREFIX",
    "MOUNTS",
    "NETWORK_FILESYSTEMS",
    "RANK_METRIC",
    "RUN_STATUSES",
    "SQLITE_BUSY_TIMEOUT",
    "TIERS",
    "Registry",
    "filesystem_type",
    "prefix_hashes",
    "retry_on_head_moved",
]

RUN_STATUSES = ("running", "succeeded", "failed", "stopped")
"""Values of ``Run.status``."""


def _reopen(url: str, force: bool | None) -> Registry:
    return Registry(url, force=force)


class Registry(Refs, Commits, Lineage, GarbageCollection, Metrics, Browsing, Leases):
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
        self._connect(url, force=force)
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
        engine = open_engine(url, force=force)
        try:
            with engine.execution_options(tlreg_write=True).begin() as conn:
                schema_lock(conn)
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
        return f"Registry({without_password(self.url, mask=True)!r})"

    def _init_schema(self) -> None:
        with self._writer.begin() as conn:
            found = migrations.stored_version(conn)
            if found == m.SCHEMA_VERSION:
                return
            schema_lock(conn)
            found = migrations.stored_version(conn)  # another process may have created it
            if found is None:
                migrations.create_latest(conn)
            elif found < m.SCHEMA_VERSION:
                raise migrations.older_error(f"registry {self!r}", found)
            elif found > m.SCHEMA_VERSION:
                raise migrations.newer_error(f"registry {self!r}", found)

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

    # -- runs ----------------------------------------------------------------------------

    def start_run(
        self, branch: str, config: Mapping[str, Any], *, ray_job_id: str | None = None
    ) -> Run:
        """Record a run on ``branch`` in status "running". ``config`` must be JSON-serialisable
        (it is stored as JSON; tuples come back as lists). Raises BranchNotFound."""
        stored = json.loads(json.dumps(dict(config), allow_nan=False))
        with self._session(write=True) as s:
            branch_row(s, branch)
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
            return _run(row, run_nodes(s, [run_id]).get(run_id, {}))

    def record_run_nodes(self, run_id: int, nodes: Mapping[int, str]) -> Run:
        """Record the node each rank of run ``run_id`` runs on (rank -> node id), replacing
        what the run recorded before (a restarted worker group may run elsewhere). Raises
        RunNotFound, ValueError (a negative rank or an empty node id)."""
        given = {int(rank): str(node) for rank, node in nodes.items()}
        bad = [r for r, n in given.items() if r < 0 or not n or "\x00" in n]
        if bad:
            raise ValueError(
                f"run {run_id}: ranks are >= 0 and node ids non-empty text, got "
                f"{ {r: given[r] for r in sorted(bad)} }"
            )
        with self._session(write=True) as s:
            row = s.get(m.Run, run_id, with_for_update=True)
            if row is None:
                raise RunNotFound(f"run {run_id} does not exist: list runs with 'tlreg runs'")
            s.exec(delete(m.RunNode).where(col(m.RunNode.run_id) == run_id))
            if given:
                s.connection().execute(
                    self._insert(m.RunNode),
                    [{"run_id": run_id, "rank": r, "node_id": n} for r, n in sorted(given.items())],
                )
            return _run(row, given)

    def runs(self, branch: str | None = None) -> list[Run]:
        """Every run (or those on ``branch``), oldest first."""
        with self._session() as s:
            stmt = select(m.Run).order_by(col(m.Run.id))
            if branch is not None:
                stmt = stmt.where(m.Run.branch == branch)
            rows = s.exec(stmt).all()
            nodes = run_nodes(s, [r.id for r in rows if r.id is not None])
            return [_run(r, nodes.get(r.id, {}) if r.id is not None else {}) for r in rows]


def _run(row: m.Run, nodes: Mapping[int, str] | None = None) -> Run:
    return from_row(Run, row, config=dict(row.config), nodes=dict(nodes or {}))
