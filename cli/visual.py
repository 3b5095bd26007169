"""``tlreg compare`` and ``tlreg plot``: did the transfer help? Evaluation curves of several
branches side by side, as a table (steps and seconds to a target, final value, bytes) and as a
chart (matplotlib, PNG and SVG, the branch points marked).

The data functions here (:func:`branch_curves`, :func:`compare_rows`, :func:`plot_curves`)
serve the CLI, the web UI's comparison page and the demo alike.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from tlreg.ckpt import Manifest, read_manifest
from tlreg.ckpt.errors import CheckpointError
from tlreg.cli.common import Env, echo_json, fmt_bytes, pass_env, table
from tlreg.registry import BranchNotFound, CheckpointRecord, MetricPoint, Registry
from tlreg.storage_backends import Store, StoreError


class VisualError(click.ClickException):
    """A comparison or plot that cannot be made (printed as one ``Error:`` line)."""


@dataclass(frozen=True, slots=True)
class BranchCurve:
    """One compared line: the branch a ref names, its curve, where it came from."""

    ref: str
    branch: str
    head: CheckpointRecord | None
    """The ref's checkpoint (a branch's head); None for an empty branch."""
    base: CheckpointRecord | None
    """The checkpoint the branch was branched from; None for a root branch."""
    points: list[MetricPoint]
    """The branch's curve of the metric, up to the ref's step when the ref is a checkpoint."""


def branch_curves(registry: Registry, refs: Sequence[str], metric: str) -> list[BranchCurve]:
    """The curve of ``metric`` for each ref: a branch (its whole curve), or a tag or checkpoint
    (its branch's curve up to that checkpoint's step). Raises RefNotFound."""
    out = []
    for ref in refs:
        try:
            b = registry.get_branch(ref)
            head = registry.get(b.head) if b.head else None
            upto = None
        except BranchNotFound:
            head = registry.resolve(ref)
            b = registry.get_branch(head.branch)
            upto = head.step
        points = registry.metric_series(b.name, metric)
        if upto is not None:
            points = [p for p in points if p.step <= upto]
        base = registry.get(b.base) if b.base else None
        out.append(BranchCurve(ref, b.name, head, base, points))
    return out


def reached(
    points: Sequence[MetricPoint], target: float, *, lower_is_better: bool = False
) -> MetricPoint | None:
    """The first point at or past ``target`` (>=, or <= when lower is better), or None."""
    for p in points:
        if (p.value <= target) if lower_is_better else (p.value >= target):
            return p
    return None


def stored_blocks(manifest: Manifest) -> dict[tuple[str, int], int]:
    """(object, offset) -> bytes of every stored block of a checkpoint: where its bytes live."""
    return {(e.object, e.offset): e.nbytes for _, e in manifest.stored()}


def shared_bytes(child: Manifest, parent: Manifest) -> int:
    """Bytes of ``child``'s tensors that live where ``parent``'s do (same object and offset):
    stored once for both."""
    theirs = stored_blocks(parent)
    return sum(n for key, n in stored_blocks(child).items() if theirs.get(key) == n)


def manifest_or_none(store: Store, record: CheckpointRecord | None) -> Manifest | None:
    """The record's manifest, or None when there is none to read (no record, pruned by gc, or
    gone from the store)."""
    if record is None or record.pruned is not None:
        return None
    try:
        return read_manifest(store, record.manifest)
    except (CheckpointError, StoreError, OSError):
        return None


def compare_rows(
    registry: Registry,
    store: Store,
    curves: Sequence[BranchCurve],
    *,
    target: float | None,
    lower_is_better: bool = False,
) -> list[dict[str, Any]]:
    """The comparison table, one dict per curve (the keys of ``--json``)."""
    rows = []
    for c in curves:
        hit = None if target is None else reached(c.points, target, lower_is_better=lower_is_better)
        last = c.points[-1] if c.points else None
        logical, new = registry.branch_bytes(c.branch)
        shared = None
        if c.base is not None:
            mine, theirs = manifest_or_none(store, c.head), manifest_or_none(store, c.base)
            if mine is not None and theirs is not None:
                shared = shared_bytes(mine, theirs)
        rows.append(
            {
                "ref": c.ref,
                "branch": c.branch,
                "ancestor": None if c.base is None else c.base.id,
                "ancestor_at": None if c.base is None else f"{c.base.branch}@{c.base.step}",
                "target": target,
                "steps_to_target": None if hit is None else hit.step,
                "seconds_to_target": None if hit is None else hit.elapsed_s,
                "final": None if last is None else _json_float(last.value),
                "final_step": None if last is None else last.step,
                "evaluations": len(c.points),
                "logical_bytes": logical,
                "new_bytes": new,
                "shared_with_ancestor_bytes": shared,
            }
        )
    return rows


def _json_float(v: float) -> float | str:
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def _check_metric(curves: Sequence[BranchCurve], registry: Registry, metric: str) -> None:
    if any(c.points for c in curves):
        return
    names = sorted({n for c in curves for n in registry.metric_names(c.branch)})
    hint = f"metrics logged there: {', '.join(names)}" if names else "none logged any metric yet"
    raise VisualError(
        f"no compared branch logged metric {metric!r}: pass --metric one of the logged ones "
        f"({hint})"
    )


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--metric", "-m", required=True, help="Metric to compare, e.g. val_accuracy.")
@click.option("--target", "-t", type=float, help="Value to reach (steps and seconds to it).")
@click.option("--lower-is-better", is_flag=True, help="The target is reached going down (loss).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of text.")
@pass_env
def compare(
    env: Env,
    refs: tuple[str, ...],
    metric: str,
    target: float | None,
    lower_is_better: bool,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Compare branches: steps and seconds to reach a target value of a metric, the final
    value, new bytes stored and bytes shared with the ancestor each branched from.

    \b
    Example:
      tlreg compare upper-scratch upper-head upper-full -m val_accuracy -t 0.95
    """
    if as_json and as_csv:
        raise VisualError("--json and --csv are exclusive: pass one of them")
    curves = branch_curves(env.registry, refs, metric)
    _check_metric(curves, env.registry, metric)
    rows = compare_rows(
        env.registry, env.store, curves, target=target, lower_is_better=lower_is_better
    )
    if as_json:
        echo_json({"metric": metric, "lower_is_better": lower_is_better, "rows": rows})
        return
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    click.echo(text_table(rows, metric, target))


