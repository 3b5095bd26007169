"""What each page of the lineage browser shows, read from the registry and the store and
rendered with Jinja2 (autoescaping on: names are text, never markup). No page writes.

The same functions render ``tlreg lineage --html`` (one self-contained file: styles inlined,
no scripts, no links to a server).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup

from tlreg.ckpt import Manifest, read_manifest
from tlreg.ckpt.diff import diff_manifests
from tlreg.ckpt.errors import CheckpointError
from tlreg.cli.ui.graph import Graph, build_graph, render_svg
from tlreg.cli.units import fmt_bytes
from tlreg.registry import CheckpointRecord, Registry
from tlreg.storage_backends import Store, StoreError

PAGE_SIZE = 200
"""Checkpoints per lineage page (newest first; older ones on the next page)."""
MAX_PAGE_SIZE = 2000


def _package_text(*parts: str) -> str:
    return resources.files("tlreg.cli.ui").joinpath(*parts).read_text(encoding="utf-8")


@functools.cache
def environment() -> jinja2.Environment:
    """Templates from the installed package (they ship in the wheel), autoescaped."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: _package_text("templates", name)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["size"] = fmt_bytes
    env.filters["short"] = lambda cid: (cid or "-")[:12]
    env.filters["num"] = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)
    env.filters["when"] = lambda d: "-" if d is None else d.strftime("%Y-%m-%d %H:%M:%S")
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def stylesheet() -> str:
    return _package_text("static", "ui.css")


class ManifestCache:
    """Manifests by id, kept (they are immutable) up to ``size`` entries."""

    def __init__(self, store: Store, size: int = 4096) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cache: dict[str, Manifest | None] = {}
        self._size = size

    def get(self, record: CheckpointRecord) -> Manifest | None:
        """The record's manifest; None when pruned or unreadable."""
        if record.pruned is not None:
            return None
        with self._lock:
            if record.manifest in self._cache:
                return self._cache[record.manifest]
        try:
            found: Manifest | None = read_manifest(self.store, record.manifest)
        except (CheckpointError, StoreError, OSError):
            found = None
        with self._lock:
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[record.manifest] = found
        return found


def parent_changes(
    registry: Registry, manifests: ManifestCache, records: Sequence[CheckpointRecord]
) -> dict[str, str | None]:
    """For each checkpoint, what changed against its first parent, from the two manifests:
    "Δ N tensors · S shared with parent" (S: bytes stored once for both); "root · N tensors"
    for a root; None where a manifest cannot be read (pruned, or gone from the store)."""
    from tlreg.cli.visual import shared_bytes

    have = {r.id: r for r in records}
    for pid in {p for r in records for p in r.parents[:1]} - have.keys():
        try:
            have[pid] = registry.get(pid)
        except LookupError:
            pass
    out: dict[str, str | None] = {}
    for r in records:
        mine = manifests.get(r)
        if mine is None:
            out[r.id] = None
            continue
        if not r.parents:
            out[r.id] = f"root · {len(mine.tensors)} tensors"
            continue
        parent = have.get(r.parents[0])
        theirs = None if parent is None else manifests.get(parent)
        if theirs is None:
            out[r.id] = None
            continue
        changed = len(diff_manifests(theirs, mine).changes)
        out[r.id] = f"Δ {changed} tensors · {fmt_bytes(shared_bytes(mine, theirs))} shared"
    return out


