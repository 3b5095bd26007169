"""What runs in the ``tlreg train`` process: train a branch on Ray Train.

:func:`train` records a Run in the registry, starts or joins Ray, runs a ``TorchTrainer``
over :func:`~tlreg.training.worker.worker_loop`, relays rank 0's progress events from a Ray
queue into a :class:`TrainSummary` and ``on_event``, and marks the Run succeeded, failed or
stopped (SIGTERM: ``ray job stop``, a scheduler's time limit; SIGINT: Ctrl-C). Before Ray
starts it checks what it can (:mod:`~tlreg.training.preflight`) and takes the branch's lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlreg.registry import Registry
from tlreg.registry.leases import LeaseKeeper
from tlreg.storage_backends.credentials import without_password
from tlreg.training.config import TrainConfig
from tlreg.training.errors import RunFailed, RunStopped
from tlreg.training.events import (
    Checkpointed,
    CheckpointFailed,
    Evaluated,
    ProgressEvent,
    ProgressListener,
    RayStarted,
    RayStarting,
    Restored,
    event_json,
)
from tlreg.training.jobs import current_submission_id
from tlreg.training.preflight import preflight
from tlreg.training.worker import worker_loop


@dataclass(slots=True)
class TrainSummary(ProgressListener):
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
    restored_tier: str | None = None
    """With a local tier: where the last restore read from ("local", "shared", "local+shared")."""
    lost: list[str] = field(default_factory=list)
    """Checkpoints marked lost (local-only on a node that is gone) by the run's restores."""
    restores: int = 0
    """Restores of the worker group: 1, plus one per restart after a failure."""
    evals: list[Evaluated] = field(default_factory=list)
    checkpoints: list[Checkpointed] = field(default_factory=list)
    checkpoint_errors: list[CheckpointFailed] = field(default_factory=list)
    wall_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (events as :func:`event_json` writes them)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("evals", "checkpoints", "checkpoint_errors"):
            doc[name] = [event_json(e) for e in doc[name]]
        return doc

    def first_step_reaching(self, target: float) -> tuple[int, float] | None:
        """(step, seconds since training started) of the first eval with metric >= target."""
        for e in self.evals:
            if e.metric >= target:
                return e.step, e.elapsed_s
        return None

    # docstring inherited
    def restored(self, event: Restored) -> None:
        self.start_step = event.step
        self.resumed_from = event.checkpoint if event.resumed else None
        self.transferred_from = None if event.resumed else event.checkpoint
        self.transferred = list(event.transferred)
        self.skipped = list(event.skipped)
        self.frozen = list(event.frozen)
        self.matched_layers = event.matched_layers
        self.restored_tier = event.tier
        self.lost += [c for c in event.lost if c not in self.lost]
        self.restores += 1
        # A restarted worker group replays from the last commit: drop what it will redo.
        self.evals = [e for e in self.evals if e.step <= event.step]

    # docstring inherited
    def evaluated(self, event: Evaluated) -> None:
        self.evals.append(event)
        self.final_step = max(self.final_step, event.step)

    # docstring inherited
    def checkpointed(self, event: Checkpointed) -> None:
        self.checkpoints.append(event)

    # docstring inherited
    def checkpoint_failed(self, event: CheckpointFailed) -> None:
        self.checkpoint_errors.append(event)


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def root_cause(error: BaseException) -> str:
    """One line naming what went wrong. Ray wraps worker failures in a group error whose
    first line says only that workers failed; the cause is the last exception line of the
    worker tracebacks it carries."""
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines()]
    causes = [line for line in lines if _ERROR_LINE.match(line)]
    return causes[-1] if causes else lines[0]