def text_table(rows: Sequence[dict[str, Any]], metric: str, target: float | None) -> str:
    """The comparison as the aligned text table ``tlreg compare`` prints."""

    def opt(v: Any, fmt: str = "{}") -> str:
        return "-" if v is None else fmt.format(v)

    header = ["BRANCH", "FROM"]
    if target is not None:
        header += [f"STEPS TO {target:g}", "SECONDS"]
    header += [f"FINAL {metric}", "NEW BYTES", "SHARED WITH ANCESTOR"]
    body = []
    for r in rows:
        line = [r["ref"], opt(r["ancestor_at"])]
        if target is not None:
            line += [
                opt(r["steps_to_target"]) if r["evaluations"] else "-",
                opt(r["seconds_to_target"], "{:.2f}"),
            ]
            if r["evaluations"] and r["steps_to_target"] is None:
                line[-2] = "not reached"
        final = r["final"]
        line += [
            "-" if final is None else (f"{final:.4g}" if isinstance(final, float) else final),
            fmt_bytes(r["new_bytes"]),
            "-"
            if r["shared_with_ancestor_bytes"] is None
            else fmt_bytes(r["shared_with_ancestor_bytes"]),
        ]
        body.append(line)
    return table(body, header)


def plot_curves(
    curves: Sequence[BranchCurve],
    metric: str,
    outputs: Sequence[Path],
    *,
    target: float | None = None,
    x: str = "step",
    title: str | None = None,
) -> None:
    """Draw every curve on one chart and write it to each of ``outputs`` (format from the
    suffix: .png, .svg, .pdf). A branch point is marked twice: a hollow circle where the
    branch starts, labelled with the ancestor, and a star on the ancestor's own curve when it
    is drawn too. ``x`` is "step" or "seconds" (training seconds)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        drawn: dict[str, tuple[str, list[MetricPoint]]] = {}
        for i, c in enumerate(curves):
            pts = [p for p in c.points if x == "step" or p.elapsed_s is not None]
            xs = [p.step if x == "step" else p.elapsed_s for p in pts]
            color = colors[i % len(colors)]
            label = c.ref if c.base is None else f"{c.ref} (from {c.base.branch}@{c.base.step})"
            ax.plot(xs, [p.value for p in pts], color=color, label=label, linewidth=1.6)
            drawn[c.branch] = (color, pts)
            if c.base is not None and pts:
                ax.plot(
                    xs[0], pts[0].value, "o", markersize=8, markerfacecolor="none",
                    markeredgecolor=color, markeredgewidth=1.6,
                )  # fmt: skip
        # One star per branch point drawn, naming every branch that starts there.
        points: dict[str, tuple[CheckpointRecord, list[str]]] = {}
        for c in curves:
            if c.base is not None and c.base.branch in drawn:
                points.setdefault(c.base.id, (c.base, []))[1].append(c.ref)
        for base, children in points.values():
            color, pts = drawn[base.branch]
            at = [p for p in pts if p.step <= base.step]
            if at:
                px = at[-1].step if x == "step" else at[-1].elapsed_s
                ax.plot(px, at[-1].value, "*", markersize=13, color=color, zorder=5)
                ax.annotate(
                    f"{', '.join(children)} branch{'es' if len(children) == 1 else ''} here",
                    (px, at[-1].value), textcoords="offset points", xytext=(-8, -16),
                    ha="right", fontsize=8, color=color,
                )  # fmt: skip
        if target is not None:
            ax.axhline(target, color="0.5", linestyle=":", linewidth=1)
            ax.annotate(
                f"target {target:g}", (0, target), xycoords=("axes fraction", "data"),
                xytext=(4, 3), textcoords="offset points", fontsize=8, color="0.35",
            )  # fmt: skip
        ax.set_xlabel("step" if x == "step" else "training seconds")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} by branch")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        for out in outputs:
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, format=out.suffix.lstrip(".").lower(), metadata=_no_dates(out))
    finally:
        plt.close(fig)


def _no_dates(out: Path) -> dict[str, Any] | None:
    # Reproducible files: no creation date in SVG and PNG metadata.
    suffix = out.suffix.lower()
    if suffix == ".svg":
        return {"Date": None}
    if suffix == ".pdf":
        return {"CreationDate": None}
    return None


def curves_svg(curves: Sequence[BranchCurve], metric: str, *, target: float | None) -> str:
    """The chart of :func:`plot_curves` as SVG text (for the web UI)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.svg"
        plot_curves(curves, metric, [path], target=target)
        return path.read_text()


