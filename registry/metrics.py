"""Evaluation curves (schema v5): every evaluation a run makes, as (run, metric, step, value,
wall time), and the queries that turn them into a branch's curve and a run's summary.

A checkpoint row keeps the metrics of its own step only; the curve between checkpoints lives
here. Points belong to runs (``Registry.start_run``); a branch's curve joins the curves of its
runs in order: when a later run resumes from an earlier checkpoint, the steps it re-ran
replace the earlier run's, as a resumed training's history would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from tlreg.registry import models as m
from tlreg.registry.engine import Database
from tlreg.registry.errors import RegistryUnavailable, RunNotFound
from tlreg.registry.records import CheckpointRecord, Run, from_row, utc
from tlreg.registry.refs import branch_row, records, run_nodes, unstorable

MAX_METRIC_NAME = 200
"""Longest metric name accepted (characters)."""


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One evaluation: ``metric`` was ``value`` at ``step`` of run ``run_id``."""

    run_id: int
    metric: str
    step: int
    value: float
    """NaN and infinities round-trip."""
    wall_time: datetime
    """When it was logged, timezone-aware UTC."""
    elapsed_s: float | None
    """Training seconds since the run's first step (start-up excluded), if the logger knew
    them. In a branch's curve (:meth:`Metrics.metric_series`), seconds since the branch's
    first run began training: earlier runs' training time is added."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``wall_time`` as ISO-8601, a non-finite value as a string)."""
        return {
            "run_id": self.run_id,
            "metric": self.metric,
            "step": self.step,
            "value": _json_float(self.value),
            "wall_time": self.wall_time.isoformat(),
            "elapsed_s": self.elapsed_s,
        }


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run and what it did: its last step, its final metrics and its checkpoints."""

    run: Run
    steps: int | None
    """The last step it evaluated or checkpointed; None if it did neither."""
    final: dict[str, float] = field(hash=False)
    """Each metric's value at its last evaluated step."""
    checkpoints: int
    """Checkpoints it committed."""
    kept: int
    """Of those, how many garbage collection has not pruned."""

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to finish; None while it is running."""
        if self.run.finished is None:
            return None
        return (self.run.finished - self.run.created).total_seconds()

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: the run's fields plus steps, final, checkpoints, kept and
        duration_s."""
        return {
            **self.run.to_json(),
            "duration_s": self.duration_s,
            "steps": self.steps,
            "final": {k: _json_float(v) for k, v in self.final.items()},
            "checkpoints": self.checkpoints,
            "kept": self.kept,
        }


