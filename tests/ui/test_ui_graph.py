"""The lanes layout (cli/ui/graph.py), property-tested on random lineages: every checkpoint is
drawn exactly once, edges go left to right, a lane never stacks two nodes in one column, and
collapsing hides only unremarkable checkpoints."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from tlreg.cli.ui.graph import COLLAPSE_MIN, build_graph, render_svg
from tlreg.registry import CheckpointRecord

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _record(i: int, branch: str, parents: tuple[str, ...]) -> CheckpointRecord:
    return CheckpointRecord(
        id=f"c{i:04d}", branch=branch, step=i, manifest=f"c{i:04d}", parents=parents,
        created=T0 + timedelta(seconds=i), metrics={"acc": i / 100}, logical_bytes=100,
        new_bytes=10 * (i % 3), kind="merge" if len(parents) > 1 else "train",
    )  # fmt: skip


@st.composite
def lineages(draw: st.DrawFn) -> list[CheckpointRecord]:
    """Commits in time order: each continues a branch's head, starts a branch from any
    earlier checkpoint, starts a root, or merges two earlier checkpoints."""
    n = draw(st.integers(1, 40))
    heads: dict[str, str] = {}
    records: list[CheckpointRecord] = []
    for i in range(n):
        move = draw(st.sampled_from(["continue"] * 6 + ["branch", "root", "merge"]))
        if move == "continue" and heads:
            branch = draw(st.sampled_from(sorted(heads)))
            parents: tuple[str, ...] = (heads[branch],)
        elif move == "branch" and records:
            branch = f"b{len(heads)}"
            parents = (draw(st.sampled_from(records)).id,)
        elif move == "merge" and len(records) >= 2 and heads:
            branch = draw(st.sampled_from(sorted(heads)))
            other = draw(st.sampled_from([r.id for r in records if r.id != heads[branch]]))
            parents = (heads[branch], other)
        else:
            branch, parents = f"b{len(heads)}", ()
        rec = _record(i, branch, parents)
        heads[branch] = rec.id
        records.append(rec)
    # A page of the newest ones: some parents fall outside it.
    cut = draw(st.integers(0, max(0, n - 1)))
    return records[cut:]


@settings(max_examples=150, deadline=None)
@given(lineages(), st.booleans())
def test_layout_draws_every_checkpoint_once_with_edges_left_to_right(
    records: list[CheckpointRecord], collapse: bool
) -> None:
    heads = {records[-1].id: ["main"]}
    graph = build_graph(records, heads=heads, tags={}, metric="acc", collapse=collapse)
    # Every checkpoint drawn once: a plain node, or one member of a collapsed run.
    assert sum(max(n.collapsed, 1) for n in graph.nodes) == len(records)
    assert all(n.collapsed == 0 or n.collapsed >= COLLAPSE_MIN for n in graph.nodes)
    if not collapse:
        assert sorted(n.id for n in graph.nodes) == sorted(r.id for r in records)
    by_id = {n.id: n for n in graph.nodes}
    for e in graph.edges:
        assert by_id[e.src].col < by_id[e.dst].col
    cells = [(n.lane, n.col) for n in graph.nodes]
    assert len(cells) == len(set(cells))
    assert graph.lanes == list(dict.fromkeys(r.branch for r in records))
    # Heads, merges, roots, branch points and checkpoints whose parent is off the page are
    # never hidden in a collapsed run (steps are unique here: a run is a step range).
    on_page = {r.id for r in records}
    children: dict[str, list[CheckpointRecord]] = {}
    for r in records:
        for p in r.parents:
            children.setdefault(p, []).append(r)
    for n in graph.nodes:
        if not n.collapsed:
            continue
        members = [r for r in records if r.branch == n.branch and n.first_step <= r.step <= n.step]
        assert len(members) == n.collapsed
        for r in members:
            assert r.id not in heads and len(r.parents) == 1 and r.parents[0] in on_page
            assert [c.branch for c in children.get(r.id, [])] == [r.branch]
    # Merges are drawn as merge edges; every drawn edge names a parent that is on the page.
    merges = {r.id for r in records if len(r.parents) > 1}
    assert {e.dst for e in graph.edges if e.kind == "merge"} <= merges
    svg = str(render_svg(graph))
    assert svg.count('<g class="node') == len(graph.nodes)


def test_pruned_checkpoints_and_merges_look_different_and_names_are_text() -> None:
    a = _record(0, "main", ())
    b = _record(1, "<b>x</b>", (a.id,))
    pruned = CheckpointRecord(**{**_fields(_record(2, "main", (a.id,))), "pruned": T0})
    merge = _record(3, "main", (pruned.id, b.id))
    graph = build_graph(
        [a, b, pruned, merge], heads={merge.id: ["main"]}, tags={a.id: ["<i>v1"]}, metric="acc"
    )
    svg = str(render_svg(graph, link=lambda cid: f"/checkpoint/{cid}"))
    assert f'<g class="node kind-train pruned" data-id="{pruned.id}"' in svg
    assert "step 2  (pruned)" in svg
    assert f'<g class="node kind-merge" data-id="{merge.id}"' in svg
    assert sorted(e.kind for e in graph.edges) == ["branch", "continue", "merge", "merge"]
    assert "&lt;b&gt;x&lt;/b&gt;" in svg and "<b>" not in svg and "<i>" not in svg
    assert f'href="/checkpoint/{merge.id}"' in svg


def _fields(r: CheckpointRecord) -> dict[str, object]:
    return {f: getattr(r, f) for f in r.__dataclass_fields__}
