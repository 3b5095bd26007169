"""What every command shares: settings, the registry and store handles, error reporting."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem
from sqlalchemy.exc import DBAPIError

from tlreg.ckpt.errors import CheckpointError
from tlreg.cli.units import fmt_bytes as fmt_bytes  # the commands import it from here
from tlreg.registry import CheckpointRecord, Registry
from tlreg.registry.errors import RegistryError
from tlreg.storage_backends import Store, StoreError, open_store
from tlreg.storage_backends.credentials import scrub, without_password
from tlreg.training import ConfigError, Settings, TrainingError, load_settings
from tlreg.training.config import same_store

USER_ERRORS = (RegistryError, CheckpointError, StoreError, TrainingError)
"""Errors that are the user's to fix: printed as one line, exit status 1, no traceback."""

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
"""``-h`` as well as ``--help`` (as git and most CLIs), on every command (subcommands inherit)."""

F = TypeVar("F", bound=Callable[..., Any])


class Env:
    """Lazily opened handles for one CLI invocation.

    The registry records the store it was initialised with (meta ``store_url``); opening the
    registry checks that this invocation's store is that one, so a ``--store`` or
    ``TLREG_STORE_URL`` pointing elsewhere is refused before any command reads or writes.
    """

    def __init__(self, home: str | None, registry_url: str | None, store_url: str | None) -> None:
        self._args = {"home": home, "registry_url": registry_url, "store_url": store_url}

    def override(self, *, registry_url: str | None, store_url: str | None) -> None:
        """Use these locations (a command's own ``--registry``/``--store``) when given; must be
        called before :attr:`settings` is first read."""
        if "settings" in self.__dict__:
            raise AssertionError("settings already resolved")
        if registry_url is not None:
            self._args["registry_url"] = registry_url
        if store_url is not None:
            self._args["store_url"] = store_url

    @cached_property
    def settings(self) -> Settings:
        return load_settings(**self._args)

    @cached_property
    def registry(self) -> Registry:
        registry = Registry(self.settings.registry_url)
        try:
            check_store_matches(registry, self.settings)
        except BaseException:
            registry.close()
            raise
        return registry

    @cached_property
    def store(self) -> Store:
        url = self.settings.store_url
        try:
            return open_store(url)
        except StoreError:
            raise  # already one line naming the store (without its password) and what to do
        except (NotImplementedError, ValueError, OSError) as e:
            # fsspec backends that cannot serve as a store (http:// is read-only), bad URLs
            why = scrub(str(e).splitlines()[0], url) if str(e) else ""
            raise ConfigError(
                f"cannot use {without_password(url)!r} as a store ({type(e).__name__}"
                f"{': ' + why if why else ''}): "
                "pass a directory path or a URL like s3://bucket/prefix"
            ) from e

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()


def check_store_matches(registry: Registry, settings: Settings) -> None:
    """Refuse ``settings.store_url`` when the registry records another store (ConfigError)."""
    recorded = registry.get_meta("store_url")
    if recorded is None:
        return
    if same_store(recorded, settings.store_url):
        return
    raise ConfigError(
        f"registry {without_password(settings.registry_url)} records store "
        f"{without_password(recorded)!r}, not {without_password(settings.store_url)!r}: "
        f"drop --store and TLREG_STORE_URL, or pass --store {without_password(recorded)}"
    )


def _names(ctx: click.Context, *, tags: bool) -> list[str]:
    """Branch (and tag) names of the registry the command line names, for shell completion;
    [] when it cannot be read. A SQLite registry file that does not exist is not created."""
    given = ctx.find_root().params
    try:
        settings = load_settings(
            home=given.get("home"),
            registry_url=given.get("registry_url"),
            store_url=given.get("store_url"),
        )
        url = settings.registry_url
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
            return []
        with Registry(url) as registry:
            names = [b.name for b in registry.branches()]
            if tags:
                names += [t.name for t in registry.tags()]
            return names
    except Exception:  # completion must never print a traceback into the user's shell
        return []


def complete_branches(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of branch names (``_TLREG_COMPLETE=bash_source tlreg``)."""
    return [CompletionItem(n) for n in _names(ctx, tags=False) if n.startswith(incomplete)]


def complete_refs(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of refs: branch and tag names."""
    return [CompletionItem(n) for n in _names(ctx, tags=True) if n.startswith(incomplete)]


class TlregGroup(click.Group):
    """A group whose commands turn tlreg's user errors into one-line messages."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole first sentence, wrapped (click cuts it
        at the terminal's width with "...")."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=300)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0]) from e
        except NotImplementedError as e:
            # an fsspec backend that cannot write (http://) reached by a store operation
            env = ctx.find_object(Env)
            where = without_password(env.settings.store_url) if env is not None else "the store"
            raise click.ClickException(
                f"store {where!r} does not support writing (fsspec raised NotImplementedError): "
                "pass a directory path or a URL like s3://bucket/prefix"
            ) from e
        except PermissionError as e:
            # e.g. a store folder the user may not write: name the path, not a traceback
            raise click.ClickException(
                f"permission denied: {e.filename or e}: check the store's and the home's "
                "permissions (or pass --store / --home)"
            ) from e
        except DBAPIError as e:
            # e.g. a search_path schema that does not exist, a role without rights
            orig = e.orig if e.orig is not None else e
            first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            raise click.ClickException(
                f"registry database error ({type(orig).__name__}: {first}); "
                "check the registry URL and the database's permissions"
            ) from e


pass_env = click.make_pass_decorator(Env)


def json_option(f: F) -> F:
    """Add ``--json`` (machine-readable output) to a command."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(f)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def short(checkpoint_id: str | None) -> str:
    """The 12-character form of a checkpoint id shown in listings."""
    return checkpoint_id[:12] if checkpoint_id else "-"


def fmt_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


def pruned_mark(r: CheckpointRecord) -> str:
    """``pruned YYYY-MM-DD`` for a checkpoint garbage collection pruned, else ""."""
    return f"pruned {r.pruned:%Y-%m-%d}" if r.pruned is not None else ""


def checkpoint_line(r: CheckpointRecord) -> str:
    """One line describing a checkpoint, used by log and lineage."""
    parts = [short(r.id), f"{r.branch}@{r.step}", r.kind]
    if r.pruned is not None:
        parts.append(f"[{pruned_mark(r)}]")
    if r.metrics:
        parts.append(fmt_metrics(r.metrics))
    return "  ".join(parts)


def resolve_live(env: Env, ref: str, action: str) -> CheckpointRecord:
    """The checkpoint ``ref`` names, refused (CheckpointPruned, with the gc date) when garbage
    collection pruned it: a pruned checkpoint is never reported as damaged. ``action`` ends
    "cannot ..." in the message (e.g. "export it")."""
    return env.registry.resolve_live(ref, action)


def decorations(env: Env) -> dict[str, list[str]]:
    """Checkpoint id -> the names pointing at it, as git log --decorate shows them
    (``HEAD -> NAME`` is not a thing here: ``head: BRANCH`` and ``tag: NAME``)."""
    names: dict[str, list[str]] = {}
    for b in env.registry.branches():
        if b.head:
            names.setdefault(b.head, []).append(f"head: {b.name}")
    for t in env.registry.tags():
        names.setdefault(t.checkpoint, []).append(f"tag: {t.name}")
    return names


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
