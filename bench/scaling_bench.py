"""The commit path at many ranks: what rank 0, the store and the registry do per checkpoint
from 2 to 64 ranks, the S3 requests of one rank's save, and a projection to 1,000 ranks.

    python bench/scaling_bench.py                 # 2..64 ranks, a 7B-parameter layout
    python bench/scaling_bench.py --quick         # 2..16 ranks, a 0.1B layout (< 1 min)

Simulated: the ranks. Each rank's :class:`~tlreg.ckpt.commit.Part` is built as an FSDP2 rank's
would be: every parameter and both Adam moments sharded along dim 0, one block per rank, packed
into objects by the persist stage's size rule (``PACK_BYTES``/``SOLO_BYTES``). Real: everything
after the gather, through tlreg's own code: rank 0's conclude (parse the N payloads, check the
layouts, merge, write the manifest) into the S3 server, one rank's read and parse of that
manifest (what every rank does to restore), and ``Registry.commit`` of the checkpoint's objects
on PostgreSQL. The S3 request mix of a save is measured on one real single-rank save (through a
counting wrapper around the S3 store), first save and an unchanged second one.

Figures and the 1,000-rank projection are in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from math import ceil
from pathlib import Path

import torch

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.commit import Committer, Part
from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.manifest import Manifest, ShardEntry, manifest_key, new_manifest_id
from tlreg.ckpt.pending import SaveStats
from tlreg.ckpt.persist import PACK_BYTES, SOLO_BYTES
from tlreg.ckpt.plan import SavePlan
from tlreg.registry import Registry
from tlreg.storage_backends import Store, open_store
from tlreg.storage_backends.base import Data, as_parts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import S3Server, seaweed_server

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
FLOAT32 = 4
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Layout:
    """A decoder-only transformer's state: ``layers`` blocks of width ``d``, fp32 + Adam."""

    name: str
    d: int
    layers: int
    vocab: int

    def parameters(self) -> list[tuple[str, tuple[int, ...]]]:
        d = self.d
        shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (self.vocab, d))]
        for i in range(self.layers):
            p = f"layers.{i}"
            shapes += [
                (f"{p}.attn.qkv.weight", (3 * d, d)),
                (f"{p}.attn.out.weight", (d, d)),
                (f"{p}.mlp.fc1.weight", (4 * d, d)),
                (f"{p}.mlp.fc2.weight", (d, 4 * d)),
                (f"{p}.ln1.weight", (d,)),
                (f"{p}.ln1.bias", (d,)),
                (f"{p}.ln2.weight", (d,)),
                (f"{p}.ln2.bias", (d,)),
            ]
        return shapes

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every sharded tensor of the state: the model's parameters and Adam's two moments."""
        out = [(f"model/{n}", s) for n, s in self.parameters()]
        for n, s in self.parameters():
            out += [(f"optim/{n}/{m}", s) for m in MOMENTS]
        return out

    @property
    def nbytes(self) -> int:
        return sum(FLOAT32 * _volume(s) for _, s in self.tensors())


LAYOUTS = {
    "7b": Layout("7B (d=4096, 32 layers, fp32 + Adam)", 4096, 32, 32_000),
    "0.1b": Layout("0.1B (d=768, 12 layers, fp32 + Adam)", 768, 12, 32_000),
}


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _rows(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's block of ``total`` rows as torch.chunk (and FSDP2) splits them: (start, count)."""
    size = ceil(total / world)
    start = min(total, rank * size)
    return start, min(size, total - start)