def names_by_checkpoint(registry: Registry) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(heads, tags): checkpoint id -> branch names whose head it is / tag names."""
    heads: dict[str, list[str]] = {}
    for b in registry.branches():
        if b.head:
            heads.setdefault(b.head, []).append(b.name)
    tags: dict[str, list[str]] = {}
    for t in registry.tags():
        tags.setdefault(t.checkpoint, []).append(t.name)
    return heads, tags


PREFERRED_METRICS = ("val_accuracy", "accuracy", "val_loss", "loss")


def preferred_metric(names: Sequence[str]) -> str | None:
    """The metric a page shows when none is asked for."""
    for preferred in PREFERRED_METRICS:
        if preferred in names:
            return preferred
    return sorted(names)[0] if names else None


def default_metric(registry: Registry) -> str | None:
    return preferred_metric(registry.metric_names())


def lineage_graph(
    registry: Registry,
    records: Sequence[CheckpointRecord],
    metric: str | None,
    *,
    changed: Mapping[str, str | None] | None = None,
    collapse: bool = True,
) -> Graph:
    heads, tags = names_by_checkpoint(registry)
    return build_graph(
        records, heads=heads, tags=tags, metric=metric, changed=changed, collapse=collapse
    )


def lineage_page(
    registry: Registry,
    *,
    limit: int = PAGE_SIZE,
    before: tuple[datetime, str] | None = None,
    branches: Sequence[str] | None = None,
    metric: str | None = None,
    collapse: bool = True,
) -> str:
    """The lineage page: the newest ``limit`` checkpoints before the cursor, as lanes."""
    records = registry.recent_checkpoints(limit=limit + 1, before=before, branches=branches)
    more = len(records) > limit
    records = records[:limit]
    # The metrics the page's checkpoints carry (not every metric ever logged: that would
    # scan every evaluation of every run on each page view).
    choices = sorted({k for r in records for k in r.metrics})
    metric = metric or preferred_metric(choices)
    graph = lineage_graph(registry, records, metric, collapse=collapse)
    svg = render_svg(graph, link=lambda cid: f"/checkpoint/{cid}")
    older = None
    if more:
        last = records[-1]
        query: list[tuple[str, str]] = [("before", f"{last.created.isoformat()}|{last.id}")]
        query += [("branch", b) for b in branches or ()]
        if metric:
            query.append(("metric", metric))
        if limit != PAGE_SIZE:
            query.append(("limit", str(limit)))
        older = "/lineage?" + urlencode(query)
    return render(
        "lineage.html",
        title="Lineage",
        svg=svg,
        graph=graph,
        shown=len(records),
        total=registry.checkpoint_count(),
        older=older,
        newest="/lineage" if before is not None else None,
        metric=metric,
        metrics=choices if metric is None or metric in choices else [metric, *choices],
        branches=[b.name for b in registry.branches()],
        selected=list(branches or ()),
        static=False,
    )


def lineage_document(
    registry: Registry, store: Store, ref: str, *, metric: str | None = None
) -> str:
    """``tlreg lineage REF --html``: the ancestors and descendants of REF as one
    self-contained HTML file (styles inlined; no script, no network)."""
    focus = registry.resolve(ref)
    records = {r.id: r for r in [*registry.ancestors(ref), focus, *registry.descendants(ref)]}
    metric = metric or default_metric(registry)
    changed = _file_changes(registry, store, list(records.values()))
    graph = lineage_graph(registry, list(records.values()), metric, changed=changed)
    return render(
        "lineage_file.html",
        title=f"Lineage of {ref}",
        svg=render_svg(graph),
        graph=graph,
        focus=focus,
        ref=ref,
        metric=metric,
        css=Markup(stylesheet()),
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )


FILE_CHANGES_LIMIT = 5000
"""Above this many checkpoints a lineage file leaves out what changed against each parent
(two manifest reads per node); the registry's new and reused bytes are always shown."""


def _file_changes(
    registry: Registry, store: Store, records: Sequence[CheckpointRecord]
) -> dict[str, str | None] | None:
    if len(records) > FILE_CHANGES_LIMIT:
        return None
    return parent_changes(registry, ManifestCache(store), records)


