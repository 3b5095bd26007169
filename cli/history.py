"""``tlreg log``, ``lineage``, ``show``, ``diff`` and ``runs``: browsing what happened."""

from __future__ import annotations

from collections import defaultdict

import click

from tlreg.ckpt import read_manifest
from tlreg.ckpt.diff import diff_manifests
from tlreg.cli.common import (
    Env,
    checkpoint_line,
    complete_branches,
    complete_refs,
    decorations,
    echo_json,
    fmt_bytes,
    fmt_metrics,
    json_option,
    pass_env,
    pruned_mark,
    resolve_live,
    short,
    table,
)
from tlreg.registry import CheckpointRecord


@click.command()
@click.argument("branch", shell_complete=complete_branches)
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Show at most N checkpoints.")
@json_option
@pass_env
def log(env: Env, branch: str, limit: int | None, as_json: bool) -> None:
    """Checkpoints reachable from BRANCH's head, newest first, with the branch heads and tags
    that point at them (as git log --decorate) and those gc pruned. A checkpoint not in the
    shared store (yet) says so: [local: NODES] (only on those nodes' local tiers), or
    [lost: NODES] (a node holding a share is gone: never restored).

    \b
    Example:
      tlreg log upper-head -n 5
    """
    records = env.registry.log(branch, limit=limit)
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    names = decorations(env)
    for r in records:
        when = r.created.strftime("%Y-%m-%d %H:%M:%S")
        line = f"{short(r.id)}  {r.branch}@{r.step}  {when}  {r.kind}"
        if r.tier != "shared":
            line += f"  {tier_mark(r)}"
        marks = names.get(r.id, []) + ([pruned_mark(r)] if r.pruned is not None else [])
        if marks:
            line += f"  ({', '.join(marks)})"
        click.echo(f"{line}  {fmt_metrics(r.metrics)}".rstrip())


def tier_mark(r: CheckpointRecord) -> str:
    """``[local: NODES]`` or ``[lost: NODES]`` for a checkpoint not in the shared store (long
    node ids, as Ray's, shortened like checkpoint ids)."""
    nodes = ",".join(short(n) if len(n) > 12 else n for n in r.nodes)
    return f"[{r.tier}: {nodes}]" if nodes else f"[{r.tier}]"


