"""Garbage collection's half in the database: planning (what to prune, which objects and
orphans to delete), applying a plan under the GC lock, and forgetting deleted keys.

The registry never touches the store; ``tlreg.training.gc`` runs the whole protocol.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import exists, func, insert, or_, text
from sqlmodel import Session, col, delete, select, update

from tlreg.registry import models as m
from tlreg.registry.engine import Database, chunks
from tlreg.registry.errors import NotCollectable
from tlreg.registry.records import GcPlan

# PostgreSQL: apply_gc holds this exclusively; commits, new branches and tags share it, so a
# checkpoint is never pruned, nor an object doomed, under a transaction that is about to use it.
# (SQLite write transactions are serialised by BEGIN IMMEDIATE already.)
_GC_LOCK_KEY = 0x746C726567C6


def gc_lock(s: Session, *, shared: bool) -> None:
    """Take the GC lock for the rest of the transaction: ``shared`` to use checkpoints and
    objects, exclusive to collect them (PostgreSQL; nothing on SQLite)."""
    if s.get_bind().dialect.name == "postgresql":
        fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        s.connection().execute(text(f"SELECT {fn}(:k)"), {"k": _GC_LOCK_KEY})


class GarbageCollection(Database):
    """Plan, apply and finish a collection (see :meth:`apply_gc` for the protocol)."""

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
        kind's listing and keeps its record. Planning writes only those records, and one
        more: when it finds nothing to prune and no object to delete, it remembers that
        against the state of the refs (every branch's head and base, every tag, the newest
        checkpoint's time, ``keep_last``); while that state is unchanged (and no apply_gc or
        relocate ran), the next plan reads only the refs instead of walking the lineage, so
        planning on an idle registry costs O(branches + tags), not O(checkpoints).
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
            state = self._gc_state(s, keep_last)
            unchanged = s.exec(
                select(m.GcCandidate.key).where(
                    m.GcCandidate.kind == _PLAN_KIND, m.GcCandidate.key == state
                )
            ).first()
            if unchanged is None:
                prune, objects = self._gc_compute(s, keep_last)
            else:
                prune, objects = [], {}
        with self._session(write=True) as s:
            if unchanged is None and not prune and not objects:
                s.exec(delete(m.GcCandidate).where(m.GcCandidate.kind == _PLAN_KIND))
                s.exec(
                    self._insert(m.GcCandidate)
                    .values(kind=_PLAN_KIND, key=state, first_seen=now, doomed=None)
                    .on_conflict_do_nothing(index_elements=["kind", "key"])
                )
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
            gc_lock(s, shared=False)
            _new_epoch(s)
            prune, _ = self._gc_compute(s, plan.keep_last)
            prune = sorted(set(prune) & set(plan.prune))
            now = m.utcnow()
            for chunk in chunks(prune):
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
            for group in chunks(doom):
                stmt = self._insert(m.GcCandidate).values(
                    [
                        {"kind": kind, "key": key, "first_seen": now, "doomed": now}
                        for kind, key in group
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
                for chunk in chunks(names):
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

    def kept_manifests(self) -> list[str]:
        """Manifest ids of every unpruned checkpoint in the shared store (what ``tlreg verify
        --all`` checks), oldest first: a local or lost checkpoint's manifest is not there."""
        with self._session() as s:
            return [
                str(c)
                for c in s.exec(
                    select(m.Checkpoint.manifest)
                    .where(col(m.Checkpoint.pruned).is_(None), m.Checkpoint.tier == "shared")
                    .order_by(col(m.Checkpoint.created), col(m.Checkpoint.id))
                ).all()
            ]

    def known_objects(self) -> set[str]:
        """Hashes of every object the registry records (kept or not)."""
        with self._session() as s:
            return {str(h) for h in s.exec(select(m.Object.hash)).all()}

    def repack_candidates(self) -> dict[str, tuple[int, list[str]]]:
        """Objects that may hold bytes no kept checkpoint uses: those referenced both by a
        pruned checkpoint and by an unpruned one (a pack is written whole for the checkpoint
        that references it, so bytes only fall out of use when a checkpoint is pruned).

        ``hash -> (nbytes, ids of the unpruned checkpoints that reference it)``; objects
        being deleted are left out. The query starts from the pruned checkpoints' references
        (which :meth:`forget_objects` drops with their objects), so its cost follows what gc
        could reclaim, not the size of the registry.
        """
        out: dict[str, tuple[int, list[str]]] = {}
        with self._session() as s:
            for digest, nbytes, checkpoint in s.connection().execute(text(_REPACK_CANDIDATES)):
                out.setdefault(str(digest), (int(nbytes), []))[1].append(str(checkpoint))
        return out

    def relocate(self, moves: Iterable[tuple[str, Iterable[str], Mapping[str, int]]]) -> list[str]:
        """Point kept checkpoints at the objects a repack copied their bytes to.

        Each move is ``(old object, the checkpoints whose manifests the repack read, new
        objects hash -> nbytes)``. In one transaction under the GC lock, every unpruned
        checkpoint that references the old object gets references to the new ones instead,
        and the old object is then unreferenced (the next :meth:`gc_plan` deletes it); the
        move is recorded, so that a later commit naming the old object (a save that
        deduplicated against it meanwhile) references the new ones as well. A move
        is skipped, changing nothing, when an unpruned checkpoint the repack did not read
        references the old object (a save committed meanwhile may use bytes the repack did
        not copy) or when a new object is being deleted. Returns the old objects moved.
        """
        moved: list[str] = []
        cand = m.GcCandidate
        with self._session(write=True) as s:
            gc_lock(s, shared=False)
            _new_epoch(s)
            conn = s.connection()
            for old, read, targets in moves:
                users = {
                    str(c)
                    for (c,) in conn.execute(
                        select(m.CheckpointObject.checkpoint)
                        .join(m.Checkpoint, col(m.Checkpoint.id) == m.CheckpointObject.checkpoint)
                        .where(m.CheckpointObject.object == old, col(m.Checkpoint.pruned).is_(None))
                    )
                }
                new = sorted(targets)
                doomed = s.exec(
                    select(cand.key).where(
                        cand.kind == "object", col(cand.key).in_(new), col(cand.doomed).is_not(None)
                    )
                ).first()
                if not users or not users <= set(read) or doomed is not None or old in targets:
                    continue
                now = m.utcnow()
                conn.execute(
                    self._insert(m.Object)
                    .values([{"hash": h, "nbytes": targets[h], "created": now} for h in new])
                    .on_conflict_do_nothing(index_elements=["hash"])
                )
                conn.execute(
                    self._insert(m.CheckpointObject)
                    .values([{"checkpoint": c, "object": h} for c in sorted(users) for h in new])
                    .on_conflict_do_nothing(index_elements=["checkpoint", "object"])
                )
                conn.execute(
                    self._insert(m.ObjectMove)
                    .values([{"old": old, "new": h} for h in new])
                    .on_conflict_do_nothing(index_elements=["old", "new"])
                )
                conn.execute(
                    delete(m.CheckpointObject).where(
                        col(m.CheckpointObject.object) == old,
                        col(m.CheckpointObject.checkpoint).in_(sorted(users)),
                    )
                )
                moved.append(old)
        return moved

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

    @staticmethod
    def _gc_state(s: Session, keep_last: int | None) -> str:
        """A digest of what decides the kept set and the referenced objects, read without
        walking the lineage: ``keep_last``, the gc epoch (:func:`_new_epoch`: pruning and
        repacks), every branch's name, head and base, every tag, and the newest checkpoint's
        time (an index lookup). A commit moves a head; branch and tag changes show here.
        Read before the walk, so a change racing the walk leaves a digest that no later state
        has."""
        digest = hashlib.blake2b(digest_size=20)
        cand = m.GcCandidate
        epoch = s.exec(select(cand.key).where(cand.kind == _EPOCH_KIND)).first()
        digest.update(f"keep_last={keep_last}\tepoch={epoch}\n".encode())
        for name, head, base in s.exec(
            select(m.Branch.name, m.Branch.head, m.Branch.base).order_by(col(m.Branch.name))
        ).all():
            digest.update(f"b\t{name}\t{head}\t{base}\n".encode())
        for name, checkpoint in s.exec(
            select(m.Tag.name, m.Tag.checkpoint).order_by(col(m.Tag.name))
        ).all():
            digest.update(f"t\t{name}\t{checkpoint}\n".encode())
        newest = s.exec(select(func.max(m.Checkpoint.created))).one()
        digest.update(f"c\t{newest}\n".encode())
        return digest.hexdigest()

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
        for chunk in chunks(names):
            known.update(s.exec(select(table).where(col(table).in_(chunk))).all())
        orphans = [k for k in names if k not in known]
        tracked = set(s.exec(select(cand.key).where(*undoomed)).all())
        gone = sorted(tracked - set(orphans))
        for chunk in chunks(gone):
            s.exec(delete(cand).where(*undoomed, col(cand.key).in_(chunk)))
        for chunk in chunks(orphans):
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


