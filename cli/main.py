"""``tlreg``: the command group and ``tlreg init``."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import click

from tlreg.cli import branches, history, jobs, maintenance, train, ui, visual, weights
from tlreg.cli.common import CONTEXT_SETTINGS, Env, TlregGroup, echo_json, json_option, pass_env
from tlreg.registry import Registry
from tlreg.registry.core import FORCE_ENV
from tlreg.storage_backends import Store
from tlreg.storage_backends.credentials import without_password
from tlreg.training import write_settings
from tlreg.training.config import absolute_tier, check_home_store, same_store
from tlreg.training.preflight import check_local_tier


@click.group(cls=TlregGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--home", envvar="TLREG_HOME", help="tlreg home (default ~/.tlreg).")
@click.option("--registry", "registry_url", help="Registry URL (overrides TLREG_REGISTRY_URL).")
@click.option("--store", "store_url", help="Store path or URL (overrides TLREG_STORE_URL).")
@click.option(
    "--force",
    is_flag=True,
    help="Allow a SQLite registry on a network filesystem (one writing machine only).",
)
@click.version_option(package_name="tlreg")
@click.pass_context
def cli(
    ctx: click.Context,
    home: str | None,
    registry_url: str | None,
    store_url: str | None,
    force: bool,
) -> None:
    """Async checkpoints and a lineage registry for transfer learning on Ray.

    \b
    Example:
      tlreg init --store /data/tlreg-store
      tlreg branch base --task tlreg.training.examples.digits:lower
      tlreg train base --steps 200
    """
    if force:
        # An environment variable, so that Ray workers this command starts inherit it.
        os.environ[FORCE_ENV] = "1"
    env = Env(home, registry_url, store_url)
    ctx.obj = env
    ctx.call_on_close(env.close)


@cli.command()
@click.option("--registry", "registry_url", help="Registry URL to record in tlreg.toml.")
@click.option("--store", "store_url", help="Store path or URL to record in tlreg.toml.")
@click.option(
    "--local-tier",
    metavar="PATH",
    help="Node-local directory in front of the store, to record in tlreg.toml "
    "({node} expands to the Ray node id; default: TLREG_LOCAL_TIER, else none).",
)
@json_option
@pass_env
def init(
    env: Env,
    registry_url: str | None,
    store_url: str | None,
    local_tier: str | None,
    as_json: bool,
) -> None:
    """Create the registry and store, and write tlreg.toml.

    \b
    Example:
      tlreg init --store s3://bucket/prefix
      tlreg init --registry postgresql+psycopg://me@db/tlreg --store /data/store
      tlreg init --store s3://bucket/prefix --local-tier '/local/nvme/tlreg/{node}'
    """
    env.override(registry_url=registry_url, store_url=store_url)
    settings = env.settings
    if local_tier:
        settings = dataclasses.replace(settings, local_tier=absolute_tier(local_tier))
    check_home_store(settings.store_url)
    if settings.local_tier:
        check_local_tier(settings.local_tier, settings.store_url)
    created = _missing_folders(env.store)
    try:
        _probe(env.store)  # a bad URL, credentials or bucket fails here, before anything is written
        registry = Registry(settings.registry_url)
        try:
            recorded = registry.get_meta("store_url")
            store_shown = without_password(settings.store_url)  # what is recorded and shown
            if recorded is not None and not same_store(recorded, store_shown):
                raise click.ClickException(
                    f"registry {without_password(settings.registry_url)} already records store "
                    f"{without_password(recorded)!r}, not {store_shown!r}: "
                    f"pass --store {without_password(recorded)}"
                )
            if recorded is None:
                registry.set_meta("store_url", store_shown)
            path = write_settings(settings)  # last: a failed init leaves no tlreg.toml behind
        finally:
            registry.close()
    except BaseException:
        if created is not None:  # the probe made the store's folder: a failed init leaves none
            _remove_empty(*created)
        raise
    info = {
        "home": str(settings.home),
        "config": str(path),
        "registry_url": settings.registry_url,
        "store_url": store_shown,
        "local_tier": settings.local_tier,
    }
    shown = without_password(settings.registry_url)
    info["registry_url"] = shown
    if as_json:
        echo_json(info)
    else:
        click.echo(f"initialised tlreg in {settings.home}")
        click.echo(f"  registry  {shown}")
        click.echo(f"  store     {store_shown}")
        if settings.local_tier:
            click.echo(f"  local tier {settings.local_tier}")
        if shown != settings.registry_url:
            click.echo("  the registry password was not saved: set PGPASSWORD or use ~/.pgpass")
        if store_shown != settings.store_url:
            protocol = settings.store_url.split("://", 1)[0].upper()
            click.echo(
                f"  the store password was not saved: set FSSPEC_{protocol}_PASSWORD "
                "or pass --store with it again"
            )


def _missing_folders(store: Store) -> tuple[Path, Path] | None:
    """For a local store whose root does not exist yet: the root, and the outermost of its
    folders that does not exist either (None for other stores, or when the root exists)."""
    where = store.local_path("x")
    if where is None:
        return None
    root = Path(where).parent
    missing = None
    for folder in [root, *root.parents]:
        if folder.exists():
            break
        missing = folder
    return None if missing is None else (root, missing)


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty."""
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (something else wrote there) or already gone
        if path == top:
            return


def _probe(store: Store) -> None:
    """Read and write ``store`` once (a listing, a put and a delete of a scratch key), so
    that a missing bucket, wrong credentials or an unwritable path show up at init."""
    next(iter(store.list("manifests")), None)
    key = f"tmp/init-probe-{uuid.uuid4().hex}"
    store.put(key, b"tlreg init probe")
    store.delete(key)


for module in (branches, history, jobs, maintenance, train, weights, visual, ui):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tlreg")
