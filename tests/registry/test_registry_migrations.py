"""Versioned schema migrations: old databases are refused until upgraded, and upgrading keeps
every row, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from tlreg.registry import Registry, SchemaVersionError, prefix_hashes
from tlreg.registry import migrations as mig
from tlreg.registry.models import SCHEMA_VERSION

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SIG = ["conv(3,16)", "relu", "linear(16,10)"]


def engine_for(url: str) -> Engine:
    """A bare engine on the registry database (no schema check), creating a SQLite file."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def make_v1(url: str, *, with_data: bool) -> None:
    """A registry exactly as tlreg with schema version 1 left it."""
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            mig.create_v1(conn)
            if not with_data:
                return
            t = mig._v1_metadata().tables
            checkpoint = {
                "branch": "main", "manifest": "", "metrics": {}, "val_accuracy": None,
                "logical_bytes": 10, "new_bytes": 10, "kind": "train", "message": None,
                "signature": None, "run_id": None, "created": T0,
            }  # fmt: skip
            conn.execute(
                t["run"].insert(),
                [{"id": 1, "branch": "main", "config": {"lr": 0.1}, "status": "running",
                  "error": None, "ray_job_id": None, "created": T0, "finished": None}],
            )  # fmt: skip
            conn.execute(
                t["checkpoint"].insert(),
                [
                    {**checkpoint, "id": "aaaa0001", "manifest": "aaaa0001", "step": 1},
                    {**checkpoint, "id": "bbbb0002", "manifest": "bbbb0002", "step": 2,
                     "metrics": {"val_accuracy": 0.5}, "val_accuracy": 0.5, "signature": SIG,
                     "run_id": 1},
                ],
            )  # fmt: skip
            conn.execute(
                t["edge"].insert(),
                [{"child": "bbbb0002", "parent": "aaaa0001", "kind": "continue", "position": 0}],
            )
            conn.execute(
                t["branch"].insert(),
                [{"name": "main", "head": "bbbb0002", "base": None, "task": None, "created": T0}],
            )
            conn.execute(
                t["tag"].insert(), [{"name": "v1", "checkpoint": "aaaa0001", "created": T0}]
            )
            conn.execute(
                t["object"].insert(),
                [{"hash": "h1", "nbytes": 10, "created": T0}, {"hash": "h2", "nbytes": 5,
                                                                "created": T0}],
            )  # fmt: skip
            conn.execute(
                t["checkpoint_object"].insert(),
                [{"checkpoint": "aaaa0001", "object": "h1"},
                 {"checkpoint": "bbbb0002", "object": "h1"},
                 {"checkpoint": "bbbb0002", "object": "h2"}],
            )  # fmt: skip
            conn.execute(
                t["layer_prefix"].insert(),
                [{"checkpoint": "bbbb0002", "depth": d, "prefix": h}
                 for d, h in enumerate(prefix_hashes(SIG), start=1)],
            )  # fmt: skip
    finally:
        engine.dispose()