def lineage_svg(registry: Registry, store: Store, ref: str, *, metric: str | None = None) -> str:
    """``tlreg lineage REF --svg``: the same graph as a standalone SVG file (styles inlined)."""
    focus = registry.resolve(ref)
    records = {r.id: r for r in [*registry.ancestors(ref), focus, *registry.descendants(ref)]}
    metric = metric or default_metric(registry)
    changed = _file_changes(registry, store, list(records.values()))
    graph = lineage_graph(registry, list(records.values()), metric, changed=changed)
    svg = str(render_svg(graph))
    style = f"<style>{stylesheet()}</style>"
    head, rest = svg.split(">", 1)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + head + ">" + style + rest + "\n"


def tensor_groups(
    manifest: Manifest, parent: Manifest | None
) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(group, bytes, rows) per top-level group (model, optimizer, ...): each stored block's
    path, dtype, shape, bytes, object, and whether it lives where the parent's does."""
    theirs = {} if parent is None else {(e.object, e.offset): e.nbytes for _, e in parent.stored()}
    groups: dict[str, list[dict[str, Any]]] = {}
    for path, e in sorted(manifest.stored()):
        groups.setdefault(path.split("/", 1)[0], []).append(
            {
                "path": path,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "nbytes": e.nbytes,
                "object": e.object,
                "shared": theirs.get((e.object, e.offset)) == e.nbytes,
            }
        )
    return [(g, sum(r["nbytes"] for r in rows), rows) for g, rows in sorted(groups.items())]


def checkpoint_page(
    registry: Registry, manifests: ManifestCache, ref: str, against: str | None
) -> str:
    """A checkpoint: metrics, lineage, tensors by group with bytes and object, and its diff
    against its first parent or ``against`` (any ref)."""
    r = registry.resolve(ref)
    heads, tags = names_by_checkpoint(registry)
    children = registry.children(r.id)
    manifest = manifests.get(r)
    other = registry.resolve(against) if against else (
        registry.get(r.parents[0]) if r.parents else None
    )  # fmt: skip
    other_manifest = None if other is None else manifests.get(other)
    diff = None
    if manifest is not None and other_manifest is not None:
        diff = diff_manifests(other_manifest, manifest)
    groups = [] if manifest is None else tensor_groups(manifest, other_manifest)
    shared = sum(row["nbytes"] for _, _, rows in groups for row in rows if row["shared"])
    return render(
        "checkpoint.html",
        title=f"{r.branch}@{r.step}",
        r=r,
        heads=heads.get(r.id, []),
        tags=tags.get(r.id, []),
        children=children,
        manifest=manifest,
        groups=groups,
        other=other,
        against=against or "",
        diff=diff,
        shared=shared,
        objects=manifest.objects if manifest is not None else {},
    )


def runs_page(registry: Registry) -> str:
    return render("runs.html", title="Runs", runs=registry.run_summaries())


def compare_page(
    registry: Registry,
    store: Store,
    refs: Sequence[str],
    metric: str | None,
    target: float | None,
) -> str:
    """Curves (an <img> of the chart: an SVG loaded as an image runs no script) and the
    comparison table of ``tlreg compare``."""
    from tlreg.cli.visual import branch_curves, compare_rows

    metric = metric or default_metric(registry)
    rows: list[dict[str, Any]] = []
    chart = None
    if refs and metric:
        curves = branch_curves(registry, refs, metric)
        rows = compare_rows(registry, store, curves, target=target)
        query = [("ref", r) for r in refs] + [("metric", metric)]
        if target is not None:
            query.append(("target", repr(target)))
        chart = "/compare.svg?" + urlencode(query)
    return render(
        "compare.html",
        title="Compare",
        refs=list(refs),
        metric=metric,
        target=target,
        rows=rows,
        chart=chart,
        branches=[b.name for b in registry.branches()],
        metrics=registry.metric_names(),
    )


def compare_chart(
    registry: Registry, refs: Sequence[str], metric: str, target: float | None
) -> str:
    from tlreg.cli.visual import branch_curves, curves_svg

    return curves_svg(branch_curves(registry, refs, metric), metric, target=target)


def query_link(path: str, **params: Any) -> str:
    return path + "?" + urlencode({k: v for k, v in params.items() if v is not None})
