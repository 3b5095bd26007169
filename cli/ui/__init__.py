"""``tlreg ui``: a read-only web browser for the lineage (aiohttp + Jinja2; every asset ships
in the package). See :mod:`tlreg.cli.ui.server` for what it refuses and
:mod:`tlreg.cli.ui.pages` for what each page shows."""

from __future__ import annotations

import click

from tlreg.cli.common import Env, pass_env


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback is reachable by others.",
)
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="Port (0 picks a free one).",
)
@pass_env
def ui(env: Env, host: str, port: int) -> None:
    """Browse the lineage in a web browser: lanes of checkpoints with shared bytes,
    checkpoint details and diffs, branch comparisons, runs. Read-only; loopback by default
    (from a cluster login node: ssh -L 8765:127.0.0.1:8765 login, then open the URL).

    \b
    Example:
      tlreg ui --port 8765
    """
    from tlreg.cli.ui.server import is_loopback, serve

    if not is_loopback(host):
        click.echo(
            f"Warning: listening on {host}: anyone who can reach this address can read the "
            "lineage, names and metrics (there is no login); prefer an SSH tunnel to 127.0.0.1",
            err=True,
        )
    registry, store = env.registry, env.store
    try:
        serve(registry, store, host=host, port=port, print_fn=click.echo)
    except OSError as e:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port"
        ) from e


COMMANDS = [ui]