def _json_float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def validate_metric_name(name: object) -> str:
    """``name`` if it can name a metric: a non-empty string of at most MAX_METRIC_NAME
    characters without NUL (any other character, markup included, is stored as given and
    shown as text). Raises ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"metric names are strings, got {name!r}")
    if not name or len(name) > MAX_METRIC_NAME or unstorable(name):
        raise ValueError(
            f"metric name {name[:40]!r} is empty, longer than {MAX_METRIC_NAME} characters "
            "or holds a NUL character: name metrics like 'val_accuracy'"
        )
    return name


def _point(row: m.MetricPoint, offset: float = 0.0) -> MetricPoint:
    return MetricPoint(
        run_id=row.run_id,
        metric=row.metric,
        step=row.step,
        value=math.nan if row.value is None else float(row.value),
        wall_time=utc(row.wall_time),
        elapsed_s=None if row.elapsed_s is None else row.elapsed_s + offset,
    )


def join_runs(per_run: Iterable[Sequence[MetricPoint]]) -> list[MetricPoint]:
    """One curve from the curves of consecutive runs (oldest first), each sorted by step.

    A run that starts at step s supersedes every point of the earlier runs at steps >= s (it
    resumed from an earlier checkpoint and re-ran them). Elapsed seconds accumulate: a run's
    seconds start where the kept part of the runs before it ended.
    """
    kept: list[list[MetricPoint]] = []
    for points in per_run:
        if not points:
            continue
        first = points[0].step
        while kept and kept[-1] and kept[-1][0].step >= first:
            kept.pop()
        if kept:
            kept[-1] = [p for p in kept[-1] if p.step < first]
        kept.append(list(points))
    out: list[MetricPoint] = []
    offset = 0.0
    for points in kept:
        last = 0.0
        for p in points:
            if p.elapsed_s is None:
                out.append(p)
                continue
            last = p.elapsed_s
            out.append(
                MetricPoint(p.run_id, p.metric, p.step, p.value, p.wall_time, p.elapsed_s + offset)
            )
        offset += last
    return out


class Metrics(Database):
    """Evaluation curves: logging points and reading series and run summaries."""

    def log_metrics(
        self,
        run_id: int,
        step: int,
        values: Mapping[str, float],
        *,
        wall_time: datetime | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        """Record that at ``step`` of run ``run_id`` each metric in ``values`` had its value.

        One transaction; a step logged again replaces the earlier value. ``wall_time``
        defaults to now (it must be timezone-aware); ``elapsed_s`` is the training time since
        the run's first step, which ``tlreg compare`` reports as seconds to a target. Raises
        RunNotFound, and ValueError for a negative step or an invalid metric name (see
        :func:`validate_metric_name`) or value.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"a metric's step is an integer >= 0, got {step!r}")
        if wall_time is not None and wall_time.utcoffset() is None:
            raise ValueError("wall_time must be timezone-aware (e.g. datetime.now(timezone.utc))")
        rows = []
        when = wall_time or m.utcnow()
        for name, value in values.items():
            validate_metric_name(name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {name!r} has value {value!r}, not a number") from None
            rows.append(
                {
                    "run_id": run_id,
                    "metric": name,
                    "step": step,
                    "value": None if math.isnan(number) else number,
                    "wall_time": when,
                    "elapsed_s": elapsed_s,
                }
            )
        with self._session(write=True) as s:
            if s.get(m.Run, run_id) is None:
                raise RunNotFound(
                    f"run {run_id} does not exist: start one with Registry.start_run()"
                )
            if not rows:
                return
            stmt = self._insert(m.MetricPoint).values(rows)
            stmt = stmt.on_conflict_do_update(
                index_elements=["run_id", "metric", "step"],
                set_={
                    "value": stmt.excluded.value,
                    "wall_time": stmt.excluded.wall_time,
                    "elapsed_s": stmt.excluded.elapsed_s,
                },
            )
            s.exec(stmt)

    def run_metrics(self, run_id: int, metric: str | None = None) -> list[MetricPoint]:
        """The points of run ``run_id`` (of one ``metric``, or all), by metric then step.
        Raises RunNotFound."""
        with self._session() as s:
            if s.get(m.Run, run_id) is None:
                raise RunNotFound(f"run {run_id} does not exist: list runs with 'tlreg runs'")
            stmt = select(m.MetricPoint).where(m.MetricPoint.run_id == run_id)
            if metric is not None:
                stmt = stmt.where(m.MetricPoint.metric == metric)
            stmt = stmt.order_by(col(m.MetricPoint.metric), col(m.MetricPoint.step))
            return [_point(r) for r in s.exec(stmt).all()]

    def metric_series(self, branch: str, metric: str) -> list[MetricPoint]:
        """The curve of ``metric`` on ``branch``: its runs' points joined by
        :func:`join_runs`, sorted by step. Empty when the branch never logged it. Raises
        BranchNotFound."""
        with self._session() as s:
            branch_row(s, branch)
            return self._series(s, branch, metric)

    def metric_series_many(
        self, branches: Sequence[str], metric: str
    ) -> dict[str, list[MetricPoint]]:
        """:meth:`metric_series` of several branches, read in one transaction."""
        with self._session() as s:
            for b in branches:
                branch_row(s, b)
            return {b: self._series(s, b, metric) for b in branches}

    def _series(self, s: Session, branch: str, metric: str) -> list[MetricPoint]:
        if unstorable(metric):
            return []
        stmt = (
            select(m.MetricPoint)
            .join(m.Run, col(m.Run.id) == col(m.MetricPoint.run_id))
            .where(m.Run.branch == branch, m.MetricPoint.metric == metric)
            .order_by(col(m.MetricPoint.run_id), col(m.MetricPoint.step))
        )
        per_run: dict[int, list[MetricPoint]] = {}
        for row in s.exec(stmt).all():
            per_run.setdefault(row.run_id, []).append(_point(row))
        return join_runs(per_run.values())

    def metric_names(self, branch: str | None = None) -> list[str]:
        """The metric names logged (on ``branch``, or anywhere), sorted. Raises
        BranchNotFound."""
        with self._session() as s:
            stmt = select(m.MetricPoint.metric).distinct()
            if branch is not None:
                branch_row(s, branch)
                stmt = stmt.join(m.Run, col(m.Run.id) == col(m.MetricPoint.run_id)).where(
                    m.Run.branch == branch
                )
            return sorted(s.exec(stmt).all())

    def run_summaries(
        self, branch: str | None = None, *, run_ids: Sequence[int] | None = None
    ) -> list[RunSummary]:
        """Every run (on ``branch``, or with these ids), oldest first, with its last step,
        final metrics and checkpoints (committed and kept). Raises BranchNotFound."""
        with self._session() as s:
            stmt = select(m.Run).order_by(col(m.Run.id))
            if branch is not None:
                branch_row(s, branch)
                stmt = stmt.where(m.Run.branch == branch)
            if run_ids is not None:
                stmt = stmt.where(col(m.Run.id).in_(list(run_ids)))
            runs = list(s.exec(stmt).all())
            ids = [r.id for r in runs]
            if not ids:
                return []
            ckpt: dict[int, tuple[int, int, int]] = {}
            for run_id, n, kept, last in s.exec(
                select(
                    m.Checkpoint.run_id,
                    func.count(),
                    func.count() - func.count(m.Checkpoint.pruned),
                    func.max(m.Checkpoint.step),
                )
                .where(col(m.Checkpoint.run_id).in_(ids))
                .group_by(m.Checkpoint.run_id)
            ).all():
                assert run_id is not None
                ckpt[run_id] = (int(n), int(kept), int(last))
            last_step: dict[int, int] = {}
            for run_id, last in s.exec(
                select(m.MetricPoint.run_id, func.max(m.MetricPoint.step))
                .where(col(m.MetricPoint.run_id).in_(ids))
                .group_by(m.MetricPoint.run_id)
            ).all():
                last_step[run_id] = int(last)
            # Each metric's value at its own last step, per run.
            newest = (
                select(
                    m.MetricPoint.run_id,
                    m.MetricPoint.metric,
                    func.max(m.MetricPoint.step).label("step"),
                )
                .where(col(m.MetricPoint.run_id).in_(ids))
                .group_by(m.MetricPoint.run_id, m.MetricPoint.metric)
                .subquery()
            )
            nodes = run_nodes(s, ids)
            final: dict[int, dict[str, float]] = {}
            for run_id, metric, value in s.exec(
                select(m.MetricPoint.run_id, m.MetricPoint.metric, m.MetricPoint.value)
                .join(
                    newest,
                    (newest.c.run_id == m.MetricPoint.run_id)
                    & (newest.c.metric == m.MetricPoint.metric)
                    & (newest.c.step == m.MetricPoint.step),
                )
                .order_by(col(m.MetricPoint.metric))
            ).all():
                final.setdefault(run_id, {})[metric] = math.nan if value is None else value
            out = []
            for r in runs:
                assert r.id is not None
                n, kept, ck_last = ckpt.get(r.id, (0, 0, -1))
                last = max(last_step.get(r.id, -1), ck_last)
                out.append(
                    RunSummary(
                        run=from_row(Run, r, config=dict(r.config), nodes=nodes.get(r.id, {})),
                        steps=None if last < 0 else last,
                        final=final.get(r.id, {}),
                        checkpoints=n,
                        kept=kept,
                    )
                )
            return out


class Browsing(Database):
    """Windows over the whole lineage for the lineage browser (``tlreg ui``): newest first,
    paged by commit time, so that a page costs the same at 10^2 and 10^5 checkpoints."""

    def recent_checkpoints(
        self,
        *,
        limit: int,
        before: tuple[datetime, str] | None = None,
        branches: Sequence[str] | None = None,
    ) -> list[CheckpointRecord]:
        """The newest ``limit`` checkpoints (on ``branches``, or all) committed before the
        cursor ``before`` = (created, id) of the last one of the previous page; newest first,
        with parents."""
        with self._session() as s:
            stmt = select(m.Checkpoint)
            if branches is not None:
                stmt = stmt.where(col(m.Checkpoint.branch).in_(list(branches)))
            if before is not None:
                when, cid = before
                stmt = stmt.where(
                    (col(m.Checkpoint.created) < when)
                    | ((col(m.Checkpoint.created) == when) & (col(m.Checkpoint.id) < cid))
                )
            stmt = stmt.order_by(col(m.Checkpoint.created).desc(), col(m.Checkpoint.id).desc())
            return records(s, s.exec(stmt.limit(limit)).all())

    def checkpoint_count(self) -> int:
        """How many checkpoints the registry holds."""
        with self._session() as s:
            return int(s.exec(select(func.count()).select_from(m.Checkpoint)).one())


class MetricsBacklog:
    """Points a training loop logs, kept while the registry is unreachable.

    Training goes on when the database goes away (as checkpoints do); the points wait here and
    are sent, in order, by the next :meth:`flush` that reaches it.
    """

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self._waiting: list[tuple[int, dict[str, float], datetime, float | None]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, step: int, values: Mapping[str, float], *, elapsed_s: float | None) -> None:
        """Queue one evaluation (stamped now)."""
        for name in values:
            validate_metric_name(name)
        self._waiting.append((step, dict(values), m.utcnow(), elapsed_s))

    def flush(self, registry: Metrics) -> bool:
        """Send every queued point; False (keeping the rest) when the registry is unavailable."""
        while self._waiting:
            step, values, when, elapsed = self._waiting[0]
            try:
                registry.log_metrics(self.run_id, step, values, wall_time=when, elapsed_s=elapsed)
            except RegistryUnavailable:
                return False
            self._waiting.pop(0)
        return True