PLOT_FORMATS = (".png", ".svg", ".pdf")


def plot_outputs(out: str) -> list[Path]:
    """OUT with a .png, .svg or .pdf suffix names one file; without a suffix, OUT.png and
    OUT.svg."""
    path = Path(out)
    if path.suffix.lower() in PLOT_FORMATS:
        return [path]
    if path.suffix:
        raise VisualError(
            f"cannot write a chart as {path.suffix!r}: name the output .png, .svg or .pdf, or "
            "give no suffix for both .png and .svg"
        )
    return [path.with_name(path.name + ".png"), path.with_name(path.name + ".svg")]


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--metric", "-m", required=True, help="Metric to draw, e.g. val_accuracy.")
@click.option(
    "-o", "--output", "out", required=True,
    help="Output file (.png, .svg, .pdf); without a suffix both OUT.png and OUT.svg.",
)  # fmt: skip
@click.option("--target", "-t", type=float, help="Draw this value as a dotted line.")
@click.option(
    "--x", "x", type=click.Choice(["step", "seconds"]), default="step", show_default=True,
    help="Horizontal axis: steps, or training seconds.",
)  # fmt: skip
@click.option("--title", help="Chart title (default: METRIC by branch).")
@pass_env
def plot(
    env: Env,
    refs: tuple[str, ...],
    metric: str,
    out: str,
    target: float | None,
    x: str,
    title: str | None,
) -> None:
    """Draw the curves of METRIC for several branches on one chart, branch points marked.

    \b
    Example:
      tlreg plot base upper-head upper-scratch -m val_accuracy -o compare
    """
    outputs = plot_outputs(out)
    curves = branch_curves(env.registry, refs, metric)
    _check_metric(curves, env.registry, metric)
    try:
        plot_curves(curves, metric, outputs, target=target, x=x, title=title)
    except OSError as e:
        raise VisualError(
            f"cannot write {e.filename or outputs[0]}: {e.strerror or e}; pick another -o path"
        ) from e
    for path in outputs:
        click.echo(str(path))


COMMANDS = [compare, plot]


def write_lineage(
    env: Env,
    ref: str,
    *,
    html_out: str | None,
    svg_out: str | None,
    metric: str | None,
) -> None:
    """``tlreg lineage REF --html OUT --svg OUT``: the lanes graph of REF's ancestors and
    descendants as files; prints each path."""
    from tlreg.cli.ui.pages import lineage_document, lineage_svg

    written = []
    for out, render in ((html_out, lineage_document), (svg_out, lineage_svg)):
        if out is None:
            continue
        text = render(env.registry, env.store, ref, metric=metric)
        path = Path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise VisualError(f"cannot write {path}: {e.strerror or e}; pick another path") from e
        written.append(path)
    for path in written:
        click.echo(str(path))
