"""Train a branch on Ray Train: restore, freeze, train with DDP, checkpoint through tlreg.

The driver (``train``) records a Run in the registry, starts a ``TorchTrainer`` and relays
progress events from rank 0 through a Ray queue. Each worker restores the branch head: on
its own branch that is a resume (model, optimizer, RNG, step); on a new branch it is a
transfer from the ancestor (matching model tensors, minus the task's reset globs).
Only tlreg writes checkpoints; Ray's own checkpoint upload is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlreg.registry import Registry
from tlreg.training.errors import ConfigError, RunFailed, RunStopped
from tlreg.training.jobs import current_submission_id
from tlreg.training.task import load_task

Event = dict[str, Any]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One training run of one branch; everything a worker needs, JSON-serialisable."""

    branch: str
    """Registry branch to restore from and commit to."""
    task: str
    """``MODULE:ATTR`` naming a :class:`~tlreg.training.task.Task`."""
    registry_url: str
    """Registry every worker commits to (rank 0) and reads from."""
    store_url: str
    """Object store every worker reads from and writes to."""
    workers: int = 2
    """Ray Train workers (DDP ranks, gloo on CPU)."""
    steps: int = 200
    """Train until this branch step (a resumed run continues from its last checkpoint)."""
    checkpoint_every: int = 50
    """Checkpoint every N steps, and at the last step."""
    eval_every: int = 10
    """Evaluate the validation metric every N steps (rank 0)."""
    freeze: tuple[str, ...] = ()
    """Globs of parameter names that do not train (feature extraction)."""
    lr: float = 1e-3
    """Adam learning rate."""
    backbone_lr_mult: float = 1.0
    """Learning-rate multiplier for the backbone: every trainable parameter outside the
    task's ``reset`` globs (full fine-tuning with a gentler backbone, e.g. 0.1)."""
    batch_size: int = 32
    """Examples per rank per step."""
    seed: int = 0
    """Seed for model initialisation and batch order."""
    lazy: bool = False
    """Lazy checkpoint staging (the copy overlaps the next forward/backward)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do; each resumes from the last commit."""

    def __post_init__(self) -> None:
        # Each rule is checked here once so that workers never start with a bad config.
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.backbone_lr_mult < 0:
            raise ConfigError(f"--backbone-lr-mult must be >= 0, got {self.backbone_lr_mult}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        self.freeze = tuple(self.freeze)


@dataclass(slots=True)
class TrainSummary:
    """What a run did, assembled from rank 0's events."""

    branch: str
    run_id: int
    status: str
    start_step: int = 0
    final_step: int = 0
    resumed_from: str | None = None
    transferred_from: str | None = None
    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    matched_layers: int | None = None
    evals: list[Event] = field(default_factory=list)
    checkpoints: list[Event] = field(default_factory=list)
    checkpoint_errors: list[Event] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    def first_step_reaching(self, target: float) -> tuple[int, float] | None:
        """(step, seconds since training started) of the first eval with metric >= target."""
        for e in self.evals:
            if e["metric"] >= target:
                return int(e["step"]), float(e["elapsed_s"])
        return None


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def root_cause(error: BaseException) -> str:
    """One line naming what went wrong. Ray wraps worker failures in a group error whose
    first line says only that workers failed; the cause is the last exception line of the
    worker tracebacks it carries."""
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines()]
    causes = [line for line in lines if _ERROR_LINE.match(line)]
    return causes[-1] if causes else lines[0]


