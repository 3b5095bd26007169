"""``tlreg train``: train a branch on Ray Train, checkpointing through tlreg."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import click

from tlreg.cli.common import Env, echo_json, fmt_bytes, json_option, pass_env, short
from tlreg.training import TrainConfig
from tlreg.training import train as run_training
from tlreg.training.errors import ConfigError


@click.command()
@click.argument("branch")
@click.option("--task", help="MODULE:ATTR of the task (default: the branch's task).")
@click.option("--workers", default=2, show_default=True, help="Ray Train workers (DDP ranks).")
@click.option("--steps", default=200, show_default=True, help="Train until this branch step.")
@click.option("--checkpoint-every", default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--eval-every", default=10, show_default=True, help="Evaluate every N steps.")
@click.option(
    "--freeze", multiple=True, metavar="GLOB", help="Freeze matching parameters (repeatable)."
)
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--backbone-lr-mult",
    default=1.0,
    show_default=True,
    help="Learning-rate multiplier for everything but the task's head (fine-tuning).",
)
@click.option("--batch-size", default=32, show_default=True, help="Examples per worker per step.")
@click.option("--seed", default=0, show_default=True, help="Seed for initialisation and batches.")
@click.option("--lazy", is_flag=True, help="Lazy checkpoint staging (overlaps the next step).")
@click.option("--max-failures", default=0, show_default=True, help="Worker-group restarts allowed.")
@json_option
@pass_env
def train(
    env: Env,
    branch: str,
    task: str | None,
    workers: int,
    steps: int,
    checkpoint_every: int,
    eval_every: int,
    freeze: tuple[str, ...],
    lr: float,
    backbone_lr_mult: float,
    batch_size: int,
    seed: int,
    lazy: bool,
    max_failures: int,
    as_json: bool,
) -> None:
    """Train BRANCH from its head with N Ray workers.

    Example: tlreg train upper-head --steps 200 --freeze 'features.*'
    """
    b = env.registry.get_branch(branch)
    task = task or b.task
    if not task:
        raise ConfigError(f"branch {branch!r} has no task: pass --task MODULE:ATTR")
    config = TrainConfig(
        branch=branch,
        task=task,
        registry_url=env.settings.registry_url,
        store_url=env.settings.store_url,
        workers=workers,
        steps=steps,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        freeze=freeze,
        lr=lr,
        backbone_lr_mult=backbone_lr_mult,
        batch_size=batch_size,
        seed=seed,
        lazy=lazy,
        max_failures=max_failures,
    )
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
        new = sum(c["new_bytes"] for c in summary.checkpoints)
        click.echo(
            f"  {len(summary.checkpoints)} checkpoints, "
            f"head {short(summary.checkpoints[-1]['id'])}, "
            f"{fmt_bytes(new)} new bytes"
        )
    for failed in summary.checkpoint_errors:
        click.echo(f"  checkpoint at step {failed['step']} failed: {failed['error']}", err=True)


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


class _Progress:
    """One live line on a terminal, one line per event otherwise."""

    def __init__(self, *, err: bool) -> None:
        self.err = err
        self.tty = (sys.stderr if err else sys.stdout).isatty()
        self.last_ckpt: str | None = None
        self.stall_ms = 0.0

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "restore":
            if event["checkpoint"] is None:
                self.echo("starting from scratch (empty branch)")
            elif event["resumed"]:
                self.echo(f"resuming from {short(event['checkpoint'])} at step {event['step']}")
            else:
                self.echo(
                    f"transferring from {short(event['checkpoint'])}: "
                    f"{len(event['transferred'])} tensors loaded, "
                    f"{len(event['skipped'])} re-initialised, {len(event['frozen'])} frozen"
                )
        elif kind == "checkpoint":
            self.last_ckpt, self.stall_ms = event["id"], event["stall_ms"]
        elif kind == "eval":
            line = (
                f"step {event['step']:>5}  loss {event['loss']:.4f}  "
                f"{event['metric_name']} {event['metric']:.4f}  "
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
