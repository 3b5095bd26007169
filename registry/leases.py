"""Branch leases: a branch has at most one live run.

A run (``tlreg train``, ``tlreg submit``'s job, or a Checkpointer of the Python API) takes
the branch's lease before it starts and heartbeats it while it works; a second one is refused
with :class:`BranchLeased`, which names the live holder (run, host, pid, since when). A
holder that dies stops heartbeating: once its lease has expired (``ttl_s`` after the last
heartbeat) the next run takes it over, and the dead holder's Run, still "running", is marked
"failed". Git's ``index.lock`` and Ray's GCS leases work alike, but here the database is the
lock, so it holds across machines on both backends.

Taking a lease is one transaction: SQLite's writers are serialised (``BEGIN IMMEDIATE``); on
PostgreSQL the lease row is locked ``FOR UPDATE``, and of two first takers only one INSERT
succeeds (``ON CONFLICT DO NOTHING``; the loser then sees the winner's committed row).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, select

from tlreg.registry import models as m
from tlreg.registry.engine import Database
from tlreg.registry.errors import RegistryError
from tlreg.registry.records import Run, from_row, utc
from tlreg.registry.refs import branch_row

LEASE_TTL_S = 60.0
"""Seconds a lease lives after its last heartbeat; holders heartbeat every third of it."""


class BranchLeased(RegistryError, BlockingIOError):
    """The branch has a live run: another holder's lease has not expired."""


