"""The lineage graph as lanes: one lane per branch, checkpoints as nodes, continue / branch /
merge edges, heads and tags as badges; long runs of unremarkable checkpoints collapse into one
node. Rendered as plain SVG (every name escaped), for ``tlreg ui`` and ``tlreg lineage --html``.

Layout is a single pass in commit order: a checkpoint's column is one past its lane's
previous node and one past each of its parents, so parallel branches share columns and a
page of N checkpoints is at most N columns wide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from tlreg.cli.units import fmt_bytes
from tlreg.registry import CheckpointRecord

COLLAPSE_MIN = 4
"""Runs of at least this many unremarkable checkpoints on one lane are drawn as one node."""

NODE_W, NODE_H, COL_W, LANE_H, LEFT, TOP = 192, 74, 220, 118, 150, 34


@dataclass(slots=True)
class Node:
    """A drawn node: one checkpoint, or (``collapsed`` > 0) a run of checkpoints of one lane."""

    id: str
    """The checkpoint id (of the run's last checkpoint when collapsed)."""
    branch: str
    step: int
    lane: int
    col: int = 0
    metric: float | None = None
    new_bytes: int = 0
    reused_bytes: int = 0
    """Bytes of the checkpoint not written by it (shared with earlier checkpoints)."""
    kind: str = "train"
    pruned: bool = False
    heads: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    collapsed: int = 0
    first_step: int = 0
    changed: str | None = None
    """What differs from the first parent (tensors, bytes shared), when known."""
    outside_parents: list[str] = field(default_factory=list)
    """Parents not on this page."""


@dataclass(frozen=True, slots=True)
class GraphEdge:
    src: str
    dst: str
    kind: str
    """"continue", "branch" or "merge"."""


@dataclass(slots=True)
class Graph:
    nodes: list[Node]
    edges: list[GraphEdge]
    lanes: list[str]
    metric: str | None

    @property
    def width(self) -> int:
        cols = max((n.col for n in self.nodes), default=0) + 1
        return LEFT + cols * COL_W + 20

    @property
    def height(self) -> int:
        return TOP + max(len(self.lanes), 1) * LANE_H


def build_graph(
    records: Iterable[CheckpointRecord],
    *,
    heads: Mapping[str, Sequence[str]],
    tags: Mapping[str, Sequence[str]],
    metric: str | None,
    changed: Mapping[str, str | None] | None = None,
    collapse: bool = True,
) -> Graph:
    """Lay out ``records`` (any order) as lanes. ``heads``/``tags`` map checkpoint ids to the
    names pointing at them; ``changed`` says what differs from the first parent (see
    ``pages.parent_changes``)."""
    recs = sorted(records, key=lambda r: (r.created, r.id))
    ids = {r.id for r in recs}
    kids: dict[str, list[CheckpointRecord]] = {}
    for r in recs:
        for p in r.parents:
            kids.setdefault(p, []).append(r)
    lanes: list[str] = []
    lane_of: dict[str, int] = {}
    for r in recs:
        if r.branch not in lane_of:
            lane_of[r.branch] = len(lanes)
            lanes.append(r.branch)

    def remarkable(r: CheckpointRecord) -> bool:
        children = kids.get(r.id, [])
        return bool(
            heads.get(r.id)
            or tags.get(r.id)
            or len(r.parents) != 1
            or r.parents[0] not in ids
            or any(c.branch != r.branch for c in children)
            or len(children) != 1
            or by_id[r.parents[0]].branch != r.branch
        )

    by_id = {r.id: r for r in recs}
    # Group each lane's consecutive unremarkable checkpoints.
    group_of: dict[str, str] = {}  # checkpoint id -> id of the node that draws it
    runs: dict[str, list[CheckpointRecord]] = {}
    if collapse:
        current: dict[str, list[CheckpointRecord]] = {}
        for r in recs:
            run = current.setdefault(r.branch, [])
            if remarkable(r):
                _close(run, runs, group_of)
                current[r.branch] = []
            else:
                run.append(r)
        for run in current.values():
            _close(run, runs, group_of)

    nodes: dict[str, Node] = {}
    col_of_lane: dict[int, int] = {}
    for r in recs:
        key = group_of.get(r.id, r.id)
        lane = lane_of[r.branch]
        parent_cols = [nodes[group_of.get(p, p)].col for p in r.parents if p in ids]
        if key in nodes:  # a later member of a collapsed run: extend it
            node = nodes[key]
            node.collapsed += 1
            node.id, node.step = r.id, r.step
            node.new_bytes += r.new_bytes
            node.reused_bytes += max(0, r.logical_bytes - r.new_bytes)
            node.pruned = node.pruned and r.pruned is not None
            node.metric = _metric(r, metric) if metric else None
            continue
        col = max([col_of_lane.get(lane, -1) + 1, *(c + 1 for c in parent_cols)])
        col_of_lane[lane] = col
        node = Node(
            id=r.id, branch=r.branch, step=r.step, lane=lane, col=col,
            metric=_metric(r, metric) if metric else None, new_bytes=r.new_bytes,
            reused_bytes=max(0, r.logical_bytes - r.new_bytes), kind=r.kind,
            pruned=r.pruned is not None, heads=list(heads.get(r.id, ())),
            tags=list(tags.get(r.id, ())), collapsed=1 if key in runs else 0,
            first_step=r.step,
            changed=None if changed is None else changed.get(r.id),
            outside_parents=[p for p in r.parents if p not in ids],
        )  # fmt: skip
        nodes[key] = node
    edges: list[GraphEdge] = []
    seen: set[tuple[str, str]] = set()
    for r in recs:
        dst = group_of.get(r.id, r.id)
        for p in r.parents:
            if p not in ids:
                continue
            src = group_of.get(p, p)
            if src == dst or (src, dst) in seen:
                continue
            seen.add((src, dst))
            if len(r.parents) > 1:
                kind = "merge"
            elif by_id[p].branch == r.branch:
                kind = "continue"
            else:
                kind = "branch"
            edges.append(GraphEdge(src, dst, kind))
    # Edges name drawn nodes by key; a collapsed node's key is its first member's id.
    drawn = list(nodes.items())
    key_to_id = {key: n.id for key, n in drawn}
    edges = [GraphEdge(key_to_id[e.src], key_to_id[e.dst], e.kind) for e in edges]
    return Graph([n for _, n in drawn], edges, lanes, metric)


def _close(
    run: list[CheckpointRecord], runs: dict[str, list[CheckpointRecord]], group_of: dict[str, str]
) -> None:
    if len(run) >= COLLAPSE_MIN:
        key = run[0].id
        runs[key] = list(run)
        for r in run:
            group_of[r.id] = key


def _metric(r: CheckpointRecord, metric: str | None) -> float | None:
    return None if metric is None else r.metrics.get(metric)


def _fmt_value(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _cut(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def render_svg(graph: Graph, *, link: Callable[[str], str] | None = None) -> Markup:
    """The graph as an ``<svg>`` element. ``link(id)`` gives each node's href (none when None).
    Every name and value is escaped: a branch called ``<script>`` is drawn as those letters."""
    e = escape
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{graph.width}" '
        f'height="{graph.height}" viewBox="0 0 {graph.width} {graph.height}" role="img" '
        f'aria-label="lineage graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'class="arrowhead"/></marker></defs>',
    ]
    for i, name in enumerate(graph.lanes):
        y = TOP + i * LANE_H
        out.append(
            f'<g class="lane" data-branch="{e(name)}"><rect class="lane-bg" x="0" y="{y}" '
            f'width="{graph.width}" height="{LANE_H}"/><text class="lane-name" x="8" '
            f'y="{y + LANE_H // 2 + 4}"><title>{e(name)}</title>{e(_cut(name, 20))}</text></g>'
        )
    pos = {n.id: _xy(n) for n in graph.nodes}
    for edge in graph.edges:
        (x1, y1), (x2, y2) = pos[edge.src], pos[edge.dst]
        sx, sy = x1 + NODE_W, y1 + NODE_H // 2
        tx, ty = x2, y2 + NODE_H // 2
        mid = (sx + tx) / 2
        out.append(
            f'<path class="edge edge-{edge.kind}" data-kind="{edge.kind}" '
            f'd="M {sx} {sy} C {mid} {sy}, {mid} {ty}, {tx} {ty}" marker-end="url(#arrow)"/>'
        )
    for n in graph.nodes:
        x, y = pos[n.id]
        classes = ["node", f"kind-{e(n.kind)}"]
        if n.pruned:
            classes.append("pruned")
        if n.collapsed:
            classes.append("collapsed")
        lines = []
        if n.collapsed:
            lines.append(f"⋯ {n.collapsed} checkpoints")
            lines.append(f"steps {n.first_step}-{n.step}")
        else:
            lines.append(f"step {n.step}" + ("  (pruned)" if n.pruned else ""))
            if graph.metric is not None:
                value = "-" if n.metric is None else _fmt_value(n.metric)
                lines.append(f"{_cut(graph.metric, 14)} {value}")
        lines.append(f"new {fmt_bytes(n.new_bytes)} · reused {fmt_bytes(n.reused_bytes)}")
        body = [
            f'<rect class="box" x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6"/>',
        ]
        for k, line in enumerate(lines):
            body.append(f'<text x="{x + 8}" y="{y + 17 + 16 * k}">{e(line)}</text>')
        if not n.collapsed:
            text = n.changed or ""
            body.append(
                f'<text class="changed" data-id="{e(n.id)}" x="{x + 8}" '
                f'y="{y + 17 + 16 * len(lines)}">{e(text)}</text>'
            )
        badges = [f"head: {h}" for h in n.heads] + [f"tag: {t}" for t in n.tags]
        for k, badge in enumerate(badges[:3]):
            cls = "badge-head" if badge.startswith("head") else "badge-tag"
            body.append(
                f'<text class="badge {cls}" x="{x + 4}" y="{y - 4 - 12 * k}">'
                f"<title>{e(badge)}</title>{e(_cut(badge, 26))}</text>"
            )
        if n.outside_parents:
            body.append(
                f'<text class="outside" x="{x - 28}" y="{y + NODE_H // 2 + 4}">'
                f"<title>parent on an older page: {e(', '.join(n.outside_parents))}</title>↤</text>"
            )
        tip = f"{n.branch}@{n.step} {n.id}"
        inner = "".join(body) + f"<title>{e(tip)}</title>"
        group = (
            f'<g class="{" ".join(classes)}" data-id="{e(n.id)}" data-branch="{e(n.branch)}" '
            f'data-step="{n.step}" data-new-bytes="{n.new_bytes}" '
            f'data-shared-bytes="{n.reused_bytes}">{inner}</g>'
        )
        if link is not None:
            group = f'<a href="{e(link(n.id))}" class="node-link">{group}</a>'
        out.append(group)
    out.append("</svg>")
    return Markup("".join(out))


def _xy(n: Node) -> tuple[int, int]:
    return LEFT + n.col * COL_W, TOP + n.lane * LANE_H + (LANE_H - NODE_H) // 2 + 6