def rank_part(layout: Layout, world: int, rank: int, salt: str) -> Part:
    """The part one FSDP2 rank of ``world`` would send: its block of every tensor, packed into
    objects by the persist stage's rule (a block of SOLO_BYTES or more alone, the rest in packs
    of up to PACK_BYTES)."""
    shards: dict[str, ShardEntry] = {}
    objects: dict[str, int] = {}
    pack: list[tuple[str, ShardEntry]] = []
    pack_size = 0

    def seal() -> None:
        nonlocal pack, pack_size
        digest = hash_bytes(f"{salt}:{rank}:pack:{len(objects)}".encode())
        for path, entry in pack:
            shards[path] = ShardEntry(
                entry.offsets, entry.shape, digest, entry.offset, entry.nbytes, entry.hash
            )
        objects[digest] = pack_size
        pack, pack_size = [], 0

    for path, shape in layout.tensors():
        start, count = _rows(shape[0], world, rank)
        block = (count, *shape[1:])
        nbytes = FLOAT32 * _volume(block)
        offsets = (start,) + (0,) * (len(shape) - 1)
        digest = hash_bytes(f"{salt}:{rank}:{path}".encode())
        if nbytes >= SOLO_BYTES:
            shards[path] = ShardEntry(offsets, block, digest, 0, nbytes, digest)
            objects[digest] = nbytes
            continue
        if pack and pack_size + nbytes > PACK_BYTES:
            seal()
        pack.append((path, ShardEntry(offsets, block, "", pack_size, nbytes, digest)))
        pack_size += nbytes
    if pack:
        seal()
    return Part(rank, {}, shards, objects, new_bytes=sum(objects.values()))


def save_plan(layout: Layout, step: int) -> SavePlan:
    """Rank 0's plan of the save (what rank 0 needs to merge: paths, sharded tensors, tree)."""
    tensors = layout.tensors()
    tree = {
        "model": {n: {"$tensor": f"model/{n}"} for n, _ in layout.parameters()},
        "optim": {
            n: {m: {"$tensor": f"optim/{n}/{m}"} for m in MOMENTS} for n, _ in layout.parameters()
        },
    }
    return SavePlan(
        rank=0,
        manifest_id=new_manifest_id(),
        step=step,
        metadata={},
        tree=tree,
        created=datetime.now(timezone.utc),
        paths=[p for p, _ in tensors],
        items=[],
        sharded={p: ("float32", s) for p, s in tensors},
        layout=[[p, "shard", "float32", list(s)] for p, s in tensors],
    )


@dataclass
class Row:
    ranks: int
    rank_bytes: int
    payload: int
    gathered: int
    conclude_ms: float
    manifest: int
    parse_ms: float
    objects: int
    commit_ms: float


def commit_path(layout: Layout, world: int, store: Store, reg: Registry, repeats: int) -> Row:
    """One checkpoint's commit at ``world`` ranks, ``repeats`` times: the median of each."""
    conclude, parse, commit = [], [], []
    row = Row(world, 0, 0, 0, 0.0, 0, 0.0, 0, 0.0)
    branch = f"w{world}"
    reg.create_branch(branch)
    for r in range(-1, repeats):  # the first (r = -1) warms the caches and is not counted
        salt = uuid.uuid4().hex  # new objects every checkpoint: the registry's worst case
        plan = save_plan(layout, step=r + 1)
        layout_hash = hash_bytes(json.dumps(plan.layout, separators=(",", ":")).encode())
        parts = [rank_part(layout, world, k, salt) for k in range(world)]
        for part in parts:
            part.layout = layout_hash
        gathered = [p.to_bytes() for p in parts]  # what the gloo gather hands rank 0
        stats = SaveStats()
        start = time.perf_counter()
        outcome, manifest, error = Committer(store, None)._conclude(
            plan, gathered, layout_hash, None, stats
        )
        took = time.perf_counter() - start
        assert error is None and manifest is not None, outcome["error"]
        start = time.perf_counter()
        raw = store.get(manifest_key(manifest.id))
        read = Manifest.from_json(raw, name=f"manifest {manifest.id}")
        took_parse = time.perf_counter() - start
        assert len(read.tensors) == len(plan.paths)
        start = time.perf_counter()
        reg.commit(
            branch,
            manifest.id,
            step=r + 1,
            objects=manifest.objects,
            logical_bytes=manifest.logical_bytes,
        )
        took_commit = time.perf_counter() - start
        if r < 0:
            continue
        conclude.append(took)
        parse.append(took_parse)
        commit.append(took_commit)
        row = Row(
            world,
            max(p.new_bytes for p in parts),
            max(len(g) for g in gathered),
            sum(len(g) for g in gathered),
            0.0,
            len(raw),
            0.0,
            len(manifest.objects),
            0.0,
        )
    row.conclude_ms = 1000 * statistics.median(conclude)
    row.parse_ms = 1000 * statistics.median(parse)
    row.commit_ms = 1000 * statistics.median(commit)
    return row


