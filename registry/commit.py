"""The commit transaction: a checkpoint row, its object references, edges, lane and
architecture-signature prefixes, and the branch head moved by compare-and-swap.

Writers are serialised per branch: a commit locks the branch row (``SELECT ... FOR UPDATE`` on
PostgreSQL; ``BEGIN IMMEDIATE`` takes SQLite's single write lock) before it reads the head, then
moves the head with a compare-and-swap ``UPDATE`` whose row count is checked. This is what makes
concurrent commits from many Ray workers safe without file locks.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import EllipsisType
from typing import TypeVar

from sqlalchemy import bindparam, exists, or_, text
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, delete, select, update

from tlreg.registry import models as m
from tlreg.registry.engine import Database, chunks
from tlreg.registry.errors import (
    BeingCollected,
    BranchNotFound,
    CheckpointExists,
    HeadMoved,
    RefNotFound,
    RunNotFound,
)
from tlreg.registry.gc import gc_lock
from tlreg.registry.names import shown
from tlreg.registry.records import CheckpointRecord, encode_metrics
from tlreg.registry.refs import BRANCHES_HINT, branch_row, checkpoint_row, record, records

CHECKPOINT_KINDS = ("train", "import", "merge")
"""Values of ``CheckpointRecord.kind``."""
TIERS = ("local", "shared", "lost")
"""Values of ``CheckpointRecord.tier``; a commit is "local" or "shared"."""
RANK_METRIC = "val_accuracy"
"""The metric ``best_ancestor`` breaks ties with (higher is better)."""
T = TypeVar("T")


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


class Commits(Database):
    """Committing a checkpoint (see the module docstring for the locking)."""

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
        tier: str = "shared",
        nodes: Sequence[str] = (),
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

        ``tier`` is "shared" (the manifest and every object are in the shared store) or
        "local": the checkpoint is only on the node-local tiers of ``nodes`` (the node ids
        holding its shares, at least one) until :meth:`mark_shared`. A local checkpoint is
        visible and moves the head like any other.

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
        node_ids = _node_ids(manifest_id, tier, nodes)

        with self._session(write=True) as s:
            gc_lock(s, shared=True)
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
                raise BranchNotFound(f"branch {shown(branch)} does not exist: {BRANCHES_HINT}")
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
            # objects a repack moved (the manifest may name one that gc repacked while this
            # save ran): reference where their bytes went too, so those stay alive
            moved_to = self._moved_targets(s, sorted(sizes))
            self._refuse_doomed(s, manifest_id, sorted({*sizes, *moved_to}))

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
                tier=tier,
            )
            try:
                conn.execute(self._insert(m.Checkpoint).values(**checkpoint.model_dump()))
            except IntegrityError:
                raise CheckpointExists(
                    f"checkpoint {manifest_id!r} is already committed: "
                    "write a new manifest, or tag the existing one"
                ) from None
            refs = list(sizes) + sorted(set(moved_to) - set(sizes))
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
            if node_ids:
                conn.execute(
                    self._insert(m.CheckpointNode),
                    [{"checkpoint_id": manifest_id, "node_id": n} for n in node_ids],
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
            return record(checkpoint, tuple(parent_ids), node_ids)

    # -- tiers ---------------------------------------------------------------------------

    def mark_shared(self, checkpoint_id: str) -> CheckpointRecord:
        """Record that checkpoint ``checkpoint_id`` (its exact id) reached the shared store:
        a "local" (or "lost") checkpoint becomes "shared" and no longer depends on its nodes;
        a shared one is returned unchanged. Raises RefNotFound."""
        with self._session(write=True) as s:
            row = checkpoint_row(s, _exact_id(checkpoint_id))
            if row.tier != "shared":
                conn = s.connection()
                conn.execute(
                    update(m.Checkpoint).where(col(m.Checkpoint.id) == row.id).values(tier="shared")
                )
                conn.execute(
                    delete(m.CheckpointNode).where(col(m.CheckpointNode.checkpoint_id) == row.id)
                )
                s.expire(row)
            return records(s, [checkpoint_row(s, row.id)])[0]

    def mark_nodes_lost(self, node_ids: Iterable[str]) -> list[CheckpointRecord]:
        """Every "local" checkpoint with a share on one of ``node_ids`` (nodes that are gone)
        becomes "lost": it is never served again. Returns those checkpoints, oldest first
        (none when no local checkpoint had a share there). Shared and already lost
        checkpoints are left as they are."""
        nodes = sorted({str(n) for n in node_ids})
        if not nodes:
            return []
        with self._session(write=True) as s:
            conn = s.connection()
            hit: set[str] = set()
            for chunk in chunks(nodes):
                held = sa_select(m.CheckpointNode.checkpoint_id).where(
                    col(m.CheckpointNode.node_id).in_(chunk)
                )
                # (the tier is tested in the UPDATE itself: a concurrent mark_shared wins)
                hit.update(
                    cid
                    for (cid,) in conn.execute(
                        update(m.Checkpoint)
                        .where(col(m.Checkpoint.tier) == "local", col(m.Checkpoint.id).in_(held))
                        .values(tier="lost")
                        .returning(col(m.Checkpoint.id))
                    )
                )
            ids = sorted(hit)
            rows: list[m.Checkpoint] = []
            for chunk in chunks(ids):
                rows += s.exec(
                    select(m.Checkpoint)
                    .where(col(m.Checkpoint.id).in_(chunk))
                    .execution_options(populate_existing=True)
                ).all()
            rows.sort(key=lambda r: (r.created, r.id))
            return records(s, rows)

    def restorable_head(self, branch: str) -> CheckpointRecord | None:
        """The newest checkpoint that can be restored on ``branch``: the first one on the
        first-parent chain from the branch head that is neither "lost" nor pruned; None for
        an empty branch or when there is none. Raises BranchNotFound."""
        with self._session() as s:
            head = branch_row(s, branch).head
            if head is None:
                return None
            found = s.connection().execute(_RESTORABLE, {"head": head}).first()
            return None if found is None else records(s, [checkpoint_row(s, found[0])])[0]

    def local_checkpoints(self, branch: str, node: str | None = None) -> list[CheckpointRecord]:
        """The "local" checkpoints committed on ``branch`` (those with a share on ``node``
        when given), newest first: what a node-local tier must keep until they are shared.
        Raises BranchNotFound."""
        with self._session() as s:
            branch_row(s, branch)
            stmt = select(m.Checkpoint).where(
                m.Checkpoint.branch == branch, m.Checkpoint.tier == "local"
            )
            if node is not None:
                stmt = stmt.where(
                    col(m.Checkpoint.id).in_(
                        sa_select(m.CheckpointNode.checkpoint_id).where(
                            m.CheckpointNode.node_id == node
                        )
                    )
                )
            rows = s.exec(
                stmt.order_by(col(m.Checkpoint.created).desc(), col(m.Checkpoint.id).desc())
            ).all()
            return records(s, rows)

    def _refuse_doomed(self, s: Session, manifest_id: str, hashes: Sequence[str]) -> None:
        """Raise BeingCollected if apply_gc handed out the manifest or an object for deletion
        (the writer may have skipped uploading an object because the store still had it)."""
        cand = m.GcCandidate
        keys = [(cand.kind == "manifest") & (cand.key == manifest_id)]
        keys += [(cand.kind == "object") & col(cand.key).in_(c) for c in chunks(hashes)]
        doomed: list[str] = []
        # The manifest with the first chunk of objects: one query for a typical commit.
        for group in (keys[:2], *([k] for k in keys[2:])):
            doomed += s.exec(
                select(cand.key).where(or_(*group), col(cand.doomed).is_not(None))
            ).all()
        if doomed:
            keys_shown = ", ".join(sorted(doomed)[:5]) + (", ..." if len(doomed) > 5 else "")
            raise BeingCollected(
                f"checkpoint {manifest_id!r} references store keys that garbage collection is "
                f"deleting ({keys_shown}): save the checkpoint again once 'tlreg gc' has finished"
            )

    def _moved_targets(self, s: Session, hashes: Sequence[str]) -> list[str]:
        """Registered objects that repacks copied any of ``hashes`` into, transitively."""
        found: list[str] = []
        for chunk in chunks(hashes):
            found += [
                str(h)
                for (h,) in s.connection().execute(
                    text(_MOVED_TARGETS).bindparams(bindparam("old", expanding=True)),
                    {"old": list(chunk)},
                )
            ]
        return sorted(set(found))

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
        for chunk in chunks(hashes):
            stmt = (
                self._insert(m.Object)
                .values([{"hash": h, "nbytes": sizes[h], "created": now} for h in chunk])
                .on_conflict_do_nothing(index_elements=["hash"])
                .returning(col(m.Object.nbytes))
            )
            total += sum(int(n) for (n,) in s.connection().execute(stmt).all())
        return total


# The first checkpoint on the first-parent chain from :head that is neither lost nor pruned;
# the walk stops there (it only goes on past a checkpoint that cannot be restored).
_RESTORABLE = text(
    """
