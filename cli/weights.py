"""``tlreg import``, ``tlreg export`` and ``tlreg verify``."""

from __future__ import annotations

import click

from tlreg.ckpt.fsck import verify_checkpoint
from tlreg.cli.common import (
    Env,
    complete_refs,
    echo_json,
    fmt_bytes,
    json_option,
    pass_env,
    resolve_live,
    short,
)
from tlreg.cli.maintenance import verify_store
from tlreg.cli.progress import progress
from tlreg.training import export_weights, import_weights


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option("--name", required=True, help="Name of the new root branch.")
@click.option("--task", help="Task recorded on the branch (MODULE:ATTR).")
@json_option
@pass_env
def import_(env: Env, path: str, name: str, task: str | None, as_json: bool) -> None:
    """Import PATH (.safetensors, torch state dict, Hugging Face folder) as a new root branch.

    Example: tlreg import resnet.safetensors --name base
    """
    record = import_weights(
        path,
        name,
        registry=env.registry,
        store=env.store,
        task=task,
        progress=None if as_json else progress,
    )
    if as_json:
        echo_json(record.to_json())
    else:
        click.echo(
            f"imported {path} as {short(record.id)} on new branch {name} "
            f"({fmt_bytes(record.logical_bytes)})"
        )


@click.command()
@click.argument("ref", shell_complete=complete_refs)
@click.argument("out", type=click.Path(dir_okay=False))
@pass_env
def export(env: Env, ref: str, out: str) -> None:
    """Write the model tensors of REF to the safetensors file OUT.

    Example: tlreg export upper-head head.safetensors
    """
    ref = resolve_live(env, ref, "export it").id  # pruned is said so, not "damaged"
    record, count = export_weights(
        ref, out, registry=env.registry, store=env.store, progress=progress
    )
    click.echo(
        f"exported {count} tensors of {short(record.id)} ({record.branch}@{record.step}) to {out}"
    )


@click.command()
@click.argument("ref", required=False, shell_complete=complete_refs)
@click.option("--all", "all_", is_flag=True, help="Every kept checkpoint; each object read once.")
@click.option("--quick", is_flag=True, help="Check manifests and object sizes; read no bytes.")
@json_option
@pass_env
def verify(env: Env, ref: str | None, all_: bool, quick: bool, as_json: bool) -> None:
    """Re-read every object of checkpoint REF (or, with --all, of every kept checkpoint) and
    check its hashes.  Example: tlreg verify base; tlreg verify --all --json"""
    if all_ == (ref is not None):
        raise click.UsageError(
            "REF and --all exclude each other" if all_ else "name a checkpoint (REF) or pass --all"
        )
    if all_ or quick:
        verify_store(env, ref, quick, as_json)
        return
    assert ref is not None
    record = resolve_live(env, ref, "verify it")  # pruned is said so, not "damaged"
    report = verify_checkpoint(env.store, record.manifest)
    if as_json:
        echo_json({"checkpoint": record.id, **report.to_json()})
    elif report.ok:
        click.echo(f"ok: {short(record.id)} ({record.branch}@{record.step}) verified")
    else:
        for problem in report.problems:
            click.echo(f"damaged: {problem}", err=True)
    if not report.ok:
        raise SystemExit(1)


COMMANDS = [import_, export, verify]