class CountingStore(Store):
    """A store that forwards every call to ``inner`` and counts the S3 requests each makes
    (a put above the part size is create + parts + complete, as S3Store sends it)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.requests: Counter[str] = Counter()
        self.part_size: int | None = getattr(inner, "part_size", None)

    def put(self, key: str, data: Data) -> None:
        size = sum(part.nbytes for part in as_parts(data))
        if self.part_size is not None and size > self.part_size:
            self.requests["PUT (multipart)"] += 2 + ceil(size / self.part_size)
        else:
            self.requests["PUT"] += 1
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self.requests["GET"] += 1
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.requests["GET"] += 1
        return self.inner.get_range(key, start, length)

    def get_into(self, key: str, out: memoryview, start: int = 0) -> None:
        self.requests["GET"] += 1
        self.inner.get_into(key, out, start)

    def exists(self, key: str) -> bool:
        self.requests["HEAD"] += 1
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        self.requests["HEAD"] += 1
        return self.inner.size(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = list(self.inner.list(prefix))
        self.requests["LIST"] += max(1, ceil(len(keys) / 1000))
        return iter(keys)

    def delete(self, key: str) -> None:
        self.requests["DELETE"] += 1
        self.inner.delete(key)

    def local_path(self, key: str) -> str | None:
        return None


def rank_requests(layout: Layout, world: int, store: Store) -> list[tuple[str, int, dict]]:
    """S3 requests of one real save of one rank's share (sized as at ``world`` ranks, shape
    for shape), then of an unchanged second save; with the number of objects each wrote."""
    state: dict[str, torch.Tensor] = {}
    for path, shape in layout.tensors():
        _, count = _rows(shape[0], world, 0)
        state[path.replace("/", ".")] = torch.randn(count, *shape[1:])
    counting = CountingStore(store)
    out = []
    with AsyncCheckpointer(counting, writer="thread") as ckpt:
        for label in ("first save", "unchanged save"):
            counting.requests.clear()
            pending = ckpt.save(state, step=0)
            pending.result()
            out.append((label, pending.stats.objects_written, dict(counting.requests)))
    return out


@contextmanager
def s3_store() -> Iterator[tuple[S3Server, Store]]:
    with seaweed_server() as server:
        bucket = f"scaling-{uuid.uuid4().hex[:12]}"
        server.fs.mkdir(bucket)
        for var, value in (
            ("AWS_ACCESS_KEY_ID", server.access_key),
            ("AWS_SECRET_ACCESS_KEY", server.secret_key),
            ("AWS_ENDPOINT_URL", server.endpoint_url),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            os.environ[var] = value
        store = open_store(f"s3://{bucket}/bench")
        try:
            yield server, store
        finally:
            store.close()


@contextmanager
def pg_registry() -> Iterator[Registry]:
    import psycopg

    name = f"tlreg_scaling_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        reg = Registry(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        try:
            yield reg
        finally:
            reg.close()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def project(layout: Layout, rows: list[Row], n: int) -> dict[str, float]:
    """The figures at ``n`` ranks: the parts' sizes and object counts exactly (the parts are
    cheap to build), times and the manifest's size by least-squares lines through ``rows``
    (the manifest has one entry per tensor per rank, so they grow linearly with ranks)."""
    parts = [rank_part(layout, n, k, "projection") for k in range(n)]
    payloads = [len(p.to_bytes()) for p in parts]
    out: dict[str, float] = {
        "rank_bytes": max(p.new_bytes for p in parts),
        "payload": max(payloads),
        "gathered": sum(payloads),
        "objects": sum(len(p.objects) for p in parts),
    }
    xs = [float(r.ranks) for r in rows]
    for name in ("conclude_ms", "manifest", "parse_ms"):
        a, b = _fit(xs, [float(getattr(r, name)) for r in rows])
        out[name] = a + b * n
    a, b = _fit([float(r.objects) for r in rows], [r.commit_ms for r in rows])
    out["commit_ms"] = a + b * out["objects"]
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="7b")
    parser.add_argument("--ranks", default="2,4,8,16,32,64", help="comma-separated rank counts")
    parser.add_argument("--repeats", type=int, default=3, help="checkpoints per rank count")
    parser.add_argument("--project", type=int, default=1000, help="rank count to project to")
    parser.add_argument("--quick", action="store_true", help="0.1B layout, 2..16 ranks, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.layout, args.ranks, args.repeats = "0.1b", "2,4,8,16", 1
    try:
        worlds = sorted({int(x) for x in args.ranks.split(",")})
    except ValueError:
        parser.error(f"--ranks: {args.ranks!r} is not a comma-separated list of integers")
    if len(worlds) < 2 or worlds[0] < 1:
        parser.error("--ranks: give at least two rank counts, each >= 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    layout = LAYOUTS[args.layout]
    tensors = len(layout.tensors())
    print(f"# Commit path at scale: {layout.name}, {tensors} tensors, {_mib(layout.nbytes)} MiB")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    rows: list[Row] = []
    with s3_store() as (_, store), pg_registry() as reg:
        header = (
            "| ranks | share/rank MiB | payload/rank KiB | gathered MiB | rank-0 conclude ms "
            "| manifest MiB | read+parse ms | objects | registry commit ms |"
        )
        print(header)
        print("|" + "---|" * 9)
        for world in worlds:
            row = commit_path(layout, world, store, reg, args.repeats)
            rows.append(row)
            print(
                f"| {row.ranks} | {_mib(row.rank_bytes)} | {row.payload / 1024:,.0f} "
                f"| {_mib(row.gathered)} | {row.conclude_ms:,.0f} | {_mib(row.manifest)} "
                f"| {row.parse_ms:,.0f} | {row.objects:,} | {row.commit_ms:,.1f} |",
                flush=True,
            )
        requests = rank_requests(LAYOUTS["0.1b"], 8, store)
    print("\n# S3 requests of one rank's save (0.1B layout, one rank's share of 8)\n")
    for label, written, counts in requests:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"- {label}: {written} objects written; {sum(counts.values())} requests ({mix})")
    n = args.project
    projected = project(layout, rows, n)
    print(f"\n# Projected to {n} ranks\n")
    print(
        f"- share per rank {_mib(projected['rank_bytes'])} MiB; payload per rank "
        f"{projected['payload'] / 1024:,.0f} KiB; gathered at rank 0 "
        f"{_mib(projected['gathered'])} MiB (exact)"
    )
    print(
        f"- objects per checkpoint: {projected['objects']:,} (exact); registry commit "
        f"{projected['commit_ms']:,.0f} ms (line through commit ms against objects)"
    )
    print(
        f"- manifest {_mib(projected['manifest'])} MiB; rank-0 conclude "
        f"{projected['conclude_ms'] / 1000:,.1f} s; read+parse by every rank "
        f"{projected['parse_ms'] / 1000:,.1f} s (lines through the rows against ranks)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "layout": args.layout,
                    "rows": [r.__dict__ for r in rows],
                    "requests": requests,
                    "projected": {"ranks": n, **projected},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
