"""The lineage statements: plain SQL both backends run, with the few parts where they differ.

Every step of a walk is an index lookup: edge's primary key (child, parent) going up,
ix_edge_parent (parent, child) going down. Run and decoded by :mod:`tlreg.registry.lineage`.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import text

LCA = text(
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

# Records from plain rows (no ORM objects): a checkpoint's columns and its parents in order,
# one output row per parent (a root gets one row with a NULL parent), decoded by
# lineage._fetch_records. ``{with_}`` defines the CTE ``{source}`` of ids (aliased w) that
# ``{order}`` sorts by; the rows of one checkpoint stay together, first parent first.
RECORDS = """{with_}
SELECT c.id, c.branch, c.step, c.manifest, c.created, CAST(c.metrics AS TEXT),
       c.logical_bytes, c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id,
       c.pruned, p.parent, c.tier
FROM {source} w JOIN checkpoint c ON c.id = w.id
LEFT JOIN edge p ON p.child = c.id
ORDER BY {order}, p.position"""
# checkpoints() reads the whole table.
ALL_RECORDS = """
SELECT c.id, c.branch, c.step, c.manifest, c.created, CAST(c.metrics AS TEXT),
       c.logical_bytes, c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id,
       c.pruned, p.parent, c.tier
FROM checkpoint c
LEFT JOIN edge p ON p.child = c.id
ORDER BY {order}, p.position"""
# log: first parents from the head, numbered.
LOG = """
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
# reads the others, DEFERRED, on first access).
#
# The statement returns one row per entry, not one per checkpoint: ``run`` is the entry's
# first answer row (its position and distance; one step on from the start itself), then the
# lane's branch, the run's rows in walk order (an index range scan of ``(lane, lane_pos)``) as
# one JSON array of three columns [ids, steps, created], the parents of the lane's first
# checkpoint when the run holds it (the only checkpoint of a lane with edge rows of its own),
# and the lane's previous checkpoint where the run's nearest row (descendants) or its row at
# the depth bound (ancestors) has a parent that may not be a row. lineage._lane_rows merges
# the runs into the answer's order: returning a large answer's rows one by one cost more than
# the walk (see docs/performance.md, Registry); the runs are ~10 rows.
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
# as the time does while all are on one side of 2000 (see lineage._lane_rows); cheaper than
# EXTRACT(EPOCH ...) or to_char (see docs/performance.md, Registry).
_LANE_CREATED = {
    False: "c.created",
    True: "timestamptz_send(c.created)",
}
# Backend-specific parts. How ``entry`` rows reach lane rows: an index range scan per entry.
# SQLite plans that join so; PostgreSQL is made to, with a LATERAL subquery kept apart by
# OFFSET 0: left to itself it estimates the few entries as dozens, each matching a thousand
# rows, and hash-joins them against a full scan of the table (see docs/performance.md,
# Registry).
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
# times as UTC text, parsed when a record is built (as SQLite's are), which is cheaper than
# psycopg's timestamptz parsing (see docs/performance.md, Registry).
_DEFERRED_COLUMNS = """c.id, c.manifest, {created}, CAST(c.metrics AS TEXT), c.logical_bytes,
       c.new_bytes, c.kind, c.message, CAST(c.signature AS TEXT), c.run_id, {pruned},
       c.tier"""
DEFERRED = {
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
DEFERRED_CHUNK = 1000  # lane runs per statement: bounds a statement's size, not the answer's
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
def lane_walk_sql(*, up: bool, bounded: bool, pg: bool, resolve: bool) -> str:
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