def render_tree(nodes: dict[str, CheckpointRecord], focus: str) -> list[str]:
    """Draw the lineage DAG restricted to ``nodes`` as text.

    A chain on one branch is drawn straight down; a child on another branch opens an
    indented subtree under the checkpoint it branched from. A node with several parents
    (a merge) is drawn once, under its first parent, and referenced elsewhere.
    """
    children: dict[str, list[CheckpointRecord]] = defaultdict(list)
    for r in nodes.values():
        for p in r.parents[:1]:
            if p in nodes:
                children[p].append(r)
    for kids in children.values():
        kids.sort(key=lambda r: (r.created, r.id))
    roots = sorted(
        (r for r in nodes.values() if not any(p in nodes for p in r.parents)),
        key=lambda r: (r.created, r.id),
    )
    lines: list[str] = []

    def label(r: CheckpointRecord) -> str:
        extra = [f"merge of {', '.join(short(p) for p in r.parents)}"] if len(r.parents) > 1 else []
        mark = "  <-" if r.id == focus else ""
        return "  ".join([checkpoint_line(r), *extra]) + mark

    def chain(r: CheckpointRecord | None, prefix: str, first_prefix: str) -> None:
        lead = first_prefix
        while r is not None:
            lines.append(lead + label(r))
            lead = prefix
            kids = children.get(r.id, [])
            same = [k for k in kids if k.branch == r.branch]
            cont = same[0] if same else None
            side = [k for k in kids if k is not cont]
            for i, k in enumerate(side):
                last = i == len(side) - 1 and cont is None
                chain(k, prefix + ("   " if last else "│  "), prefix + ("└─ " if last else "├─ "))
            r = cont

    for root in roots:
        chain(root, "", "")
    return lines


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@click.option("--depth", type=click.IntRange(min=0), help="Limit to N generations each way.")
@click.option(
    "--html",
    "html_out",
    type=click.Path(dir_okay=False),
    help="Write the graph as one self-contained HTML file.",
)
@click.option(
    "--svg", "svg_out", type=click.Path(dir_okay=False), help="Write the graph as an SVG file."
)
@click.option("--metric", "-m", help="Metric shown on each node of --html/--svg.")
@json_option
@pass_env
def lineage(
    env: Env,
    ref: str,
    depth: int | None,
    html_out: str | None,
    svg_out: str | None,
    metric: str | None,
    as_json: bool,
) -> None:
    """Ancestors and descendants of REF as a tree; --html/--svg write the lanes graph of
    'tlreg ui' as a file for a report.

    \b
    Example:
      tlreg lineage base --html lineage.html
    """
    if html_out or svg_out:
        from tlreg.cli.visual import write_lineage

        write_lineage(env, ref, html_out=html_out, svg_out=svg_out, metric=metric)
        return
    focus = env.registry.resolve(ref)
    ancestors = env.registry.ancestors(ref, depth=depth)
    descendants = env.registry.descendants(ref, depth=depth)
    nodes = {r.id: r for r in [*ancestors, focus, *descendants]}
    if as_json:
        echo_json(
            {
                "ref": ref,
                "checkpoint": focus.id,
                "ancestors": [r.to_json() for r in ancestors],
                "descendants": [r.to_json() for r in descendants],
                "edges": sorted([p, r.id] for r in nodes.values() for p in r.parents if p in nodes),
            }
        )
        return
    for line in render_tree(nodes, focus.id):
        click.echo(line)


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@click.option("--tensors", is_flag=True, help="List every tensor.")
@json_option
@pass_env
def show(env: Env, ref: str, tensors: bool, as_json: bool) -> None:
    """Details of checkpoint REF (a branch, tag, id or id prefix).

    \b
    Example:
      tlreg show base --tensors
    """
    r = env.registry.resolve(ref)
    if r.pruned is not None or r.tier != "shared":
        _show_row(r, as_json)
        return
    manifest = read_manifest(env.store, r.manifest)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, entry in manifest.tensors.items():
        g = groups[path.split("/", 1)[0]]
        g[0] += 1
        g[1] += entry.nbytes
    if as_json:
        doc = r.to_json()
        doc["tensors"] = {
            path: {"dtype": e.dtype, "shape": list(e.shape), "nbytes": e.nbytes, "object": e.object}
            for path, e in manifest.tensors.items()
        }
        doc["objects"] = manifest.objects
        echo_json(doc)
        return
    click.echo(f"checkpoint  {r.id}")
    click.echo(f"branch      {r.branch}")
    click.echo(f"step        {r.step}")
    click.echo(f"kind        {r.kind}")
    click.echo(f"created     {r.created.isoformat()}")
    click.echo(f"parents     {', '.join(short(p) for p in r.parents) or '-'}")
    if r.message:
        click.echo(f"message     {r.message}")
    if r.metrics:
        click.echo(f"metrics     {fmt_metrics(r.metrics)}")
    click.echo(f"bytes       {fmt_bytes(r.logical_bytes)} logical, {fmt_bytes(r.new_bytes)} new")
    click.echo(f"tier        {r.tier}")
    click.echo(f"nodes       {', '.join(r.nodes) or '-'}")
    click.echo(f"objects     {len(manifest.objects)}")
    for name, (count, nbytes) in sorted(groups.items()):
        click.echo(f"  {name:<10}{count:>6} tensors  {fmt_bytes(nbytes)}")
    if tensors:
        for path, e in sorted(manifest.tensors.items()):
            click.echo(f"  {path}  {e.dtype}  {list(e.shape)}")