def schema(url: str) -> dict[str, Any]:
    """Tables, columns (name, type, nullable), primary and foreign keys, indexes."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            out: dict[str, Any] = {}
            for table in sorted(insp.get_table_names()):
                out[table] = {
                    "columns": sorted(
                        (c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)
                    ),
                    "pk": insp.get_pk_constraint(table)["constrained_columns"],
                    "fks": sorted(
                        (tuple(f["constrained_columns"]), f["referred_table"])
                        for f in insp.get_foreign_keys(table)
                    ),
                    "indexes": sorted(
                        (
                            i["name"],
                            tuple(i["column_names"]),
                            bool(i["unique"]),
                            tuple(i.get("dialect_options", {}).get("postgresql_include", ())),
                        )
                        for i in insp.get_indexes(table)
                    ),
                }
            return out
    finally:
        engine.dispose()


def stored_version(url: str) -> str:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            value = conn.execute(
                text("SELECT value FROM meta WHERE key = 'schema_version'")
            ).scalar_one()
            return str(value)
    finally:
        engine.dispose()


def test_opening_a_version_1_registry_says_to_run_tlreg_upgrade(registry_url: str) -> None:
    make_v1(registry_url, with_data=True)
    before = schema(registry_url)
    with pytest.raises(SchemaVersionError) as e:
        Registry(registry_url)
    message = str(e.value)
    assert "\n" not in message
    assert f"schema version 1, older than this tlreg's ({SCHEMA_VERSION})" in message
    assert message.endswith("back it up, then run 'tlreg upgrade'")
    assert schema(registry_url) == before  # nothing was created on the way


def test_upgrade_brings_version_1_to_latest_and_keeps_every_row(registry_url: str) -> None:
    make_v1(registry_url, with_data=True)
    assert Registry.upgrade(registry_url) == (1, SCHEMA_VERSION)
    assert stored_version(registry_url) == str(SCHEMA_VERSION)
    with Registry(registry_url) as reg:
        head = reg.resolve("main")
        assert (head.id, head.parents, head.run_id, head.pruned) == (
            "bbbb0002",
            ("aaaa0001",),
            1,
            None,
        )
        assert head.metrics == {"val_accuracy": 0.5}
        assert [r.id for r in reg.log("main")] == ["bbbb0002", "aaaa0001"]
        assert reg.resolve("v1").id == "aaaa0001"
        assert reg.objects_of("main") == {"h1": 10, "h2": 5}
        assert reg.runs()[0].config == {"lr": 0.1}
        found = reg.best_ancestor(SIG)
        assert found is not None and (found[0].id, found[1]) == ("bbbb0002", 3)
        # The upgraded registry works as a new one does: commit, then collect garbage.
        reg.commit("main", "cccc0003", step=3, objects={"h3": 1})
        plan = reg.gc_plan(keep_last=1)
        assert plan.prune == ("bbbb0002",)  # aaaa0001 is tagged
        assert plan.objects == (("h2", 5),)


def test_upgrading_an_up_to_date_registry_does_nothing(registry_url: str) -> None:
    Registry(registry_url).close()
    before = schema(registry_url)
    assert Registry.upgrade(registry_url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert schema(registry_url) == before


def test_upgrading_an_empty_database_creates_the_latest_schema(registry_url: str) -> None:
    assert Registry.upgrade(registry_url) == (0, SCHEMA_VERSION)
    with Registry(registry_url) as reg:
        assert reg.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_upgraded_schema_equals_a_fresh_one(registry_url: str) -> None:
    make_v1(registry_url, with_data=False)
    Registry.upgrade(registry_url)
    upgraded = schema(registry_url)
    # Drop every table, then let Registry create the latest schema from the models.
    engine = engine_for(registry_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE metric_point"))  # v5; references run
            conn.execute(text("DROP TABLE run_node"))  # v10; references run
            conn.execute(text("DROP TABLE checkpoint_node"))  # v10; references checkpoint
            for table in reversed(mig._v1_metadata().sorted_tables):
                conn.execute(text(f"DROP TABLE {table.name}"))
            conn.execute(text("DROP TABLE gc_candidate"))
            conn.execute(text("DROP TABLE lane_link"))
            conn.execute(text("DROP TABLE object_move"))  # v8
    finally:
        engine.dispose()
    Registry(registry_url).close()
    assert schema(registry_url) == upgraded


def test_a_newer_schema_is_refused_with_upgrade_tlreg(registry_url: str) -> None:
    Registry(registry_url).close()
    engine = engine_for(registry_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    finally:
        engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"schema version 99, newer .*: upgrade tlreg$"):
        Registry(registry_url)
    with pytest.raises(SchemaVersionError, match=r"schema version 99, newer .*: upgrade tlreg$"):
        Registry.upgrade(registry_url)
    assert stored_version(registry_url) == "99"


def test_a_failing_migration_step_changes_nothing(
    registry_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_v1(registry_url, with_data=True)
    before = schema(registry_url)
    real_step = mig.STEPS[2]

    def half_done(conn: Any) -> None:
        real_step(conn)  # the DDL ran ...
        raise RuntimeError("disk full")  # ... and then the step failed

    monkeypatch.setitem(mig.STEPS, 2, half_done)
    with pytest.raises(RuntimeError, match="disk full"):
        Registry.upgrade(registry_url)
    assert schema(registry_url) == before
    assert stored_version(registry_url) == "1"


def test_upgrade_to_v3_labels_every_checkpoint_with_its_lane(registry_url: str) -> None:
    """main: a <- b <- c, side: d branched at b, main: e merges c and d; then v3 lanes."""
    make_v1(registry_url, with_data=False)
    engine = engine_for(registry_url)
    try:
        with engine.begin() as conn:
            t = mig._v1_metadata().tables
            rows = [("a", "main"), ("b", "main"), ("c", "main"), ("d", "side"), ("e", "main")]
            conn.execute(
                t["checkpoint"].insert(),
                [{"id": cid, "branch": branch, "step": i, "manifest": cid, "metrics": {},
                  "val_accuracy": None, "logical_bytes": 0, "new_bytes": 0, "kind": "train",
                  "message": None, "signature": None, "run_id": None,
                  "created": T0 + timedelta(seconds=i)}
                 for i, (cid, branch) in enumerate(rows)],
            )  # fmt: skip
            conn.execute(
                t["edge"].insert(),
                [{"child": c, "parent": p, "kind": k, "position": n}
                 for c, p, k, n in [("b", "a", "continue", 0), ("c", "b", "continue", 0),
                                    ("d", "b", "branch", 0), ("e", "c", "merge", 0),
                                    ("e", "d", "merge", 1)]],
            )  # fmt: skip
            conn.execute(
                t["branch"].insert(),
                [{"name": "main", "head": "e", "base": None, "task": None, "created": T0},
                 {"name": "side", "head": "d", "base": "b", "task": None, "created": T0}],
            )  # fmt: skip
    finally:
        engine.dispose()
    assert Registry.upgrade(registry_url) == (1, SCHEMA_VERSION)
    engine = engine_for(registry_url)
    try:
        with engine.connect() as conn:
            labels = conn.execute(
                text("SELECT id, lane, lane_pos FROM checkpoint ORDER BY id")
            ).all()
            links = conn.execute(
                text(
                    "SELECT parent_lane, parent_pos, child_lane, child_pos FROM lane_link "
                    "ORDER BY parent_lane, parent_pos, child_lane"
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in labels] == [
        ("a", "a", 0), ("b", "a", 1), ("c", "a", 2), ("d", "d", 0), ("e", "e", 0),
    ]  # fmt: skip
    assert [tuple(r) for r in links] == [("a", 1, "d", 0), ("a", 2, "e", 0), ("d", 0, "e", 0)]
    with Registry(registry_url) as reg:
        assert [(r.id, r.parents) for r in reg.ancestors("e")] == [
            ("d", ("b",)), ("c", ("b",)), ("b", ("a",)), ("a", ()),
        ]  # fmt: skip
        assert [(r.id, r.parents) for r in reg.descendants("b")] == [
            ("c", ("b",)), ("d", ("b",)), ("e", ("c", "d")),
        ]  # fmt: skip
        # Commits after the upgrade go on with the lanes the migration labelled.
        reg.commit("main", "f", step=5, objects={})
        reg.commit("side", "g", step=6, objects={})
        assert [r.id for r in reg.descendants("a")] == ["b", "c", "d", "e", "g", "f"]
        assert [(r.id, r.parents) for r in reg.ancestors("f", depth=2)] == [
            ("e", ("c", "d")), ("d", ("b",)), ("c", ("b",)),
        ]  # fmt: skip


def make_v3(url: str) -> None:
    """A registry with data exactly as tlreg with schema version 3 left it."""
    make_v1(url, with_data=True)
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            mig.STEPS[2](conn)
            mig.STEPS[3](conn)
            conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    finally:
        engine.dispose()


def test_upgrade_to_v4_lets_lineage_walks_read_lanes_from_an_index_alone(
    registry_url: str,
) -> None:
    make_v3(registry_url)
    lane_indexes = {
        name: (columns, unique, include)
        for name, columns, unique, include in schema(registry_url)["checkpoint"]["indexes"]
        if name.startswith("ix_checkpoint_lane")
    }
    assert lane_indexes == {"ix_checkpoint_lane": (("lane", "lane_pos"), True, ())}
    with pytest.raises(SchemaVersionError, match="schema version 3, older"):
        Registry(registry_url)
    assert Registry.upgrade(registry_url) == (3, SCHEMA_VERSION)
    lane_indexes = {
        name: (columns, unique, include)
        for name, columns, unique, include in schema(registry_url)["checkpoint"]["indexes"]
        if name.startswith("ix_checkpoint_lane")
    }
    include = () if registry_url.startswith("sqlite") else ("id", "step", "created")
    assert lane_indexes == {"ix_checkpoint_lane": (("lane", "lane_pos"), True, include)}
    with Registry(registry_url) as reg:
        # The lanes are still unique, and the walks read them as before.
        reg.commit("main", "cccc0003", step=3, objects={})
        assert [r.id for r in reg.descendants("aaaa0001")] == ["bbbb0002", "cccc0003"]
        assert [r.id for r in reg.ancestors("main")] == ["bbbb0002", "aaaa0001"]
        engine = engine_for(registry_url)
        try:
            with engine.begin() as conn:
                with pytest.raises(IntegrityError):
                    with conn.begin_nested():
                        conn.execute(
                            text("UPDATE checkpoint SET lane_pos = 0 WHERE id = 'cccc0003'")
                        )
        finally:
            engine.dispose()
