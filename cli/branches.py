"""``tlreg branch``, ``tlreg branches`` and ``tlreg tag``."""

from __future__ import annotations

import click

from tlreg.ckpt.verify import quick_check
from tlreg.cli.common import (
    Env,
    complete_branches,
    complete_refs,
    echo_json,
    json_option,
    pass_env,
    resolve_live,
    short,
    table,
)
from tlreg.registry import RefNotFound, validate_name
from tlreg.training import best_ancestor_for, load_task


@click.command()
@click.argument("name", required=False, shell_complete=complete_branches)
@click.argument("from_ref", metavar="[FROM]", required=False, shell_complete=complete_refs)
@click.option("--task", help="Task the branch trains (MODULE:ATTR), recorded for `tlreg train`.")
@click.option(
    "-d",
    "--delete",
    is_flag=True,
    help="Delete branch NAME (its checkpoints stay); refused if branches were made from it.",
)
@click.option("-D", "force_delete", is_flag=True, help="Delete branch NAME even so (-d --force).")
@click.option("-m", "--move", "rename", is_flag=True, help="Rename branch NAME to FROM (NEW).")
@click.option(
    "--best-for",
    metavar="MODULE:ATTR",
    help="Start from the stored checkpoint whose architecture shares the most layers with "
    "this task's model (also sets --task).",
)
@json_option
@pass_env
def branch(
    env: Env,
    name: str | None,
    from_ref: str | None,
    task: str | None,
    delete: bool,
    force_delete: bool,
    rename: bool,
    best_for: str | None,
    as_json: bool,
) -> None:
    """Create branch NAME from FROM (a branch, tag or checkpoint id), or an empty root.

    With no NAME, list branches (as 'tlreg branches').

    \b
    Examples:
      tlreg branch upper-head base --task tlreg.training.examples.digits:upper
      tlreg branch -m upper-head digits-upper     (rename OLD NEW)
      tlreg branch -d digits-upper                (-D: even if branches were made from it)
    """
    if name is None:
        if from_ref or task or delete or force_delete or rename or best_for:
            raise click.UsageError("give the branch NAME")
        _list_branches(env, as_json)
        return
    if delete or force_delete:
        if from_ref or task or rename:
            raise click.UsageError("-d takes only the branch NAME")
        env.registry.delete_branch(name, force=force_delete)
        click.echo(f"deleted branch {name}")
        return
    if rename:
        if from_ref is None or task or best_for:
            raise click.UsageError("-m takes OLD and NEW, e.g. tlreg branch -m base digits-base")
        b = env.registry.rename_branch(name, from_ref)
        if as_json:
            echo_json(b.to_json())
        else:
            click.echo(f"renamed branch {name} to {b.name}")
        return
    if best_for is not None:
        if from_ref:
            raise click.UsageError("give either FROM or --best-for, not both")
        validate_name(name, "branch")
        match = best_ancestor_for(best_for, env.registry)
        if match is None:
            raise click.ClickException(
                f"no stored checkpoint shares a layer with {best_for}'s model: "
                "create an empty branch with 'tlreg branch NAME --task ...'"
            )
        record, depth, total = match
        from_ref, task = record.id, task or best_for
        if not as_json:
            click.echo(
                f"best ancestor {short(record.id)} ({record.branch}@{record.step}) "
                f"shares {depth} of {total} layers"
            )
    if task is not None:
        load_task(task)  # refuse an unknown task before anything is written
    if from_ref is not None:  # a pruned or damaged checkpoint gets no new name (no byte reads)
        quick_check(env.store, resolve_live(env, from_ref, "branch from it").manifest)
    b = env.registry.create_branch(name, from_ref=from_ref, task=task)
    if as_json:
        echo_json(b.to_json())
    elif b.head:
        click.echo(f"created branch {b.name} at {short(b.head)} (from {from_ref})")
    else:
        click.echo(f"created empty branch {b.name}")


@click.command()
@json_option
@pass_env
def branches(env: Env, as_json: bool) -> None:
    """List branches with their heads.  Example: tlreg branches --json"""
    _list_branches(env, as_json)


def _list_branches(env: Env, as_json: bool) -> None:
    rows = env.registry.branches()
    if as_json:
        echo_json([b.to_json() for b in rows])
        return
    if not rows:
        click.echo(
            "no branches: create one with 'tlreg branch NAME' or 'tlreg import FILE --name NAME'"
        )
        return
    heads = {b.head: env.registry.get(b.head) for b in rows if b.head}
    click.echo(
        table(
            [
                [
                    b.name,
                    short(b.head),
                    str(heads[b.head].step) if b.head else "-",
                    b.task or "-",
                    short(b.base),
                ]
                for b in rows
            ],
            ["BRANCH", "HEAD", "STEP", "TASK", "BASE"],
        )
    )


@click.command()
@click.argument("name", required=False)
@click.argument("ref", required=False, shell_complete=complete_refs)
@click.option("-d", "--delete", "delete_name", metavar="NAME", help="Delete tag NAME.")
@json_option
@pass_env
def tag(
    env: Env, name: str | None, ref: str | None, delete_name: str | None, as_json: bool
) -> None:
    """Tag checkpoint REF as NAME (git's order); with no arguments, list tags.

    \b
    Example:
      tlreg tag v1 upper-head
    """
    if delete_name:
        if name or ref:
            raise click.UsageError("-d takes only the tag NAME")
        env.registry.delete_tag(delete_name)
        click.echo(f"deleted tag {delete_name}")
        return
    if name is None:
        tags = env.registry.tags()
        if as_json:
            echo_json([t.to_json() for t in tags])
        else:
            for t in tags:
                click.echo(f"{t.name}  {short(t.checkpoint)}")
        return
    if ref is None:
        raise click.UsageError(
            f"give the REF to tag as well (tlreg has no current branch): tlreg tag {name} BRANCH"
        )
    _refuse_swapped(env, name, ref)
    # a pruned or damaged checkpoint is refused (no byte reads)
    quick_check(env.store, resolve_live(env, ref, "tag it").manifest)
    t = env.registry.tag(ref, name)
    if as_json:
        echo_json(t.to_json())
    else:
        click.echo(f"tagged {short(t.checkpoint)} as {t.name}")


def _refuse_swapped(env: Env, name: str, ref: str) -> None:
    """Refuse ``tag REF NAME`` (tlreg's old order, the reverse of git's) where it shows: NAME is
    an existing branch (a tag of that name would be hidden by it) and REF names nothing."""
    if name not in {b.name for b in env.registry.branches()}:
        return
    try:
        env.registry.resolve(ref)
    except RefNotFound:
        swapped = f"tlreg tag {ref} {name}"
    else:
        swapped = f"tlreg tag NEW-NAME {ref}"
    raise click.ClickException(
        f"{name!r} is a branch, so it cannot be a tag name: tag takes NAME then REF, as in "
        f"git; did you mean '{swapped}'?"
    )


COMMANDS = [branch, branches, tag]