class LeaseLost(RegistryError):
    """The holder's lease was taken over (it expired) or released by someone else."""


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a branch's lease, and until when."""

    branch: str
    token: str
    """Identifies the holder in :meth:`Leases.heartbeat_lease` and :meth:`Leases.release_lease`."""
    run_id: int | None
    holder: str
    """``run N``, or what an API user called itself."""
    host: str
    pid: int
    acquired: datetime
    heartbeat: datetime
    expires: datetime

    def describe(self, now: datetime | None = None) -> str:
        """``run 7 on host h (pid 12) since 2026-12-07 22:10:05 UTC, heartbeat 3 s ago``."""
        now = now or m.utcnow()
        ago = max(0, round((now - self.heartbeat).total_seconds()))
        return (
            f"{self.holder} on host {self.host} (pid {self.pid}) since "
            f"{self.acquired:%Y-%m-%d %H:%M:%S} UTC, heartbeat {ago} s ago"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (datetimes as ISO-8601)."""
        return {
            "branch": self.branch,
            "run_id": self.run_id,
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "acquired": self.acquired.isoformat(),
            "heartbeat": self.heartbeat.isoformat(),
            "expires": self.expires.isoformat(),
        }


def _lease(row: m.BranchLease) -> Lease:
    return Lease(
        branch=row.branch,
        token=row.token,
        run_id=row.run_id,
        holder=row.holder,
        host=row.host,
        pid=row.pid,
        acquired=utc(row.acquired),
        heartbeat=utc(row.heartbeat),
        expires=utc(row.expires),
    )


def leased_error(lease: Lease) -> BranchLeased:
    """The error a second run on ``lease.branch`` gets."""
    return BranchLeased(
        f"branch {lease.branch!r} already has a live run: {lease.describe()}; wait for it to "
        f"end, or stop it (a holder that died is taken over {LEASE_TTL_S:.0f} s after its "
        "last heartbeat)"
    )


def refuse_if_leased(s: Session, branch: str, doing: str) -> None:
    """BranchLeased when ``branch`` has a live run: ``doing`` (e.g. "delete it") would pull
    the branch from under it."""
    row = s.get(m.BranchLease, branch)
    if row is not None and utc(row.expires) > m.utcnow():
        raise BranchLeased(
            f"branch {branch!r} has a live run ({_lease(row).describe()}): cannot {doing} "
            "while it runs; wait for it to end, or stop it"
        )


class Leases(Database):
    """Taking, heartbeating and releasing branch leases (mixed into ``Registry``)."""

    def lease(self, branch: str) -> Lease | None:
        """The live lease of ``branch``, or None (no lease, or an expired one)."""
        with self._session() as s:
            row = s.get(m.BranchLease, branch)
            if row is None or utc(row.expires) <= m.utcnow():
                return None
            return _lease(row)

    def acquire_lease(
        self,
        branch: str,
        *,
        holder: str,
        run_id: int | None = None,
        ttl_s: float = LEASE_TTL_S,
    ) -> Lease:
        """Take the lease of ``branch`` for ``holder``, taking over an expired one.

        Raises BranchNotFound, or BranchLeased naming the live holder.
        """
        with self._session(write=True) as s:
            return self._take(s, branch, holder=holder, run_id=run_id, ttl_s=ttl_s)

    def start_leased_run(
        self,
        branch: str,
        config: Mapping[str, Any],
        *,
        ray_job_id: str | None = None,
        ttl_s: float = LEASE_TTL_S,
    ) -> tuple[Run, Lease]:
        """Record a "running" Run on ``branch`` and take the branch's lease for it, in one
        transaction: a refused run leaves no Run row. Raises BranchNotFound or BranchLeased."""
        stored = json.loads(json.dumps(dict(config), allow_nan=False))
        with self._session(write=True) as s:
            branch_row(s, branch)
            self._live_or_none(s, branch)  # refuse before writing anything
            row = m.Run(branch=branch, config=stored, ray_job_id=ray_job_id, created=m.utcnow())
            s.add(row)
            s.flush()
            assert row.id is not None
            lease = self._take(s, branch, holder=f"run {row.id}", run_id=row.id, ttl_s=ttl_s)
            return from_row(Run, row, config=dict(row.config)), lease

    def heartbeat_lease(self, lease: Lease, *, ttl_s: float = LEASE_TTL_S) -> Lease:
        """Extend ``lease`` by ``ttl_s`` from now. Raises LeaseLost when it is no longer held
        (it expired and another run took it over, or it was released)."""
        now = m.utcnow()
        with self._session(write=True) as s:
            row = s.get(m.BranchLease, lease.branch, with_for_update=True)
            if row is None or row.token != lease.token:
                taker = "" if row is None else f"; now held by {_lease(row).describe(now)}"
                raise LeaseLost(
                    f"{lease.holder} lost its lease on branch {lease.branch!r} (no heartbeat "
                    f"was written for {ttl_s:.0f} s){taker}"
                )
            row.heartbeat = now
            row.expires = now + timedelta(seconds=ttl_s)
            s.add(row)
            s.flush()
            return _lease(row)

    def release_lease(self, lease: Lease) -> bool:
        """Give ``lease`` back; False when it was no longer held by its holder."""
        with self._session(write=True) as s:
            row = s.get(m.BranchLease, lease.branch, with_for_update=True)
            if row is None or row.token != lease.token:
                return False
            s.delete(row)
            return True

    # -- inside a write transaction -------------------------------------------------------

    def _live_or_none(self, s: Session, branch: str) -> m.BranchLease | None:
        """The lease row of ``branch``, locked; raises BranchLeased when it is live."""
        stmt = select(m.BranchLease).where(m.BranchLease.branch == branch).with_for_update()
        row = s.exec(stmt).first()
        if row is not None and utc(row.expires) > m.utcnow():
            raise leased_error(_lease(row))
        return row

    def _take(
        self, s: Session, branch: str, *, holder: str, run_id: int | None, ttl_s: float
    ) -> Lease:
        branch_row(s, branch)
        now = m.utcnow()
        values = {
            "branch": branch,
            "token": uuid.uuid4().hex,
            "run_id": run_id,
            "holder": holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired": now,
            "heartbeat": now,
            "expires": now + timedelta(seconds=ttl_s),
        }
        row = self._live_or_none(s, branch)
        if row is None:
            stmt = self._insert(m.BranchLease).values(**values).on_conflict_do_nothing()
            if s.exec(stmt.returning(m.BranchLease.token)).first() is not None:
                return Lease(**values)
            # Another taker inserted first and has committed: its lease is live.
            self._live_or_none(s, branch)
            raise AssertionError("unreachable: a lease just inserted is live")
        # Take over an expired lease; its Run, if still "running", died with its holder.
        stale = _lease(row)
        if stale.run_id is not None:
            dead = s.get(m.Run, stale.run_id, with_for_update=True)
            if dead is not None and dead.status == "running":
                dead.status = "failed"
                dead.error = (
                    f"abandoned: no heartbeat from {stale.host} (pid {stale.pid}) since "
                    f"{stale.heartbeat:%Y-%m-%d %H:%M:%S} UTC; {holder} took the branch over"
                )
                dead.finished = now
                s.add(dead)
        for key, value in values.items():
            setattr(row, key, value)
        s.add(row)
        s.flush()
        return Lease(**values)


class LeaseKeeper:
    """Heartbeats a lease from a daemon thread every ``ttl_s / 3`` until :meth:`stop`.

    ``lost`` is set (and ``error`` holds the LeaseLost) when a heartbeat finds the lease taken
    over; a heartbeat that fails for another reason (the database briefly unreachable) is
    retried at the next tick, and the lease lapses only after ``ttl_s`` of failures.
    """

    def __init__(self, registry: Leases, lease: Lease, *, ttl_s: float = LEASE_TTL_S) -> None:
        self.registry = registry
        self.lease = lease
        self.ttl_s = ttl_s
        self.lost = threading.Event()
        self.error: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"tlreg-lease-{lease.branch}", daemon=True
        )

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lease = self.registry.heartbeat_lease(self.lease, ttl_s=self.ttl_s)
            except LeaseLost as e:
                self.error = e
                self.lost.set()
                return
            except Exception:  # retried at the next tick (see docstring)
                continue

    def stop(self, *, release: bool = True) -> None:
        """Stop heartbeating and (``release``) give the lease back."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if release and not self.lost.is_set():
            try:
                self.registry.release_lease(self.lease)
            except Exception:  # an unreleased lease expires by itself
                pass

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