# gc_candidate rows of this kind remember a state of the refs in which gc_plan found nothing
# to prune and no object to delete; the one row of _EPOCH_KIND changes whenever apply_gc or
# relocate changes what is kept or referenced behind the refs' back. Neither is a store key:
# _due_orphans, forget_objects and commits look at kinds "object" and "manifest" only.
_PLAN_KIND = "empty-plan"
_EPOCH_KIND = "gc-epoch"


def _new_epoch(s: Session) -> None:
    """Start a new epoch (in the caller's transaction): every remembered empty plan is
    forgotten, and one a concurrent gc_plan records from what it read before is keyed by the
    old epoch, so it never matches again."""
    cand = m.GcCandidate
    s.exec(delete(cand).where(col(cand.kind).in_([_PLAN_KIND, _EPOCH_KIND])))
    s.exec(
        insert(cand).values(
            kind=_EPOCH_KIND, key=uuid.uuid4().hex, first_seen=m.utcnow(), doomed=None
        )
    )


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
# One step of either walk: the parents of a queued row. See _gc_compute for why
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
# Objects referenced by a pruned checkpoint and by an unpruned one, with the unpruned ones.
# From the pruned checkpoints (a partial index, schema v9) to their references: CROSS JOIN
# keeps SQLite from driving the join from every reference instead.
_REPACK_CANDIDATES = """
WITH cand AS (
    SELECT DISTINCT r.object FROM checkpoint c
    CROSS JOIN checkpoint_object r
    WHERE c.pruned IS NOT NULL AND r.checkpoint = c.id
)
SELECT o.hash, o.nbytes, r.checkpoint FROM cand
CROSS JOIN object o CROSS JOIN checkpoint_object r CROSS JOIN checkpoint c
WHERE o.hash = cand.object AND r.object = cand.object AND c.id = r.checkpoint
    AND c.pruned IS NULL AND NOT EXISTS (
    SELECT 1 FROM gc_candidate g WHERE g.kind = 'object' AND g.key = o.hash
        AND g.doomed IS NOT NULL
)
ORDER BY o.hash, r.checkpoint"""
