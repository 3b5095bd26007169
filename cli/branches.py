"""``tlreg branch``, ``tlreg branches`` and ``tlreg tag``."""

from __future__ import annotations

import click

from tlreg.cli.common import Env, echo_json, json_option, pass_env, short, table
from tlreg.registry import validate_name
from tlreg.training import best_ancestor_for, load_task


@click.command()
@click.argument("name")
@click.argument("from_ref", metavar="[FROM]", required=False)
@click.option("--task", help="Task the branch trains (MODULE:ATTR), recorded for `tlreg train`.")
@click.option("-d", "--delete", is_flag=True, help="Delete branch NAME (its checkpoints stay).")
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
    name: str,
    from_ref: str | None,
    task: str | None,
    delete: bool,
    best_for: str | None,
    as_json: bool,
) -> None:
    """Create branch NAME from FROM (a branch, tag or checkpoint id), or an empty root.

    Example: tlreg branch upper-head base --task tlreg.training.examples.digits:upper
    """
    if delete:
        if from_ref or task:
            raise click.UsageError("-d takes only the branch NAME")
        env.registry.delete_branch(name)
        click.echo(f"deleted branch {name}")
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
@click.argument("ref", required=False)
@click.argument("name", required=False)
@click.option("-d", "--delete", "delete_name", metavar="NAME", help="Delete tag NAME.")
@json_option
@pass_env
def tag(
    env: Env, ref: str | None, name: str | None, delete_name: str | None, as_json: bool
) -> None:
    """Tag checkpoint REF as NAME; with no arguments, list tags.  Example: tlreg tag base v1"""
    if delete_name:
        env.registry.delete_tag(delete_name)
        click.echo(f"deleted tag {delete_name}")
        return
    if ref is None:
        tags = env.registry.tags()
        if as_json:
            echo_json([t.to_json() for t in tags])
        else:
            for t in tags:
                click.echo(f"{t.name}  {short(t.checkpoint)}")
        return
    if name is None:
        raise click.UsageError("give both REF and NAME, e.g. tlreg tag base v1")
    t = env.registry.tag(ref, name)
    if as_json:
        echo_json(t.to_json())
    else:
        click.echo(f"tagged {short(t.checkpoint)} as {t.name}")


COMMANDS = [branch, branches, tag]
