"""Evaluation curves (schema v5): points logged per run, a branch's curve across resumed runs,
run summaries, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect, text

from tlreg.registry import (
    BranchNotFound,
    MetricPoint,
    Registry,
    RegistryUnavailable,
    RunNotFound,
)
from tlreg.registry import migrations as mig
from tlreg.registry.metrics import MetricsBacklog, join_runs
from tlreg.registry.models import SCHEMA_VERSION

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def commit(reg: Registry, branch: str, cid: str, step: int, run_id: int | None = None) -> None:
    head = reg.get_branch(branch).head
    reg.commit(branch, cid, step=step, parents=[head] if head else [], objects={}, run_id=run_id)


def test_logged_points_come_back_exactly_with_nan_and_infinities(registry: Registry) -> None:
    reg = registry
    reg.create_branch("main")
    run = reg.start_run("main", {})
    reg.log_metrics(run.id, 5, {"acc": 0.5, "loss": math.inf}, wall_time=T0, elapsed_s=1.5)
    reg.log_metrics(run.id, 10, {"acc": math.nan, "loss": -math.inf}, wall_time=T0)
    points = reg.run_metrics(run.id)
    assert [(p.metric, p.step, p.elapsed_s) for p in points] == [
        ("acc", 5, 1.5),
        ("acc", 10, None),
        ("loss", 5, 1.5),
        ("loss", 10, None),
    ]
    assert points[0].value == 0.5 and math.isnan(points[1].value)
    assert points[2].value == math.inf and points[3].value == -math.inf
    assert points[0].wall_time == T0
    assert points[1].to_json()["value"] == "NaN"


def test_logging_a_step_again_replaces_its_value(registry: Registry) -> None:
    registry.create_branch("main")
    run = registry.start_run("main", {})
    registry.log_metrics(run.id, 3, {"acc": 0.1})
    registry.log_metrics(run.id, 3, {"acc": 0.2})
    assert [p.value for p in registry.run_metrics(run.id, "acc")] == [0.2]


def test_log_metrics_refuses_unknown_runs_and_bad_input_and_writes_nothing(
    registry: Registry,
) -> None:
    registry.create_branch("main")
    run = registry.start_run("main", {})
    with pytest.raises(RunNotFound, match="run 999 does not exist"):
        registry.log_metrics(999, 1, {"acc": 1.0})
    with pytest.raises(ValueError, match="integer >= 0"):
        registry.log_metrics(run.id, -1, {"acc": 1.0})
    with pytest.raises(ValueError, match="empty, longer than"):
        registry.log_metrics(run.id, 1, {"ok": 1.0, "": 1.0})
    with pytest.raises(ValueError, match="not a number"):
        registry.log_metrics(run.id, 1, {"acc": "high"})
    with pytest.raises(ValueError, match="timezone-aware"):
        registry.log_metrics(run.id, 1, {"acc": 1.0}, wall_time=datetime(2026, 1, 1))
    assert registry.run_metrics(run.id) == []


def test_a_hostile_metric_name_is_stored_as_given(registry: Registry) -> None:
    registry.create_branch("main")
    run = registry.start_run("main", {})
    name = "<script>alert('x')</script>"
    registry.log_metrics(run.id, 1, {name: 1.0})
    assert registry.metric_names("main") == [name]
    assert [p.metric for p in registry.metric_series("main", name)] == [name]


def test_a_resumed_run_replaces_the_steps_it_reran_and_seconds_accumulate(
    registry: Registry,
) -> None:
    reg = registry
    reg.create_branch("main")
    first = reg.start_run("main", {})
    for step in (10, 20, 30):
        reg.log_metrics(first.id, step, {"acc": step / 100}, elapsed_s=step / 10)
    reg.finish_run(first.id, status="failed", error="node lost")
    # It crashed after step 30; the last checkpoint was at step 20, so the next run re-ran 30.
    second = reg.start_run("main", {})
    for step in (30, 40):
        reg.log_metrics(second.id, step, {"acc": step / 100 + 0.001}, elapsed_s=step / 10 - 2)
    series = reg.metric_series("main", "acc")
    assert [(p.run_id, p.step, p.value) for p in series] == [
        (first.id, 10, 0.1),
        (first.id, 20, 0.2),
        (second.id, 30, 0.301),
        (second.id, 40, 0.401),
    ]
    # The second run's seconds start where the kept part of the first ended (2.0 s).
    assert [p.elapsed_s for p in series] == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_series_are_per_branch_and_unknown_branches_raise(registry: Registry) -> None:
    registry.create_branch("a")
    registry.create_branch("b")
    ra, rb = registry.start_run("a", {}), registry.start_run("b", {})
    registry.log_metrics(ra.id, 1, {"acc": 0.1})
    registry.log_metrics(rb.id, 1, {"acc": 0.9, "f1": 0.5})
    both = registry.metric_series_many(["a", "b"], "acc")
    assert {b: [p.value for p in s] for b, s in both.items()} == {"a": [0.1], "b": [0.9]}
    assert registry.metric_names() == ["acc", "f1"]
    assert registry.metric_names("a") == ["acc"]
    assert registry.metric_series("a", "f1") == []
    with pytest.raises(BranchNotFound):
        registry.metric_series("nope", "acc")


def test_run_summaries_give_last_step_final_metrics_and_checkpoints_kept(
    registry: Registry,
) -> None:
    reg = registry
    reg.create_branch("main")
    run = reg.start_run("main", {"lr": 0.1})
    for step in (5, 10, 15):
        reg.log_metrics(run.id, step, {"acc": step / 20})
    reg.log_metrics(run.id, 12, {"loss": 0.3})
    commit(reg, "main", "c1", 10, run.id)
    commit(reg, "main", "c2", 15, run.id)
    reg.finish_run(run.id, status="succeeded")
    idle = reg.start_run("main", {})
    [s, i] = reg.run_summaries("main")
    assert (s.steps, s.final, s.checkpoints, s.kept) == (15, {"acc": 0.75, "loss": 0.3}, 2, 2)
    assert s.duration_s is not None and 0 <= s.duration_s < 60
    assert (i.run.id, i.steps, i.final, i.checkpoints, i.duration_s) == (idle.id, None, {}, 0, None)
    assert s.to_json()["final"] == {"acc": 0.75, "loss": 0.3}
    assert [r.run.id for r in reg.run_summaries(run_ids=[idle.id])] == [idle.id]


def _pt(run: int, step: int, elapsed: float | None) -> MetricPoint:
    return MetricPoint(run, "m", step, float(step), T0, elapsed)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 50), min_size=0, max_size=8, unique=True).map(sorted),
        max_size=5,
    )
)
def test_joined_curves_are_sorted_unique_and_keep_each_runs_tail(runs: list[list[int]]) -> None:
    per_run = [
        [_pt(i, s, float(k + 1)) for k, s in enumerate(steps)] for i, steps in enumerate(runs)
    ]
    joined = join_runs(per_run)
    steps = [p.step for p in joined]
    assert steps == sorted(set(steps))
    # The last non-empty run is kept whole; every kept point comes from the newest run that
    # started at or before its step.
    nonempty = [i for i, r in enumerate(runs) if r]
    if nonempty:
        last = nonempty[-1]
        assert [p.step for p in joined if p.run_id == last] == runs[last]
    for p in joined:
        later = [i for i in nonempty if i > p.run_id and runs[i][0] <= p.step]
        assert later == []
    elapsed = [p.elapsed_s for p in joined]
    assert elapsed == sorted(e for e in elapsed if e is not None)


def test_upgrade_from_v4_adds_the_metric_table_and_keeps_runs(registry_url: str) -> None:
    from test_registry_migrations import engine_for, make_v1

    make_v1(registry_url, with_data=True)
    engine = engine_for(registry_url)
    try:
        with engine.begin() as conn:
            for version in (2, 3, 4):
                mig.STEPS[version](conn)
            conn.execute(text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
            assert not inspect(conn).has_table("metric_point")
    finally:
        engine.dispose()
    assert Registry.upgrade(registry_url) == (4, SCHEMA_VERSION)
    with Registry(registry_url) as reg:
        [run] = reg.runs()
        reg.log_metrics(run.id, 7, {"acc": 0.7}, wall_time=T0 + timedelta(seconds=1))
        assert [(p.step, p.value) for p in reg.metric_series("main", "acc")] == [(7, 0.7)]


def test_a_point_of_a_run_that_does_not_exist_is_refused_by_the_database(
    registry_url: str,
) -> None:
    Registry(registry_url).close()
    if registry_url.startswith("sqlite"):
        pytest.skip("SQLite does not enforce foreign keys here; log_metrics checks the run")
    engine = create_engine(registry_url)
    try:
        with pytest.raises(Exception, match="foreign key"), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO metric_point (run_id, metric, step, value, wall_time) "
                    "VALUES (42, 'acc', 1, 1.0, now())"
                )
            )
    finally:
        engine.dispose()


def test_a_backlog_keeps_points_while_the_registry_is_down_and_sends_them_in_order(
    registry_url: str,
) -> None:
    class Flaky(Registry):
        down = False

        def log_metrics(self, *args: object, **kwargs: object) -> None:
            if self.down:
                raise RegistryUnavailable("registry unreachable")
            super().log_metrics(*args, **kwargs)

    with Flaky(registry_url) as reg:
        reg.create_branch("main")
        run = reg.start_run("main", {})
        backlog = MetricsBacklog(run.id)
        backlog.add(1, {"acc": 0.1}, elapsed_s=0.5)
        assert backlog.flush(reg) and len(backlog) == 0
        reg.down = True
        backlog.add(2, {"acc": 0.2}, elapsed_s=1.0)
        backlog.add(3, {"acc": 0.3}, elapsed_s=1.5)
        assert not backlog.flush(reg) and len(backlog) == 2
        reg.down = False
        assert backlog.flush(reg) and len(backlog) == 0
        assert [(p.step, p.value, p.elapsed_s) for p in reg.metric_series("main", "acc")] == [
            (1, 0.1, 0.5),
            (2, 0.2, 1.0),
            (3, 0.3, 1.5),
        ]


def test_recent_checkpoints_pages_newest_first_without_gaps_or_repeats(
    registry: Registry,
) -> None:
    registry.create_branch("a")
    registry.create_branch("b")
    for i in range(7):
        commit(registry, "a" if i % 2 else "b", f"c{i:02d}", i)
    seen: list[str] = []
    before = None
    while True:
        page = registry.recent_checkpoints(limit=3, before=before)
        if not page:
            break
        seen += [r.id for r in page]
        before = (page[-1].created, page[-1].id)
    assert seen == [f"c{i:02d}" for i in reversed(range(7))]
    only_a = registry.recent_checkpoints(limit=10, branches=["a"])
    assert [(r.id, r.parents) for r in only_a] == [
        ("c05", ("c03",)), ("c03", ("c01",)), ("c01", ()),
    ]  # fmt: skip
    assert registry.checkpoint_count() == 7


def test_the_newest_page_is_read_through_the_created_index(registry_url: str) -> None:
    with Registry(registry_url) as reg:
        engine = create_engine(registry_url)
        try:
            with engine.connect() as conn:
                if registry_url.startswith("sqlite"):
                    plan = " ".join(
                        str(row[-1])
                        for row in conn.execute(
                            text(
                                "EXPLAIN QUERY PLAN SELECT * FROM checkpoint "
                                "ORDER BY created DESC, id DESC LIMIT 5"
                            )
                        )
                    )
                else:
                    conn.execute(text("SET enable_seqscan = off"))
                    plan = " ".join(
                        str(row[0])
                        for row in conn.execute(
                            text(
                                "EXPLAIN SELECT * FROM checkpoint "
                                "ORDER BY created DESC, id DESC LIMIT 5"
                            )
                        )
                    )
        finally:
            engine.dispose()
        assert "ix_checkpoint_created" in plan
        assert reg.recent_checkpoints(limit=5) == []
