"""``tlreg train``: train a branch on Ray Train, checkpointing through tlreg."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import click

from tlreg.cli.common import Env, echo_json, fmt_bytes, json_option, pass_env, short
from tlreg.training import TrainConfig
from tlreg.training import train as run_training
from tlreg.training.errors import ConfigError
from tlreg.training.events import Checkpointed, Evaluated, ProgressListener, Restored

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def config_option(name: str, help: str, **attrs: Any) -> Callable[[F], F]:
    """``--NAME`` for the :class:`TrainConfig` field ``name``: its default, and so its type,
    come from the field (TrainConfig is the one place they are written)."""
    default = _DEFAULTS[name]
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        attrs.update(is_flag=True, default=default)
    elif isinstance(default, tuple):
        attrs.update(multiple=True, default=default)
    else:
        attrs.update(default=default, show_default=True)
    return click.option(flag, help=help, **attrs)


@click.command()
@click.argument("branch")
@click.option("--task", help="MODULE:ATTR of the task (default: the branch's task).")
@config_option("workers", "Ray Train workers (DDP ranks).")
@config_option("steps", "Train until this branch step.")
@config_option("checkpoint_every", "Checkpoint every N steps.")
@config_option("eval_every", "Evaluate every N steps.")
@config_option("freeze", "Freeze matching parameters (repeatable).", metavar="GLOB")
@config_option("lr", "Adam learning rate.")
@config_option(
    "backbone_lr_mult", "Learning-rate multiplier for everything but the task's head (fine-tuning)."
)
@config_option("batch_size", "Examples per worker per step.")
@config_option("seed", "Seed for initialisation and batches.")
@config_option("lazy", "Lazy checkpoint staging (overlaps the next step).")
@config_option("max_failures", "Worker-group restarts allowed.")
@json_option
@pass_env
def train(env: Env, branch: str, task: str | None, as_json: bool, **options: Any) -> None:
    """Train BRANCH from its head with N Ray workers.

    Example: tlreg train upper-head --steps 200 --freeze 'features.*'
    """
    config = train_config(env, branch, task, options)
    # With --json, stdout carries only the summary; progress goes to stderr.
    progress = _Progress(err=as_json)
    # Ray's own processes write notices (e.g. a worker died) to the driver's stdout; with
    # --json that stream must carry only the summary, so they go to stderr meanwhile.
    with stdout_to_stderr() if as_json else nullcontext():
        summary = run_training(
            config, storage_path=env.settings.home / "ray", on_event=progress.on_event
        )
    progress.finish()
    if as_json:
        echo_json(summary.to_json())
        return
    click.echo(
        f"run {summary.run_id} {summary.status}: branch {summary.branch} "
        f"step {summary.start_step} -> {summary.final_step} in {summary.wall_s:.1f} s"
    )
    if summary.checkpoints:
        new = sum(c.new_bytes for c in summary.checkpoints)
        click.echo(
            f"  {len(summary.checkpoints)} checkpoints, "
            f"head {short(summary.checkpoints[-1].id)}, "
            f"{fmt_bytes(new)} new bytes"
        )
    for failed in summary.checkpoint_errors:
        click.echo(f"  checkpoint at step {failed.step} failed: {failed.error}", err=True)


def train_config(
    env: Env, branch: str, task: str | None, options: Mapping[str, Any]
) -> TrainConfig:
    """The config of ``tlreg train BRANCH`` (and ``tlreg submit``) with these options: the
    registry and store from the settings, the task by default the branch's own."""
    own_task = env.registry.get_branch(branch).task  # also: the branch must exist
    task = task or own_task
    if not task:
        raise ConfigError(f"branch {branch!r} has no task: pass --task MODULE:ATTR")
    return TrainConfig(
        branch=branch,
        task=task,
        registry_url=env.settings.registry_url,
        store_url=env.settings.store_url,
        **options,
    )


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr (child processes included) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _Progress(ProgressListener):
    """One live line on a terminal, one line per event otherwise."""

    def __init__(self, *, err: bool) -> None:
        self.err = err
        self.tty = (sys.stderr if err else sys.stdout).isatty()
        self.last_ckpt: str | None = None
        self.stall_ms = 0.0

    # docstring inherited
    def restored(self, event: Restored) -> None:
        if event.checkpoint is None:
            self.echo("starting from scratch (empty branch)")
        elif event.resumed:
            self.echo(f"resuming from {short(event.checkpoint)} at step {event.step}")
        else:
            self.echo(
                f"transferring from {short(event.checkpoint)}: "
                f"{len(event.transferred)} tensors loaded, "
                f"{len(event.skipped)} re-initialised, {len(event.frozen)} frozen"
            )

    # docstring inherited
    def checkpointed(self, event: Checkpointed) -> None:
        self.last_ckpt, self.stall_ms = event.id, event.stall_ms

    # docstring inherited
    def evaluated(self, event: Evaluated) -> None:
        line = (
            f"step {event.step:>5}  loss {event.loss:.4f}  "
            f"{event.metric_name} {event.metric:.4f}  "
            f"ckpt {short(self.last_ckpt)}  stall {self.stall_ms:.1f} ms"
        )
        if self.tty:
            self.echo("\r" + line, nl=False)
        else:
            self.echo(line)

    def echo(self, message: str, nl: bool = True) -> None:
        click.echo(message, nl=nl, err=self.err)

    def finish(self) -> None:
        if self.tty:
            self.echo("")


COMMANDS = [train]
