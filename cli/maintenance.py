"""``tlreg gc`` and ``tlreg upgrade``: keeping a registry and its store in shape."""

from __future__ import annotations

import re
from datetime import timedelta

import click

from tlreg.ckpt.fsck import check_store, upgrade_store
from tlreg.cli.common import Env, echo_json, fmt_bytes, json_option, pass_env, resolve_live
from tlreg.cli.progress import progress
from tlreg.registry import Registry
from tlreg.training.gc import check_kept, collect_garbage

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType):
    """``90``, ``30s``, ``15m``, ``24h``, ``7d`` or ``2w``."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", str(value).strip())
        if not m:
            self.fail(f"{value!r} is not a duration like 90s, 15m, 24h or 7d", param, ctx)
        return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2) or "s"])


class Percent(click.ParamType):
    """``5%``, ``12.5%`` or a fraction ``0.05``; returned as a fraction from 0 to 1."""

    name = "percent"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a share like 5% or 0.05", param, ctx)
        if not 0 <= share <= 1:
            self.fail(f"{value!r} is not between 0% and 100%", param, ctx)
        return share


@click.command()
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; change nothing.")
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    help="Keep only the N newest checkpoints of each branch (plus tags, heads, bases).",
)
@click.option(
    "--grace",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Delete unregistered objects only once seen this long ago (crashed saves).",
)
@click.option(
    "--max-unused",
    type=Percent(),
    default="5%",
    show_default=True,
    help="Repack an object once more than this share of its bytes is unused by kept "
    "checkpoints (like restic prune; 100% never repacks).",
)
@json_option
@pass_env
def gc(
    env: Env,
    dry_run: bool,
    keep_last: int | None,
    grace: timedelta,
    max_unused: float,
    as_json: bool,
) -> None:
    """Delete stored bytes no kept checkpoint needs; lineage rows always stay.

    Objects that kept checkpoints use only a little of (a small unchanged tensor in an old
    pack) are repacked: their used bytes are copied into new objects first.

    Example: tlreg gc --keep-last 5 --max-unused 10% --dry-run
    """
    problems: list[str] = []
    plan = collect_garbage(
        env.registry,
        env.store,
        keep_last=keep_last,
        grace=grace,
        dry_run=dry_run,
        max_unused=max_unused,
        progress=None if as_json else progress,
        problems=problems,
    )
    if as_json:
        echo_json({"dry_run": dry_run, **plan.to_json(), "problems": problems})
        return
    verb = "would" if dry_run else "did"
    click.echo(
        f"gc {verb} prune {len(plan.prune)} checkpoints and delete {len(plan.objects)} objects "
        f"({fmt_bytes(plan.nbytes)}), {len(plan.orphan_objects)} orphan objects and "
        f"{len(plan.orphan_manifests)} orphan manifests"
    )
    if plan.repacked:
        old = sum(n for _, n, _ in plan.repacked)
        live = sum(live for _, _, live in plan.repacked)
        click.echo(
            f"gc {verb} repack {len(plan.repacked)} mostly-unused objects: "
            f"{fmt_bytes(live)} copied, {fmt_bytes(old - live)} freed"
        )
    for problem in problems:
        click.echo(f"warning: {problem}; run tlreg verify --all", err=True)
    if plan.abandoned:
        click.echo(f"gc {verb} remove {plan.abandoned} leftovers of interrupted writes")
    if plan.waiting:
        click.echo(f"{plan.waiting} unregistered items are younger than --grace and were kept")


def verify_store(env: Env, ref: str | None, quick: bool, as_json: bool) -> None:
    """``tlreg verify --all`` (``ref`` None) and ``tlreg verify --quick [REF]``: every kept
    checkpoint and every object once (see :func:`tlreg.training.gc.check_kept`); exits 1
    naming each damaged checkpoint and tensor."""
    if ref is None:
        report = check_kept(
            env.registry, env.store, quick=quick, progress=None if as_json else progress
        )
    else:
        record = resolve_live(env, ref, "verify it")
        report = check_store(env.store, [record.manifest], quick=quick)
    if as_json:
        echo_json(report.to_json())
    else:
        for problem in report.problems:
            click.echo(f"damaged: {problem}", err=True)
        read = "sizes and manifests only" if quick else f"{fmt_bytes(report.checked_bytes)} read"
        click.echo(
            f"{'ok' if report.ok else 'damaged'}: {report.checkpoints} checkpoints, "
            f"{report.objects} objects ({read}); {len(report.orphans)} orphan objects; "
            f"{fmt_bytes(report.pinned_bytes)} stored but unused by kept checkpoints"
            + (" (tlreg gc frees them)" if report.pinned_bytes else "")
        )
    if not report.ok:
        raise SystemExit(1)


@click.command()
@pass_env
def upgrade(env: Env) -> None:
    """Migrate the registry's schema and the store's layout to this tlreg's version.

    Example: tlreg upgrade
    """
    before, after = Registry.upgrade(env.settings.registry_url)
    if before == after:
        click.echo(f"registry schema is up to date (version {after})")
    else:
        click.echo(f"registry schema upgraded from version {before} to {after}")
    with progress("manifests", total=None) as bar:
        moved = upgrade_store(env.store, on_item=bar.update)
    if moved:
        click.echo(f"store layout upgraded: {moved} manifests moved under manifests/<xx>/<yy>/")
    else:
        click.echo("store layout is up to date")


COMMANDS = [gc, upgrade]
