"""The per-rank train loop that Ray Train runs in each worker process.

Each worker restores the branch head: on its own branch that is a resume (model,
optimizer, RNG, step); on a new branch it is a transfer from the ancestor (matching model
tensors, minus the task's reset globs). It then applies the freeze policy, trains with DDP
and checkpoints through tlreg every N steps; rank 0 reports progress events to the driver.
Only tlreg writes checkpoints; Ray's own checkpoint upload is never used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tlreg.ckpt import PendingSave
from tlreg.registry import Registry
from tlreg.registry.metrics import MetricsBacklog
from tlreg.training.config import TrainConfig
from tlreg.training.errors import TrainingError
from tlreg.training.events import Checkpointed, CheckpointFailed, Evaluated, ProgressEvent, Restored
from tlreg.training.freeze import apply_freeze, param_groups
from tlreg.training.task import load_task

Emit = Callable[[ProgressEvent], None]


class CheckpointCommitError(TrainingError, RuntimeError):
    """A checkpoint failed to commit and the run's ``on_checkpoint_error`` is "stop"."""


def worker_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train (one process per rank).

    ``loop_config`` holds the :class:`TrainConfig` as a dict (``"config"``), the Run's id
    (``"run_id"``) and the Ray queue that takes rank 0's progress events (``"events"``).
    """
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from tlreg.training.checkpointer import Checkpointer

    config = TrainConfig(**loop_config["config"])
    events = loop_config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    emit: Emit = events.put if rank == 0 else (lambda _e: None)

    task = load_task(config.task)
    (x_train, y_train), (x_val, y_val) = task.datasets()
    model = task.build_model(config.seed)
    frozen = apply_freeze(model, config.freeze)
    optimizer = torch.optim.Adam(param_groups(model, config, task.reset))

    registry = Registry(config.registry_url)
    ckpt = Checkpointer(
        config.branch,
        registry=registry,
        store=config.store_url,
        lazy=config.lazy,
        run_id=loop_config["run_id"],
        # All ranks write a share of every checkpoint (no rank-0 straggler).
        process_group=dist.group.WORLD if world > 1 else None,
        local_tier=config.local_tier,
        persist_every=config.persist_every,
        local_keep=config.local_keep,
        drain_bytes_per_s=config.drain_bytes_per_s,
    )
    lost: tuple[str, ...] = ()
    if rank == 0:
        registry.record_run_nodes(loop_config["run_id"], dict(enumerate(ckpt.nodes)))
        chosen = registry.get_branch(config.branch).head
        if config.local_tier is not None:
            # a node that is gone took its local-only checkpoints with it: never serve them
            lost = tuple(c.id for c in registry.mark_nodes_lost(dead_ray_nodes()))
            chosen = restore_target(registry, config.branch, ckpt.nodes) or chosen
    # Every rank must restore the same checkpoint: rank 0 picks it, the others follow.
    head = _broadcast_str(chosen if rank == 0 else None, rank)
    extra: dict[str, Any] = {}
    record = ckpt.restore(
        checkpoint=head, model=model, optimizer=optimizer, extra=extra, reset=task.reset
    )
    report = ckpt.last_restore
    start_step = record.step if (record is not None and report.resumed) else 0
    emit(
        Restored(
            step=start_step,
            checkpoint=record.id if record else None,
            resumed=report.resumed,
            transferred=tuple(report.transferred),
            skipped=tuple(report.skipped),
            frozen=tuple(frozen),
            matched_layers=report.matched_layers,
            tier=report.tier,
            lost=lost,
        )
    )

    # A checkpoint that fails stops the run on rank 0, which commits (the others follow it
    # into Ray Train's teardown), unless the user asked to train on regardless.
    stop = config.on_checkpoint_error == "stop" and rank == 0
    ddp_model = prepare_model(model) if world > 1 else model
    # Rank 0 records every evaluation in the registry (the curves of 'tlreg compare/plot').
    curve = MetricsBacklog(loop_config["run_id"])
    started = time.perf_counter()
    pending: list[tuple[int, PendingSave, float]] = []
    last_committed: str | None = record.id if record else None
    loss_value = float("nan")
    for step in range(start_step + 1, config.steps + 1):
        # Batches depend only on (seed, step): a resumed run sees the same data it would have.
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        order = torch.randint(len(x_train), (config.batch_size * world,), generator=g)
        idx = order[rank * config.batch_size : (rank + 1) * config.batch_size]
        ddp_model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(ddp_model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())

        metrics: dict[str, float] = {"loss": loss_value}
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            with torch.no_grad():
                metrics[task.metric_name] = task.metric(model(x_val), y_val)
            model.train()
            if rank == 0:
                curve.add(step, metrics, elapsed_s=time.perf_counter() - started)
                curve.flush(registry)  # kept for the next flush while the registry is down
            emit(
                Evaluated(
                    step=step,
                    loss=loss_value,
                    metric=metrics[task.metric_name],
                    metric_name=task.metric_name,
                    elapsed_s=time.perf_counter() - started,
                    checkpoint=last_committed,
                )
            )
        if step % config.checkpoint_every == 0 or step == config.steps:
            t0 = time.perf_counter()
            p = ckpt.save(
                step,
                metrics=metrics,
                persist=config.persists(step),
                model=model,
                optimizer=optimizer,
                extra={"step": step, "task": config.task, "seed": config.seed},
            )
            pending.append((step, p, (time.perf_counter() - t0) * 1e3))
            last_committed = _drain(pending, emit, stop=stop) or last_committed
        ray.train.report({"step": step, **metrics, "checkpoint": last_committed})
    for _step, p, _stall in pending:
        p.committed.exception()  # wait; errors are reported as events (rank 0)
    _drain(pending, emit, stop=stop)
    curve.flush(registry)
    ckpt.close()
    registry.close()
    if world > 1:
        dist.barrier()


def _drain(
    pending: list[tuple[int, PendingSave, float]], emit: Emit, *, stop: bool = False
) -> str | None:
    """Emit events for finished saves (in order) and return the newest committed id; with
    ``stop``, a failed save raises CheckpointCommitError once its event is out."""
    newest = None
    while pending and pending[0][1].committed.done():
        step, p, stall_ms = pending.pop(0)
        error = p.error()  # seen here: reported as an event, not again at close
        if error is None:
            newest = p.committed.result()
            emit(
                Checkpointed(
                    step=step,
                    id=newest,
                    stall_ms=stall_ms,
                    new_bytes=p.stats.new_bytes,
                    logical_bytes=p.stats.logical_bytes,
                )
            )
        else:
            message = (str(error).strip().splitlines() or [type(error).__name__])[0]
            emit(CheckpointFailed(step=step, error=message))
            if stop:
                raise CheckpointCommitError(f"checkpoint at step {step} failed: {message}")
    return newest


def restore_target(registry: Registry, branch: str, nodes: Sequence[str]) -> str | None:
    """The checkpoint a run with ranks on ``nodes`` resumes ``branch`` from: the restorable
    head (the newest not lost), unless it is local-only with a share on a node no rank runs
    on now (a node just gone that Ray does not report dead yet, or one the group left): then
    the newest checkpoint on the branch's line that is shared or local to these nodes."""
    newest = registry.restorable_head(branch)
    if newest is None or newest.tier != "local" or set(newest.nodes) <= set(nodes):
        return newest.id if newest is not None else None
    for record in registry.log(branch):
        if record.pruned is None and (
            record.tier == "shared" or (record.tier == "local" and set(record.nodes) <= set(nodes))
        ):
            return record.id
    return newest.id


def dead_ray_nodes() -> list[str]:
    """Ids of the Ray cluster's nodes that are gone (removed, crashed, lost their raylet)."""
    import ray

    return [str(n["NodeID"]) for n in ray.nodes() if not n.get("Alive", False)]


def _broadcast_str(value: str | None, rank: int) -> str | None:
    """Broadcast a short string from rank 0 as a tensor (no pickling between ranks)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    buf = torch.zeros(129, dtype=torch.uint8)
    if rank == 0 and value is not None:
        raw = value.encode()
        buf[0] = 1
        buf[1 : 1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    if not buf[0]:
        return None
    return bytes(buf[1:].tolist()).rstrip(b"\0").decode()
