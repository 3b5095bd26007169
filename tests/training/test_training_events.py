"""Progress events: typed, dispatched in one place, pickled intact (they cross Ray), and
written to JSON as before (``tlreg train --json``)."""

from __future__ import annotations

import json
import pickle

import pytest

from tlreg.training import (
    Checkpointed,
    CheckpointFailed,
    Evaluated,
    ProgressEvent,
    ProgressListener,
    Restored,
    TrainSummary,
)
from tlreg.training.events import event_json

RESTORED = Restored(
    step=0, checkpoint="c0", resumed=False, transferred=("a",), skipped=("b",),
    frozen=("a",), matched_layers=2,
)  # fmt: skip
EVENTS: list[ProgressEvent] = [
    RESTORED,
    Evaluated(step=5, loss=0.5, metric=0.7, metric_name="acc", elapsed_s=1.0, checkpoint="c0"),
    Checkpointed(step=5, id="c1", stall_ms=2.0, new_bytes=10, logical_bytes=20),
    CheckpointFailed(step=10, error="boom"),
]


class Recorder(ProgressListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, ProgressEvent]] = []

    def restored(self, event: Restored) -> None:
        self.seen.append(("restored", event))

    def evaluated(self, event: Evaluated) -> None:
        self.seen.append(("evaluated", event))

    def checkpointed(self, event: Checkpointed) -> None:
        self.seen.append(("checkpointed", event))

    def checkpoint_failed(self, event: CheckpointFailed) -> None:
        self.seen.append(("checkpoint_failed", event))


def test_each_event_reaches_the_listener_method_of_its_kind() -> None:
    recorder = Recorder()
    for event in EVENTS:
        recorder.on_event(event)
    assert recorder.seen == list(
        zip(["restored", "evaluated", "checkpointed", "checkpoint_failed"], EVENTS, strict=True)
    )


def test_a_listener_ignores_the_kinds_it_does_not_override_and_refuses_non_events() -> None:
    listener = ProgressListener()
    for event in EVENTS:
        listener.on_event(event)
    with pytest.raises(TypeError, match="not a progress event"):
        listener.on_event({"type": "eval"})  # type: ignore[arg-type]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_events_pickle_intact_and_cannot_be_changed(event: ProgressEvent) -> None:
    assert pickle.loads(pickle.dumps(event)) == event
    with pytest.raises(AttributeError):
        event.step = 99  # type: ignore[misc]


def test_summary_json_keeps_the_event_dicts_of_before() -> None:
    summary = TrainSummary(branch="b", run_id=1, status="running")
    for event in EVENTS:
        summary.on_event(event)
    doc = json.loads(json.dumps(summary.to_json()))
    assert doc["transferred_from"] == "c0" and doc["matched_layers"] == 2
    assert doc["evals"] == [
        {"type": "eval", "step": 5, "loss": 0.5, "metric": 0.7, "metric_name": "acc",
         "elapsed_s": 1.0, "checkpoint": "c0"}
    ]  # fmt: skip
    assert doc["checkpoints"] == [
        {"type": "checkpoint", "step": 5, "id": "c1", "stall_ms": 2.0, "new_bytes": 10,
         "logical_bytes": 20}
    ]  # fmt: skip
    assert doc["checkpoint_errors"] == [{"type": "checkpoint_failed", "step": 10, "error": "boom"}]
    assert summary.first_step_reaching(0.6) == (5, 1.0)
    assert event_json(RESTORED)["transferred"] == ("a",)


def test_a_restarted_worker_group_drops_the_evals_it_will_redo() -> None:
    summary = TrainSummary(branch="b", run_id=1, status="running")
    for event in EVENTS[:2]:
        summary.on_event(event)
    summary.on_event(Restored(step=0, checkpoint="c0", resumed=True, transferred=(),
                              skipped=(), frozen=(), matched_layers=None))  # fmt: skip
    assert summary.evals == [] and summary.resumed_from == "c0"
