"""Walking the lineage DAG: the log of a branch, ancestors and descendants (over lanes),
children and edges, the common ancestor of two refs, and the best ancestor for an
architecture signature. The statements are in :mod:`tlreg.registry.lineage_sql`.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from tlreg.registry import models as m
from tlreg.registry.commit import prefix_hashes
from tlreg.registry.engine import Database
from tlreg.registry.lineage_sql import (
    ALL_RECORDS,
    DEFERRED,
    DEFERRED_CHUNK,
    LCA,
    LOG,
    RECORDS,
    lane_walk_sql,
)
from tlreg.registry.records import (
    CheckpointRecord,
    Edge,
    RecordList,
    decode_metrics,
    from_row,
    utc,
)
from tlreg.registry.refs import (
    branch_row,
    checkpoint_row,
    nodes_of,
    records,
    resolve_row,
    unstorable,
)


class Lineage(Database):
    """Reading the lineage DAG (each call one transaction; a RecordList reads its deferred
    fields in one more)."""

    def checkpoints(self) -> list[CheckpointRecord]:
        """Every checkpoint, oldest first."""
        with self._session() as s:
            return _fetch_records(s, ALL_RECORDS.format(order="c.created, c.id"), {})

    def log(self, branch: str, *, limit: int | None = None) -> list[CheckpointRecord]:
        """The branch's history, newest first: its head, then first parents back to a root,
        across branch points (like ``git log``). Empty for an empty branch."""
        if limit is not None and limit <= 0:
            return []
        with self._session() as s:
            head = branch_row(s, branch).head
            if head is None:
                return []
            bound = "" if limit is None else "AND w.n + 1 < :limit"
            chain = LOG.format(bound=bound)
            params = {"head": head, "limit": limit}
            sql = RECORDS.format(with_=chain, source="chain", order="w.n")
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
            if isinstance(ref, str) and ref and not unstorable(ref):
                # One round trip: the statement resolves a branch, a tag or an id itself.
                sql = lane_walk_sql(up=up, bounded=depth is not None, pg=pg, resolve=True)
                runs = conn.execute(text(sql), params).all()
            if not runs:
                # No start row: an id prefix, or not a ref at all (_resolve says which).
                params["ref"] = resolve_row(s, ref).id
                sql = lane_walk_sql(up=up, bounded=depth is not None, pg=pg, resolve=False)
                runs = conn.execute(text(sql), params).all()
        rows = _lane_rows(runs, up=up, depth=depth, pg=pg)
        return RecordList(rows, {} if not rows else None, self._deferred_columns)

    def _deferred_columns(self, rows: Sequence[Sequence[Any]]) -> dict[str, Sequence[Any]]:
        """The columns a RecordList defers (see records.Deferred: the id, then those) of its
        rows, by id, read in one transaction; rows that are not in the table are left out.

        Read by lane ranges like the walk (an index range scan per run of consecutive lane
        positions), not by id, which was slower (see docs/performance.md, Registry).
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
        sql = text(DEFERRED[pg])
        found: dict[str, Sequence[Any]] = {}
        with self._session() as s:
            conn = s.connection()
            for i in range(0, len(runs), DEFERRED_CHUNK):
                chunk = runs[i : i + DEFERRED_CHUNK]
                if pg:
                    lanes, lows, highs = (list(x) for x in zip(*chunk, strict=True))
                    params: dict[str, Any] = {"lanes": lanes, "lows": lows, "highs": highs}
                else:
                    params = {"runs": json.dumps(chunk)}
                found.update({row[0]: row for row in conn.execute(sql, params).all()})
            nodes = nodes_of(s, [cid for cid, row in found.items() if row[11] != "shared"])
        return {cid: (*row, nodes.get(cid, ())) for cid, row in found.items()}

    def children(self, checkpoint_id: str) -> list[CheckpointRecord]:
        """The direct children of a checkpoint (any ref is accepted), oldest first."""
        with self._session() as s:
            parent = resolve_row(s, checkpoint_id).id
            kids = "WITH kids(id) AS (SELECT child FROM edge WHERE parent = :parent)"
            sql = RECORDS.format(with_=kids, source="kids", order="c.created, c.id")
            return _fetch_records(s, sql, {"parent": parent})

    def edges(self, ref: str) -> list[Edge]:
        """The edges from the checkpoint ``ref`` resolves to, to its parents, in parent order."""
        with self._session() as s:
            child = resolve_row(s, ref).id
            rows = s.exec(
                select(m.Edge).where(m.Edge.child == child).order_by(col(m.Edge.position))
            ).all()
            return [from_row(Edge, r) for r in rows]

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
            return records(s, [row])[0], low

    def common_ancestor(self, a: str, b: str) -> CheckpointRecord | None:
        """The lowest common ancestor of refs ``a`` and ``b`` (each counts as its own ancestor,
        so it is ``a`` when ``a`` is an ancestor of ``b``); None when they share no history.

        "Lowest" means no child of it is also a common ancestor. In a DAG with criss-cross
        merges there can be several; the one nearest to both (least summed distance) wins,
        then the newest. One query: two recursive ancestor walks, joined.
        """
        with self._session() as s:
            ids = {"a": resolve_row(s, a).id, "b": resolve_row(s, b).id}
            found = s.connection().execute(LCA, ids).first()
            if found is None:
                return None
            return records(s, [checkpoint_row(s, found[0])])[0]


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


def _fetch_records(s: Session, sql: str, params: dict[str, Any]) -> list[CheckpointRecord]:
    """Run a lineage_sql.RECORDS query and build its records from the raw driver values.

    No ORM objects and no SQLAlchemy type processing, which cost ten times the decoding below
    (see docs/performance.md, Registry). JSON columns arrive as text on both backends (the
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
    nodes = nodes_of(s, [row[0] for row, _ in groups if row[14] != "shared"])
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
            created=utc(row[4]),
            metrics=decode_metrics(stored),
            logical_bytes=row[6],
            new_bytes=row[7],
            kind=row[8],
            message=row[9],
            signature=signatures[row[10]],
            run_id=row[11],
            pruned=None if row[12] is None else utc(row[12]),
            tier=row[14],
            nodes=nodes.get(row[0], ()),
        )
        for (row, parents), stored in zip(groups, metrics, strict=True)
    ]