WITH RECURSIVE chain(id, n) AS (
    SELECT id, 0 FROM checkpoint WHERE id = :head
    UNION ALL SELECT e.parent, w.n + 1
    FROM chain w JOIN checkpoint c ON c.id = w.id JOIN edge e ON e.child = w.id
    WHERE e.position = 0 AND (c.tier = 'lost' OR c.pruned IS NOT NULL)
)
SELECT w.id FROM chain w JOIN checkpoint c ON c.id = w.id
WHERE c.tier <> 'lost' AND c.pruned IS NULL
ORDER BY w.n
LIMIT 1"""
)

# Where repacks moved some objects' bytes, following repacks of the targets too.
_MOVED_TARGETS = """
WITH RECURSIVE mv(h) AS (
    SELECT new FROM object_move WHERE old IN :old
    UNION SELECT om.new FROM object_move om JOIN mv ON om.old = mv.h
)
SELECT o.hash FROM mv JOIN object o ON o.hash = mv.h"""

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


def _exact_id(checkpoint_id: object) -> str:
    if not isinstance(checkpoint_id, str) or not checkpoint_id or "\x00" in checkpoint_id:
        raise RefNotFound(
            f"checkpoint {checkpoint_id!r} does not exist: pass the id of a committed checkpoint"
        )
    return checkpoint_id


def _node_ids(manifest_id: str, tier: str, nodes: Sequence[str]) -> list[str]:
    """The sorted, distinct node ids of a commit, checked against its tier."""
    if tier not in TIERS[:2]:
        raise ValueError(
            f"checkpoint {manifest_id!r}: a commit's tier is 'local' or 'shared', not {tier!r}"
        )
    if isinstance(nodes, str):
        raise ValueError(f"checkpoint {manifest_id!r}: nodes is a sequence of node ids")
    node_ids = sorted({str(n) for n in nodes})
    if any(not n or "\x00" in n for n in node_ids):
        raise ValueError(f"checkpoint {manifest_id!r}: node ids must be non-empty text")
    if tier == "local" and not node_ids:
        raise ValueError(
            f"local checkpoint {manifest_id!r} needs the ids of the nodes holding its shares"
        )
    if tier == "shared" and node_ids:
        raise ValueError(
            f"shared checkpoint {manifest_id!r} names nodes {node_ids}: nodes are recorded "
            "for local checkpoints only (commit it with tier='local')"
        )
    return node_ids


def _edge_kind(branch: str, parent_branch: str, n_parents: int) -> str:
    if n_parents > 1:
        return "merge"
    return "continue" if parent_branch == branch else "branch"


def _head_moved(branch: str, expected: str | None, actual: str | None) -> HeadMoved:
    return HeadMoved(
        f"branch {shown(branch)} moved: expected head {_quote(expected)}, found {_quote(actual)}: "
        "resolve the branch again and retry the commit",
        branch=branch,
        expected=expected,
        actual=actual,
    )


def _quote(value: str | None) -> str:
    return "(empty)" if value is None else repr(value)