def _show_row(r: CheckpointRecord, as_json: bool) -> None:
    """The lineage row of a pruned checkpoint (its manifest and tensors may be deleted) or of
    one not in the shared store (its manifest is on a node-local tier, or lost): neither is
    read from the store."""
    if as_json:
        echo_json(r.to_json())
        return
    click.echo(f"checkpoint  {r.id}")
    click.echo(f"branch      {r.branch}")
    click.echo(f"step        {r.step}")
    click.echo(f"kind        {r.kind}")
    click.echo(f"created     {r.created.isoformat()}")
    click.echo(f"parents     {', '.join(short(p) for p in r.parents) or '-'}")
    if r.metrics:
        click.echo(f"metrics     {fmt_metrics(r.metrics)}")
    click.echo(f"tier        {_TIER_SAYS.get(r.tier, r.tier)}")
    click.echo(f"nodes       {', '.join(r.nodes) or '-'}")
    if r.pruned is not None:
        click.echo(
            f"pruned      {r.pruned:%Y-%m-%d %H:%M} UTC by garbage collection: its lineage "
            "stays, its tensors may be gone"
        )


_TIER_SAYS = {
    "local": "local (on the node-local tiers of its nodes only, not drained to the store yet)",
    "lost": "lost (a node holding a local-only share is gone: it is never restored)",
}


@click.command()
@click.argument("a", shell_complete=complete_refs)
@click.argument("b", shell_complete=complete_refs)
@json_option
@pass_env
def diff(env: Env, a: str, b: str, as_json: bool) -> None:
    """Tensors that differ between checkpoints A and B (from manifests; no tensor reads).

    Example: tlreg diff base upper-head
    """
    ra, rb = resolve_live(env, a, "diff it"), resolve_live(env, b, "diff it")
    result = diff_manifests(
        read_manifest(env.store, ra.manifest), read_manifest(env.store, rb.manifest)
    )
    if as_json:
        echo_json({"a": ra.id, "b": rb.id, **result.to_json()})
        return
    marks = {"added": "+", "removed": "-", "changed": "M"}
    for c in result.changes:
        size = fmt_bytes(c.nbytes_b if c.status != "removed" else c.nbytes_a)
        click.echo(f"{marks[c.status]} {c.path}  {size}{'  ' + c.detail if c.detail else ''}")
    changed_bytes = sum(max(c.nbytes_a, c.nbytes_b) for c in result.changes)
    click.echo(
        f"{len(result.changes)} tensors differ ({fmt_bytes(changed_bytes)}), "
        f"{result.unchanged} identical ({fmt_bytes(result.unchanged_bytes)}) "
        f"between {short(ra.id)} ({ra.branch}@{ra.step}) and {short(rb.id)} ({rb.branch}@{rb.step})"
    )


@click.command()
@click.argument("branch", required=False, shell_complete=complete_branches)
@json_option
@pass_env
def runs(env: Env, branch: str | None, as_json: bool) -> None:
    """Training runs (all, or of BRANCH), oldest first, with duration, last step, final
    metrics and checkpoints kept (of those committed).

    \b
    Example:
      tlreg runs upper-head
    """
    rows = env.registry.run_summaries(branch)  # an unknown branch raises BranchNotFound
    if as_json:
        echo_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo("no runs yet: start one with 'tlreg train BRANCH'")
        return
    header = ["RUN", "BRANCH", "STATUS", "STARTED", "DURATION", "STEPS", "FINAL", "KEPT"]
    click.echo(
        table(
            [
                [
                    str(r.run.id),
                    r.run.branch,
                    r.run.status,
                    r.run.created.strftime("%Y-%m-%d %H:%M:%S"),
                    "-" if r.duration_s is None else f"{r.duration_s:.1f}s",
                    "-" if r.steps is None else str(r.steps),
                    fmt_metrics(r.final) or "-",
                    f"{r.kept}/{r.checkpoints}",
                    r.run.ray_job_id or "-",
                    (r.run.error or "")[:60],
                ]
                for r in rows
            ],
            [*header, "RAY JOB", "ERROR"],
        )
    )


COMMANDS = [log, lineage, show, diff, runs]
