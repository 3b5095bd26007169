"""Registry latency at scale: p50/p99 of the lineage operations on a populated registry.

    python bench/registry_bench.py --checkpoints 100000 --backend both
    python bench/registry_bench.py --quick            # 10^4 checkpoints, fewer repeats

Shape (per 10^4 checkpoints, a "group"): ten chains of 1,000 steps; chain 0 starts at a root,
chains 1-9 branch off chain 0 at steps 100, 200, ..., so the group's root has ~10^4
descendants and every chain head has >= 1,000 ancestors. Chain c uses architecture c % 100 of
100 (12-module signatures sharing a 4-module stem), references one object of its own per
checkpoint plus one per chain, and every tenth chain's branch is deleted (GC prunes it).

Population writes the same rows ``Registry.commit`` writes, but in bulk (Core executemany in
large transactions): committing 10^5 checkpoints one by one costs ~10 minutes on this
machine. Every *timed* operation goes through the public API on the populated database,
``commit`` and ``create_branch`` included. PostgreSQL runs in a throwaway database.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tlreg.registry import Registry, prefix_hashes
from tlreg.registry import models as m

CHAIN = 1_000
GROUP = 10 * CHAIN
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def cid(n: int) -> str:
    return hashlib.blake2b(str(n).encode(), digest_size=20).hexdigest()


def signature(arch: int) -> list[str]:
    return [f"stem{j}" for j in range(4)] + [f"arch{arch}-m{j}" for j in range(8)]


def populate(reg: Registry, n: int) -> dict[str, Any]:
    """Bulk-insert ``n`` checkpoints (a multiple of 10^4) in the shape described above."""
    assert n % GROUP == 0, "--checkpoints must be a multiple of 10,000"
    engine = reg._engine.execution_options(tlreg_write=True)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    chains = n // CHAIN
    heads: dict[int, str] = {}
    info: dict[str, Any] = {"roots": [], "heads": heads}
    prefixes = {a: list(enumerate(prefix_hashes(signature(a)), start=1)) for a in range(100)}
    serial = 0
    for c in range(chains):
        group, member = divmod(c, 10)
        rows, edges, objects, refs, layers, links = [], [], [], [], [], []
        # Lanes (schema v3) as Registry.commit labels them: every chain is one lane, named
        # after its first checkpoint; a branch point is a lane link.
        lane = cid(c * CHAIN)
        if member == 0:
            parent = None
        else:  # branch off the group's first chain at step member * 100
            parent = cid((group * 10) * CHAIN + member * 100)
            links.append(
                {"parent_lane": cid(group * 10 * CHAIN), "parent_pos": member * 100,
                 "child_lane": lane, "child_pos": 0}
            )  # fmt: skip
        arch = c % 100
        shared = f"shared-{c}"
        objects.append({"hash": shared, "nbytes": 1 << 20, "created": t0})
        for step in range(CHAIN):
            me = cid(c * CHAIN + step)
            serial += 1
            created = t0 + timedelta(seconds=serial)
            rows.append(
                {
                    "id": me, "branch": f"chain-{c}", "step": step, "manifest": me,
                    "metrics": {"val_accuracy": (step % 97) / 97}, "val_accuracy": (step % 97) / 97,
                    "logical_bytes": 2 << 20, "new_bytes": 1 << 20, "kind": "train",
                    "message": None, "signature": signature(arch), "run_id": None,
                    "created": created, "pruned": None, "lane": lane, "lane_pos": step,
                }
            )  # fmt: skip
            if parent is not None:
                kind = "continue" if step else "branch"
                edges.append({"child": me, "parent": parent, "kind": kind, "position": 0})
            objects.append({"hash": f"own-{me}", "nbytes": 1 << 20, "created": created})
            refs += [
                {"checkpoint": me, "object": f"own-{me}"},
                {"checkpoint": me, "object": shared},
            ]
            layers += [{"checkpoint": me, "depth": d, "prefix": h} for d, h in prefixes[arch]]
            parent = me
        with engine.begin() as conn:
            conn.execute(m.Checkpoint.__table__.insert(), rows)
            if edges:
                conn.execute(m.Edge.__table__.insert(), edges)
            if links:
                conn.execute(m.LaneLink.__table__.insert(), links)
            conn.execute(m.Object.__table__.insert(), objects)
            conn.execute(m.CheckpointObject.__table__.insert(), refs)
            conn.execute(m.LayerPrefix.__table__.insert(), layers)
            if member != 9:  # every tenth chain's branch was deleted
                base = cid((group * 10) * CHAIN + member * 100) if member else None
                conn.execute(
                    m.Branch.__table__.insert(),
                    {"name": f"chain-{c}", "head": parent, "base": base, "task": None,
                     "created": t0},
                )  # fmt: skip
        assert parent is not None
        heads[c] = parent
        if member == 0:
            info["roots"].append(cid(c * CHAIN))
    with engine.begin() as conn:
        for c in range(0, chains, 25):
            conn.execute(m.Tag.__table__.insert(), {"name": f"release-{c}", "checkpoint": heads[c],
                                                    "created": t0})  # fmt: skip
    if reg._dialect == "postgresql":
        # What autovacuum does to freshly inserted tables (PostgreSQL >= 13 vacuums after
        # inserts too): statistics, and a visibility map so index-only scans skip the heap.
        with reg._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:  # the WAL's pages into the database file, as SQLite's automatic checkpoints do
        with reg._engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    # Population leaves ~10^2 MB of dirty pages: without this the kernel writes them back
    # during the first timed operations (the SQLite descendants call measured 20-23 ms there
    # and 14 ms a minute later, same code).
    os.sync()
    return info


def layout(n: int) -> dict[str, Any]:
    """The heads and roots :func:`populate` makes for ``n`` checkpoints (for ``--reuse``)."""
    chains = n // CHAIN
    return {
        "heads": {c: cid(c * CHAIN + CHAIN - 1) for c in range(chains)},
        "roots": [cid(c * CHAIN) for c in range(0, chains, 10)],
    }


# What each schema step from v4 on adds, undone (newest first) to put a populated registry
# back to v3 for timing the upgrade; v3 itself (lane labels on every checkpoint) stays.
UNDO: dict[int, tuple[str, ...]] = {
    10: (
        "DROP INDEX IF EXISTS ix_checkpoint_tier",
        "ALTER TABLE checkpoint DROP COLUMN tier",
        "DROP TABLE IF EXISTS checkpoint_node",
        "DROP TABLE IF EXISTS run_node",
    ),
    9: ("DROP INDEX IF EXISTS ix_checkpoint_pruned",),
    8: ("DROP TABLE IF EXISTS object_move",),
    7: ("DROP INDEX IF EXISTS ix_checkpoint_created",),
    6: ("DROP TABLE IF EXISTS branch_lease",),
    5: ("DROP TABLE IF EXISTS metric_point",),
    4: (),  # rebuilds PostgreSQL's lane index: re-running it on the v4 index is the same work
}


def time_migrations(url: str) -> float:
    """Seconds ``Registry.upgrade`` takes to bring the populated registry from schema v3 to
    the current one (v4: PostgreSQL's lane index rebuilt over every checkpoint; v7: the
    created index built; v9: the partial pruned index; v10: a column added to every
    checkpoint): the registry is first put back to v3 by undoing v4 and later (``UNDO``)."""
    missing = sorted(set(range(4, m.SCHEMA_VERSION + 1)) - set(UNDO))
    if missing:
        raise SystemExit(f"--migrations: add the undo of schema v{missing[0]} to UNDO")
    reg = Registry(url)
    try:
        with reg._engine.execution_options(tlreg_write=True).begin() as conn:
            for version in range(m.SCHEMA_VERSION, 3, -1):
                for ddl in UNDO[version]:
                    conn.exec_driver_sql(ddl)
            conn.exec_driver_sql("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    finally:
        reg.close()
    start = time.perf_counter()
    found, to = Registry.upgrade(url)
    elapsed = time.perf_counter() - start
    assert (found, to) == (3, m.SCHEMA_VERSION), (found, to)
    return elapsed


def measure(fn: Callable[[int], object], repeats: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds over ``repeats`` calls of ``fn(i)`` (after one warm-up)."""
    fn(-1)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def run(
    reg: Registry, n: int, quick: bool, skip: tuple[str, ...] = (), reuse: bool = False
) -> list[tuple[str, float, float]]:
    if reuse:
        info = layout(n)
    else:
        start = time.perf_counter()
        info = populate(reg, n)
        print(f"  populated {n:,} checkpoints in {time.perf_counter() - start:.1f} s", flush=True)
    heads, roots = info["heads"], info["roots"]
    chains = n // CHAIN
    fast, slow = (50, 10) if quick else (200, 30)
    token = uuid.uuid4().hex[:6]
    results: list[tuple[str, float, float]] = []

    def create_branch(i: int) -> object:
        return reg.create_branch(f"new-{token}-{i}", from_ref=cid((i * 7919) % n))

    def commit(i: int) -> object:
        me = f"commit-{token}-{i}"
        return reg.commit(
            "chain-0", me, step=i, objects={f"own-{me}": 1 << 20, "shared-0": 1 << 20},
            signature=signature(0), metrics={"val_accuracy": 0.5},
        )  # fmt: skip

    sig = [*signature(42)[:9], "new-head", "new-out"]
    ops: list[tuple[str, Callable[[int], object], int]] = [
        ("create_branch", create_branch, fast),
        ("commit", commit, fast),
        ("resolve (id prefix)", lambda i: reg.resolve(cid((i * 104729) % n)[:10]), fast),
        ("resolve (branch)", lambda i: reg.resolve(f"chain-{(i % chains) // 10 * 10 + 1}"), fast),
        (
            "log (last 50)",
            lambda i: reg.log(f"chain-{(i % chains) // 10 * 10 + 1}", limit=50),
            fast,
        ),
        ("ancestors (depth 1,000)", lambda i: reg.ancestors(heads[(i % chains) // 10 * 10]), slow),
        ("descendants (10^4)", lambda i: reg.descendants(roots[i % len(roots)]), slow),
        # The same calls, then every record built (a RecordList builds them on access).
        (
            "ancestors + all records",
            lambda i: list(reg.ancestors(heads[(i % chains) // 10 * 10])),
            slow,
        ),
        ("descendants + all records", lambda i: list(reg.descendants(roots[i % len(roots)])), slow),
        ("common_ancestor", lambda i: reg.common_ancestor(heads[1], heads[2 + i % 7]), slow),
        ("best_ancestor", lambda i: reg.best_ancestor(sig), slow),
        ("repack_candidates", lambda i: reg.repack_candidates(), slow),
        ("gc_plan", lambda i: reg.gc_plan(), 3 if quick else 5),
        ("gc_plan (keep_last=10)", lambda i: reg.gc_plan(keep_last=10), 3 if quick else 5),
    ]
    for name, fn, repeats in ops:
        if skip and name.startswith(skip):
            continue
        p50, p99 = measure(fn, repeats)
        _row(results, name, p50, p99)
    if not (skip and "gc_apply".startswith(skip)):
        # Collect what the deleted chains left (the database half: apply_gc, forget_objects),
        # then plan on a registry with nothing to delete: the first plan walks the lineage,
        # later ones see the refs unchanged and read only those.
        for name, call in (
            ("gc apply + forget", lambda: _collect(reg)),
            ("gc_plan (nothing to delete, walks)", reg.gc_plan),
        ):
            start = time.perf_counter()
            call()
            ms = (time.perf_counter() - start) * 1000
            _row(results, name, ms, ms)
        p50, p99 = measure(lambda i: reg.gc_plan(), fast)
        _row(results, "gc_plan (nothing to delete, refs unchanged)", p50, p99)
    return results


def _collect(reg: Registry) -> None:
    done = reg.apply_gc(reg.gc_plan())
    reg.forget_objects([h for h, _ in done.objects])


def _row(results: list[tuple[str, float, float]], name: str, p50: float, p99: float) -> None:
    print(f"  {name:<26} p50 {p50:9.2f} ms   p99 {p99:9.2f} ms   load {_load()}", flush=True)
    results.append((name, p50, p99))


@contextmanager
def backend_url(backend: str, keep: bool = False) -> Iterator[str]:
    """A fresh, empty database; ``keep`` leaves it behind (its URL is printed) for ``--reuse``."""
    if backend == "sqlite":
        if keep:
            tmp = tempfile.mkdtemp(prefix="tlreg-bench-")
            url = f"sqlite:///{Path(tmp) / 'registry.db'}"
            print(f"  kept database: {url}", flush=True)
            yield url
            return
        with tempfile.TemporaryDirectory(prefix="tlreg-bench-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'registry.db'}"
        return
    import psycopg

    name = f"tlreg_bench_{uuid.uuid4().hex[:12]}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        if keep:
            print(f"  kept database: {url} (drop it when done)", flush=True)
            yield url
            return
        try:
            yield url
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _load() -> str:
    """The 1-minute load average (the machine is shared: timings scale with it)."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=100_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="10^4 checkpoints, fewer repeats")
    parser.add_argument(
        "--skip", default="", help="comma-separated operation name prefixes to leave out"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the populated database behind (for --reuse)"
    )
    parser.add_argument(
        "--reuse",
        metavar="URL",
        help="time the operations on a database an earlier --keep run populated with the same "
        "--checkpoints (one backend: the URL's)",
    )
    parser.add_argument(
        "--migrations", action="store_true", help="also time the schema upgrade from v3 (last)"
    )
    args = parser.parse_args(argv)
    n = 10_000 if args.quick else args.checkpoints
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if args.reuse:
        backends = ["sqlite" if args.reuse.startswith("sqlite") else "postgres"]
    table: dict[str, list[tuple[str, float, float]]] = {}
    skip = tuple(x for x in args.skip.split(",") if x)
    for backend in backends:
        print(f"{backend}, {n:,} checkpoints, load average {_load()}", flush=True)
        with (
            contextlib.nullcontext(args.reuse) if args.reuse else backend_url(backend, args.keep)
        ) as url:
            with Registry(url) as reg:
                table[backend] = run(reg, n, args.quick, skip, reuse=bool(args.reuse))
            if args.migrations:
                seconds = time_migrations(url)
                print(f"  schema upgrade v3 -> v{m.SCHEMA_VERSION}: {seconds:.2f} s", flush=True)
                table[backend].append(
                    ("schema upgrade v3 -> current", seconds * 1000, seconds * 1000)
                )
        print(f"  load average after {_load()}", flush=True)
    header = "| operation | " + " | ".join(f"{b} p50 / p99 (ms)" for b in backends) + " |"
    print(f"\n{n:,} checkpoints\n\n{header}\n|---|" + "---|" * len(backends))
    for i, (name, _, _) in enumerate(table[backends[0]]):
        cells = [f"{table[b][i][1]:.2f} / {table[b][i][2]:.2f}" for b in backends]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