def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The config as stored on the Run row: the registry and store URLs with their
    passwords masked (credentials never go into the registry)."""
    doc = dataclasses.asdict(config)
    doc["registry_url"] = without_password(config.registry_url, mask=True)
    doc["store_url"] = without_password(config.store_url, mask=True)
    doc["freeze"] = list(config.freeze)
    return doc


def _ensure_ray(num_cpus: int) -> None:
    import ray

    # Without it every ray.train.report waits for the controller's next poll (see
    # docs/performance.md, "Ray Train's report interval").
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
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> TrainSummary:
    """Run ``config`` on Ray Train and return a summary; raises :class:`RunFailed` on error
    and :class:`RunStopped` when SIGINT (Ctrl-C) or SIGTERM stopped it.

    Before Ray starts, :func:`~tlreg.training.preflight.preflight` checks what it can (the
    task, the branch, its lease, the target step, the ``--freeze`` globs, a probe write to
    the store), and the branch's lease is taken with the Run row: a second run on the branch
    is refused, naming this one, until this one ends. ``storage_path`` is Ray Train's run
    directory (small result files only; tlreg writes the checkpoints). ``on_event``
    receives the progress events as they happen (e.g. a
    :class:`~tlreg.training.events.ProgressListener`'s ``on_event``).
    """
    registry = Registry(config.registry_url)
    try:
        preflight(config, registry)
        # Under `tlreg submit` or `ray job submit` the Run row names the Ray job.
        run, lease = registry.start_leased_run(
            config.branch, recorded_config(config), ray_job_id=current_submission_id()
        )
        summary = TrainSummary(branch=config.branch, run_id=run.id, status="running")
        stopped = _Stopped()
        keeper = LeaseKeeper(registry, lease).start()
        try:
            try:
                _fit(config, run.id, Path(storage_path), summary, on_event, stopped)
            except KeyboardInterrupt:  # Ctrl-C before the handler was in place (ray.init)
                stopped.set(signal.SIGINT)
            except Exception as e:
                if not stopped.is_set():
                    summary.status = "failed"
                    summary.error = _failure_cause(config, summary, e)
                    # The Run row keeps the whole report (worker tracebacks included), bounded.
                    error = f"{summary.error}\n{type(e).__name__}: {e}"[:8000]
                    registry.finish_run(run.id, status="failed", error=error)
                    raise RunFailed(
                        f"training branch {config.branch!r} failed (run {run.id}): {summary.error}"
                    ) from e
            if stopped.is_set():
                summary.status = "stopped"
                [mine] = [r for r in registry.runs(config.branch) if r.id == run.id]
                if mine.status == "running":  # the handler could not write it
                    registry.finish_run(run.id, status="stopped", error=_stopped_by(stopped.signum))
                raise RunStopped(_stopped_message(config, registry, run.id, stopped.signum))
            summary.status = "succeeded"
            registry.finish_run(run.id, status="succeeded")
            return summary
        finally:
            keeper.stop()
    finally:
        registry.close()


def _failure_cause(config: TrainConfig, summary: TrainSummary, error: BaseException) -> str:
    """One line: a checkpoint that failed and stopped the run, or the root cause."""
    if summary.checkpoint_errors and config.on_checkpoint_error == "stop":
        failed = summary.checkpoint_errors[0]
        return (
            f"checkpoint at step {failed.step} failed: {failed.error}; the run stopped there "
            "(--on-checkpoint-error continue trains on regardless)"
        )
    return root_cause(error)


def resume_command(config: TrainConfig, registry: Registry) -> str:
    """The command that resumes ``config``'s branch to its target step (the branch remembers
    its task and how it was trained; only a task it lacks is repeated)."""
    argv = ["tlreg", "train", config.branch, "--steps", str(config.steps)]
    if registry.get_branch(config.branch).task != config.task:
        argv += ["--task", config.task]
    return shlex.join(argv)


def _stopped_message(config: TrainConfig, registry: Registry, run_id: int, signum: int) -> str:
    head_id = registry.get_branch(config.branch).head
    head = registry.resolve(head_id) if head_id else None
    if head is not None and head.branch == config.branch:
        kept = f"last committed checkpoint {head.id[:12]} at step {head.step}"
    else:
        kept = "no checkpoint committed on it yet"
    return (
        f"training branch {config.branch!r} was stopped by {signal.Signals(signum).name} "
        f"(run {run_id}); {kept}; resume with: {resume_command(config, registry)}"
    )


def _stopped_by(signum: int) -> str:
    """The ``error`` of a Run stopped by signal ``signum``."""
    return f"stopped by {signal.Signals(signum).name}"


class _Stopped:
    """Whether (and by which signal) the run was stopped."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum = signal.SIGTERM.value

    def set(self, signum: int) -> None:
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class _Terminated(BaseException):
    """Raised in the main thread by the handler of :func:`_stop_on_signals` (not an
    Exception, so that no ``except Exception`` on the way swallows it)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""SIGTERM: ``ray job stop``, a scheduler's time limit; SIGINT: Ctrl-C."""