def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The config as stored on the Run row: URLs without passwords (credentials never go
    into the registry)."""
    from sqlalchemy.engine import make_url

    doc = dataclasses.asdict(config)
    doc["registry_url"] = make_url(config.registry_url).render_as_string(hide_password=True)
    doc["freeze"] = list(config.freeze)
    return doc


def _ensure_ray(num_cpus: int) -> None:
    import ray

    # Without this every ray.train.report waits ~2 s for the controller's next poll.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` or pointed at a cluster: join it.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def train(
    config: TrainConfig,
    *,
    storage_path: str | os.PathLike[str],
    on_event: Callable[[Event], None] | None = None,
) -> TrainSummary:
    """Run ``config`` on Ray Train and return a summary; raises :class:`RunFailed` on error.

    ``storage_path`` is Ray Train's run directory (small result files only; tlreg writes
    the checkpoints). ``on_event`` receives rank 0's progress events as they happen.
    """
    load_task(config.task)  # fail before starting Ray on a bad --task
    registry = Registry(config.registry_url)
    try:
        registry.get_branch(config.branch)
        # Under `tlreg submit` or `ray job submit` the Run row names the Ray job.
        run = registry.start_run(
            config.branch, recorded_config(config), ray_job_id=current_submission_id()
        )
        summary = TrainSummary(branch=config.branch, run_id=run.id, status="running")
        stopped = threading.Event()
        try:
            _fit(config, run.id, Path(storage_path), summary, on_event, stopped)
        except Exception as e:
            if not stopped.is_set():
                summary.status = "failed"
                summary.error = root_cause(e)
                # The Run row keeps the whole report (worker tracebacks included), bounded.
                error = f"{type(e).__name__}: {e}"[:8000]
                registry.finish_run(run.id, status="failed", error=error)
                raise RunFailed(
                    f"training branch {config.branch!r} failed (run {run.id}): {summary.error}"
                ) from e
        if stopped.is_set():
            summary.status = "stopped"
            [mine] = [r for r in registry.runs(config.branch) if r.id == run.id]
            if mine.status == "running":  # the handler could not write it
                registry.finish_run(run.id, status="stopped", error=_stopped_by(signal.SIGTERM))
            raise RunStopped(
                f"training branch {config.branch!r} was stopped by SIGTERM (run {run.id}); "
                f"its last committed checkpoint is the head of {config.branch!r}"
            )
        summary.status = "succeeded"
        registry.finish_run(run.id, status="succeeded")
        return summary
    finally:
        registry.close()


def _stopped_by(signum: int) -> str:
    """The ``error`` of a Run stopped by signal ``signum``."""
    return f"stopped by signal {signum}"


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler of :func:`_stop_on_sigterm` (not an
    Exception, so that no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def _stop_on_sigterm(registry_url: str, run_id: int, stopped: threading.Event) -> Iterator[None]:
    """While training, a SIGTERM (what ``ray job stop`` and batch schedulers send first)
    marks the Run "stopped" and unwinds the driver; Ray then ends the job's workers. The row
    is written in the handler, through a registry of its own, because the sender may follow
    up with SIGKILL within seconds (``ray job stop``: 3 s). Enter it after ``ray.init``,
    which installs a SIGTERM handler of its own. Off the main thread (no signal handlers
    there) it does nothing. ``stopped`` is set when it happened."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, _frame: Any) -> None:
        if stopped.is_set():
            return
        stopped.set()
        with contextlib.suppress(Exception), Registry(registry_url) as registry:
            registry.finish_run(run_id, status="stopped", error=_stopped_by(signum))
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except _Terminated:
        pass  # the caller sees ``stopped`` set
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit(
    config: TrainConfig,
    run_id: int,
    storage_path: Path,
    summary: TrainSummary,
    on_event: Callable[[Event], None] | None,
    stopped: threading.Event,
) -> None:
    _ensure_ray(max(2, config.workers))
    with _stop_on_sigterm(config.registry_url, run_id, stopped):
        _fit_on_ray(config, run_id, storage_path, summary, on_event)


