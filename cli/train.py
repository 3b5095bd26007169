"""``tlreg train``: train a branch on Ray Train, checkpointing through tlreg."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import IO, Any, TypeVar

import click
from click.core import ParameterSource

from tlreg.cli.common import Env, echo_json, fmt_bytes, json_option, pass_env, short
from tlreg.cli.progress import Progress
from tlreg.training import TrainConfig
from tlreg.training import train as run_training
from tlreg.training.config import absolute_tier
from tlreg.training.errors import ConfigError
from tlreg.training.events import (
    Checkpointed,
    CheckpointFailed,
    Evaluated,
    ProgressListener,
    RayStarted,
    RayStarting,
    Restored,
)
from tlreg.training.preflight import remembered_options

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
@config_option("steps", "Train until this branch step (a total, not a count of new steps).")
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
@config_option(
    "on_checkpoint_error",
    "A checkpoint that fails to commit stops the run (it fails), or training continues.",
    type=click.Choice(["stop", "continue"]),
)
@click.option(
    "--local-tier",
    metavar="PATH",
    help="Node-local directory in front of the store; {node} expands to the Ray node id "
    "(default: TLREG_LOCAL_TIER, tlreg.toml's local_tier, else none).",
)
@config_option(
    "persist_every",
    "With --local-tier: drain every M-th step's checkpoint to the store (a multiple of "
    "--checkpoint-every; default: every checkpoint).",
    type=int,
    metavar="M",
)
@config_option("local_keep", "With --local-tier: local-only checkpoints kept on the tier.")
@config_option(
    "drain_bytes_per_s",
    "With --local-tier: each node drains at most this many bytes/s (default: no cap).",
    type=float,
)
@json_option
@pass_env
def train(env: Env, branch: str, task: str | None, as_json: bool, **options: Any) -> None:
    """Train BRANCH from its head with N Ray workers.

    A resume reuses the options the branch was trained with (--freeze, --lr, ...); a flag
    given again overrides them. A branch has one live run at a time.

    \b
    Example: tlreg train upper-head --steps 200 --freeze 'features.*'
    """
    # With --json, stdout carries only the summary; progress goes to stderr.
    config = train_config(env, branch, task, options, given=given_options(), notice=_notice)
    progress = TrainProgress(config, file=sys.stderr if as_json else sys.stdout)
    # Ray's own processes write notices (e.g. a worker died) to the driver's stdout; with
    # --json that stream must carry only the summary, so they go to stderr meanwhile.
    try:
        with stdout_to_stderr() if as_json else nullcontext():
            summary = run_training(
                config, storage_path=env.settings.home / "ray", on_event=progress.on_event
            )
    finally:
        progress.close()
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
    if summary.checkpoint_errors:
        # --on-checkpoint-error continue: each was reported when it happened; count them.
        click.echo(
            f"  {len(summary.checkpoint_errors)} checkpoints failed (first at step "
            f"{summary.checkpoint_errors[0].step}); the head is the last one committed",
            err=True,
        )


def _notice(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def given_options() -> frozenset[str]:
    """The options of the running command given on its command line (or environment)."""
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in given)


def _as_flags(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if isinstance(value, (tuple, list)):
        return " ".join(f"{flag} {shlex.quote(str(v))}" for v in value) or f"no {flag}"
    return f"{flag} {shlex.quote(str(value))}"


def train_config(
    env: Env,
    branch: str,
    task: str | None,
    options: Mapping[str, Any],
    *,
    given: Collection[str] = (),
    notice: Callable[[str], None] = _notice,
) -> TrainConfig:
    """The config of ``tlreg train BRANCH`` (and ``tlreg submit``) with these options: the
    registry and store from the settings, the task by default the branch's own, and on a
    resume the options the branch's head was trained with, except those in ``given`` (each
    override that differs gets a one-line ``notice``)."""
    own_task = env.registry.get_branch(branch).task  # also: the branch must exist
    task = task or own_task
    if not task:
        raise ConfigError(f"branch {branch!r} has no task: pass --task MODULE:ATTR")
    run_id, remembered = remembered_options(env.registry, branch)
    merged = dict(options)
    reused = []
    for name, value in remembered.items():
        if name not in merged or merged[name] == value:
            continue
        if name in given:
            notice(
                f"{_as_flags(name, merged[name])} overrides {_as_flags(name, value)}, "
                f"which branch {branch!r} was trained with (run {run_id})"
            )
        else:
            merged[name] = value
            reused.append(_as_flags(name, value))
    if reused:
        notice(
            f"resuming {branch!r} as run {run_id} trained it: {' '.join(reused)} "
            "(give a flag again to override)"
        )
    tier = merged.pop("local_tier", None)
    return TrainConfig(
        branch=branch,
        task=task,
        registry_url=env.settings.registry_url,
        store_url=env.settings.store_url,
        local_tier=absolute_tier(tier) if tier else env.settings.local_tier,
        **merged,
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


class TrainProgress(ProgressListener):
    """What ``tlreg train`` shows while it runs: "starting Ray..." and how long it took, the
    restore, then a bar of steps N/M with rate and ETA whose columns are the last loss, the
    metric and the last *committed* checkpoint (``ckpt ID@STEP``); a failed checkpoint is
    printed when it happens. Plain lines when not on a terminal (see cli/progress.py)."""

    def __init__(self, config: TrainConfig, *, file: IO[str]) -> None:
        self.config = config
        self.file = file
        self.bar: Progress | None = None
        self.start_step = 0
        self.ckpt = "-"

    def echo(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            click.echo(message, file=self.file)

    # docstring inherited
    def ray_starting(self, event: RayStarting) -> None:
        self.echo("joining Ray..." if event.joining else "starting Ray...")

    # docstring inherited
    def ray_started(self, event: RayStarted) -> None:
        self.echo(
            f"Ray ready in {event.elapsed_s:.1f} s; starting {event.workers} "
            f"worker{'s' if event.workers != 1 else ''}..."
        )

    # docstring inherited
    def restored(self, event: Restored) -> None:
        if event.checkpoint is None:
            self.echo("starting from scratch (empty branch)")
        elif event.resumed:
            where = f" from the {event.tier} tier" if event.tier else ""
            if event.lost:
                self.echo(
                    f"{len(event.lost)} local checkpoints lost with their node "
                    f"({', '.join(short(c) for c in event.lost)}): never served"
                )
            self.echo(f"resuming from {short(event.checkpoint)} at step {event.step}{where}")
            self.ckpt = f"{short(event.checkpoint)}@{event.step}"
        else:
            self.echo(
                f"transferring from {short(event.checkpoint)}: "
                f"{len(event.transferred)} tensors loaded, "
                f"{len(event.skipped)} re-initialised, {len(event.frozen)} frozen"
            )
        if self.bar is None:
            self.start_step = event.step
            self.bar = Progress(
                "step",
                total=self.config.steps,
                initial=event.step,
                postfix={"loss": "-", "metric": "-", "ckpt": self.ckpt},
                file=self.file,
            )
        else:  # a restarted worker group resumed from the last commit
            self.bar.update_to(event.step, ckpt=self.ckpt)

    # docstring inherited
    def evaluated(self, event: Evaluated) -> None:
        if self.bar is not None:
            self.bar.update_to(
                event.step,
                loss=f"{event.loss:.4f}",
                metric=f"{event.metric_name} {event.metric:.4f}",
            )

    # docstring inherited
    def checkpointed(self, event: Checkpointed) -> None:
        self.ckpt = f"{short(event.id)}@{event.step}"
        if self.bar is not None:
            self.bar.update_to(max(self.bar.n, event.step), ckpt=self.ckpt)

    # docstring inherited
    def checkpoint_failed(self, event: CheckpointFailed) -> None:
        self.echo(f"checkpoint at step {event.step} failed: {event.error}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


COMMANDS = [train]