@contextlib.contextmanager
def _stop_on_signals(registry_url: str, run_id: int, stopped: _Stopped) -> Iterator[None]:
    """While training, SIGTERM (what ``ray job stop`` and batch schedulers send first) or
    SIGINT (Ctrl-C) marks the Run "stopped" and unwinds the driver; Ray then ends the job's
    workers. The row is written in the handler, through a registry of its own, because the
    sender may follow up with SIGKILL within seconds (``ray job stop``: 3 s). Enter it after
    ``ray.init``, which installs handlers of its own. Off the main thread (no signal
    handlers there) it does nothing. ``stopped`` says when it happened, and by which signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        if stopped.is_set():
            return
        stopped.set(signum)
        with contextlib.suppress(Exception), Registry(registry_url) as registry:
            registry.finish_run(run_id, status="stopped", error=_stopped_by(signum))
        raise _Terminated

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    except _Terminated:
        pass  # the caller sees ``stopped`` set
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fit(
    config: TrainConfig,
    run_id: int,
    storage_path: Path,
    summary: TrainSummary,
    on_event: Callable[[ProgressEvent], None] | None,
    stopped: _Stopped,
) -> None:
    def emit(event: ProgressEvent) -> None:
        summary.on_event(event)
        if on_event is not None:
            on_event(event)

    started = time.perf_counter()
    emit(RayStarting(joining=bool(os.environ.get("RAY_ADDRESS"))))
    _ensure_ray(max(2, config.workers))
    emit(RayStarted(elapsed_s=time.perf_counter() - started, workers=config.workers))
    with _stop_on_signals(config.registry_url, run_id, stopped):
        try:
            _fit_on_ray(config, run_id, storage_path, summary, on_event)
        finally:
            if config.local_tier is not None:
                _mark_lost_nodes(config, summary)


def _mark_lost_nodes(config: TrainConfig, summary: TrainSummary) -> None:
    """Mark lost the local-only checkpoints on nodes Ray reports dead by the run's end (a
    restart may have come before Ray saw the node go: it resumed from what the ranks could
    read, and left the marking to here)."""
    from tlreg.training.worker import dead_ray_nodes

    try:
        dead = dead_ray_nodes()
        if not dead:
            return
        with Registry(config.registry_url) as registry:
            lost = registry.mark_nodes_lost(dead)
    except Exception:  # the next run's restore marks them as well
        return
    summary.lost += [c.id for c in lost if c.id not in summary.lost]


def _fit_on_ray(
    config: TrainConfig,
    run_id: int,
    storage_path: Path,
    summary: TrainSummary,
    on_event: Callable[[ProgressEvent], None] | None,
) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The queue lives on the driver's node, as Ray Train's controller does: losing another
    # node (and the ranks on it) must not lose the run's events.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events: Queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
        summary.on_event(event)
        if on_event is not None:
            on_event(event)
    thread.join()
    summary.wall_s = time.perf_counter() - started
    if "error" in outcome:
        raise outcome["error"]