def _fit_on_ray(
    config: TrainConfig,
    run_id: int,
    storage_path: Path,
    summary: TrainSummary,
    on_event: Callable[[Event], None] | None,
) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    events: Queue = Queue()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": dataclasses.asdict(config),
            "run_id": run_id,
            "events": events,
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=f"tlreg-run-{run_id}",
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:
            outcome["error"] = e

    started = time.perf_counter()
    thread = threading.Thread(target=fit, name="tlreg-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not events.empty():
        try:
            event = events.get(timeout=0.2)
        except Exception:  # queue.Empty from the actor
            continue
        _apply_event(summary, event)
        if on_event is not None:
            on_event(event)
    thread.join()
    summary.wall_s = time.perf_counter() - started
    if "error" in outcome:
        raise outcome["error"]


def _apply_event(summary: TrainSummary, event: Event) -> None:
    kind = event["type"]
    if kind == "restore":
        summary.start_step = event["step"]
        summary.resumed_from = event["checkpoint"] if event["resumed"] else None
        summary.transferred_from = None if event["resumed"] else event["checkpoint"]
        summary.transferred = list(event["transferred"])
        summary.skipped = list(event["skipped"])
        summary.frozen = list(event["frozen"])
        summary.matched_layers = event["matched_layers"]
        # A restarted worker group replays from the last commit: drop what it will redo.
        summary.evals = [e for e in summary.evals if e["step"] <= event["step"]]
    elif kind == "eval":
        summary.evals.append(event)
        summary.final_step = max(summary.final_step, event["step"])
    elif kind == "checkpoint":
        summary.checkpoints.append(event)
    elif kind == "checkpoint_failed":
        summary.checkpoint_errors.append(event)


def param_groups(
    model: torch.nn.Module, config: TrainConfig, head: tuple[str, ...] | list[str]
) -> list[dict[str, Any]]:
    """Optimizer groups: the head at ``lr``, the backbone at ``lr * backbone_lr_mult``."""
    from tlreg.training.checkpointer import matches_any

    groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[matches_any(name, head)].append(param)
    if not groups[True] and not groups[False]:
        raise ConfigError(f"--freeze {list(config.freeze)} froze every parameter: nothing to train")
    out = [{"params": groups[True], "lr": config.lr}] if groups[True] else []
    if groups[False]:
        out.append({"params": groups[False], "lr": config.lr * config.backbone_lr_mult})
    return out


def worker_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train (one process per rank)."""
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from tlreg.training.checkpointer import Checkpointer, matches_any

    config = TrainConfig(**loop_config["config"])
    events = loop_config["events"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    emit = events.put if rank == 0 else (lambda _e: None)

    task = load_task(config.task)
    (x_train, y_train), (x_val, y_val) = task.datasets()
    model = task.build_model(config.seed)
    frozen = [n for n, p in model.named_parameters() if matches_any(n, config.freeze)]
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
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
    )
    if config.lazy:
        ckpt.attach_optimizer(optimizer)
    # Every rank must restore the same checkpoint: rank 0 picks it, the others follow.
    head = _broadcast_str(registry.get_branch(config.branch).head if rank == 0 else None, rank)
    extra: dict[str, Any] = {}
    record = ckpt.restore(
        checkpoint=head, model=model, optimizer=optimizer, extra=extra, reset=task.reset
    )
    report = ckpt.last_restore
    start_step = record.step if (record is not None and report.resumed) else 0
    emit(
        {
            "type": "restore",
            "step": start_step,
            "checkpoint": record.id if record else None,
            "resumed": report.resumed,
            "transferred": report.transferred,
            "skipped": report.skipped,
            "frozen": frozen,
            "matched_layers": report.matched_layers,
        }
    )

    ddp_model = prepare_model(model) if world > 1 else model
    started = time.perf_counter()
    pending = []
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
            emit(
                {
                    "type": "eval",
                    "step": step,
                    "loss": loss_value,
                    "metric": metrics[task.metric_name],
                    "metric_name": task.metric_name,
                    "elapsed_s": time.perf_counter() - started,
                    "checkpoint": last_committed,
                }
            )
        if step % config.checkpoint_every == 0 or step == config.steps:
            t0 = time.perf_counter()
            p = ckpt.save(
                step,
                metrics=metrics,
                model=model,
                optimizer=optimizer,
                extra={"step": step, "task": config.task, "seed": config.seed},
            )
            pending.append((step, p, (time.perf_counter() - t0) * 1e3))
            last_committed = _drain(pending, emit) or last_committed
        ray.train.report({"step": step, **metrics, "checkpoint": last_committed})
    for _step, p, _stall in pending:
        p.committed.exception()  # wait; errors are reported as events (rank 0)
    _drain(pending, emit)
    ckpt.close()
    registry.close()
    if world > 1:
        dist.barrier()


def _drain(pending: list[Any], emit: Callable[[Event], None]) -> str | None:
    """Emit events for finished saves (in order) and return the newest committed id."""
    newest = None
    while pending and pending[0][1].committed.done():
        step, p, stall_ms = pending.pop(0)
        error = p.committed.exception()
        if error is None:
            newest = p.committed.result()
            emit(
                {
                    "type": "checkpoint",
                    "step": step,
                    "id": newest,
                    "stall_ms": stall_ms,
                    "new_bytes": p.stats.new_bytes,
                    "logical_bytes": p.stats.logical_bytes,
                }
            )
        else:
            emit({"type": "checkpoint_failed", "step": step, "error": str(error)})
    return newest


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
