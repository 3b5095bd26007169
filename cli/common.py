"""What every command shares: settings, the registry and store handles, error reporting."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar

import click
from sqlalchemy.exc import DBAPIError

from tlreg.ckpt.errors import CheckpointError
from tlreg.registry import CheckpointRecord, Registry
from tlreg.registry.errors import RegistryError
from tlreg.storage_backends import Store, StoreError, open_store
from tlreg.training import Settings, TrainingError, load_settings

USER_ERRORS = (RegistryError, CheckpointError, StoreError, TrainingError)
"""Errors that are the user's to fix: printed as one line, exit status 1, no traceback."""

F = TypeVar("F", bound=Callable[..., Any])


class Env:
    """Lazily opened handles for one CLI invocation."""

    def __init__(self, home: str | None, registry_url: str | None, store_url: str | None) -> None:
        self._args = {"home": home, "registry_url": registry_url, "store_url": store_url}

    @cached_property
    def settings(self) -> Settings:
        return load_settings(**self._args)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings.registry_url)

    @cached_property
    def store(self) -> Store:
        return open_store(self.settings.store_url)

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()


class TlregGroup(click.Group):
    """A group whose commands turn tlreg's user errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0]) from e
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


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def checkpoint_line(r: CheckpointRecord) -> str:
    """One line describing a checkpoint, used by log and lineage."""
    parts = [short(r.id), f"{r.branch}@{r.step}", r.kind]
    if r.metrics:
        parts.append(fmt_metrics(r.metrics))
    return "  ".join(parts)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
