"""All ranks write: real gloo ranks on CPU save one checkpoint together; N ranks restore on M.

One spawn of two ranks runs every collective case in order (replicated, Shard, DTensor, and
a fault on rank 1), since spawning is the slow part; each rank checks what it can see and
writes a small JSON report. The test process then restores the checkpoints as one rank (2→1)
and as three (2→3: three loads of three blocks, which is all a rank of a three-rank job does),
and the two ranks restore a checkpoint that one process saved (1→2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlreg.ckpt import AsyncCheckpointer, CheckpointError, Shard, verify
from tlreg.ckpt.manifest import manifest_key
from tlreg.storage_backends import LocalStore

WORLD = 2
ROWS, COLS = 10, 6  # the sharded tensor; split unevenly: rows 0..6 on rank 0, 6..10 on rank 1
SPLIT = 6


def assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and raw bytes."""
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def replicated_state() -> dict[str, Any]:
    """A DDP-like state: every rank holds all of it (sizes chosen to be split unevenly)."""
    g = torch.Generator().manual_seed(7)
    model = {f"layer{i}.weight": torch.randn(64, 8 * (i + 1), generator=g) for i in range(6)}
    model["layer0.bias"] = torch.arange(5, dtype=torch.bfloat16)
    model["empty"] = torch.zeros(0, 3)
    return {"model": model, "step": 3, "lr": 0.5}


def global_tensor() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float64).reshape(ROWS, COLS) / 7


def rows(rank: int, world: int) -> tuple[int, int]:
    """Rows of rank ``rank`` among ``world`` (uneven when they do not divide)."""
    if world == WORLD:
        return (0, SPLIT) if rank == 0 else (SPLIT, ROWS)
    per = -(-ROWS // world)
    return min(rank * per, ROWS), min((rank + 1) * per, ROWS)


def sharded_state(rank: int, world: int) -> dict[str, Any]:
    lo, hi = rows(rank, world)
    block = global_tensor()[lo:hi].clone()
    return {
        "emb": Shard(block, (lo, 0), (ROWS, COLS)),
        "head": torch.full((4,), 2.0),  # replicated next to the shards
    }


class FailsOnRankOne(LocalStore):
    """A local store whose chunk puts fail on rank 1."""

    def put(self, key: str, data: Any) -> None:
        if "/c/" in key and dist.get_rank() == 1:
            raise OSError(28, f"injected on rank 1: no space left writing {key}")
        super().put(key, data)


def _rank_main(rank: int, root: str, one_rank_id: str) -> None:
    tmp = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=WORLD)
    report: dict[str, Any] = {}
    try:
        store = LocalStore(str(tmp / "store"))
        with AsyncCheckpointer(store, process_group=dist.group.WORLD) as ckpt:
            assert (ckpt.rank, ckpt.world) == (rank, WORLD)
            pending = ckpt.save(replicated_state(), step=3, metadata={"rank": rank})
            report["replicated"] = pending.result()
            report["replicated_stats"] = {
                "rank_new_bytes": pending.stats.rank_new_bytes,
                "bytes_copied": pending.stats.bytes_copied,
                "new_bytes": pending.stats.new_bytes,
            }
            pending = ckpt.save(sharded_state(rank, WORLD), step=4)
            report["sharded"] = pending.result()
            report["sharded_new_bytes"] = pending.stats.rank_new_bytes
            # rank 0 holds the manifest it wrote; the other ranks read it once
            written = store.get(manifest_key(report["sharded"]))
            report["pending_manifest"] = pending.manifest().to_bytes() == written

            # a DTensor sharded on dim 1 next to a replicated one: written once per block
            from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
            from torch.distributed.tensor import Shard as Placement

            mesh = init_device_mesh("cpu", (WORLD,))
            dtensors = {
                "cols": distribute_tensor(global_tensor(), mesh, [Placement(1)]),
                "copy": distribute_tensor(global_tensor(), mesh, [Replicate()]),
            }
            report["dtensor"] = ckpt.save(dtensors).result()

            # 1→2: a block of a tensor that one process saved whole (and one it sharded)
            lo, hi = rows(rank, WORLD)
            state = ckpt.load(
                one_rank_id,
                shards={"whole": ((lo, 0), (hi - lo, COLS)), "emb": ((0, 2 * rank), (ROWS, 2))},
            )
            assert (state["whole"].offsets, state["whole"].global_shape) == ((lo, 0), (ROWS, COLS))
            assert_bits(state["whole"].local, global_tensor()[lo:hi])
            assert_bits(state["emb"].local, global_tensor()[:, 2 * rank : 2 * rank + 2])
            assert_bits(ckpt.load(one_rank_id, prefix="whole")["whole"], global_tensor())
            report["one_to_two"] = True

        # a failure on rank 1 fails the save on every rank, and no manifest appears
        faulty = FailsOnRankOne(str(tmp / "faulty"))
        with AsyncCheckpointer(faulty, process_group=dist.group.WORLD) as ckpt:
            pending = ckpt.save(replicated_state())
            try:
                pending.result()
            except (OSError, CheckpointError) as e:
                report["fault"] = f"{type(e).__name__}: {e}"
            assert list(faulty.list("manifests")) == []
        report["ok"] = True
    finally:
        (tmp / f"report-{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
    # All a rank proves is in its report and the store by now. It leaves without the
    # interpreter's teardown: in ~6% of runs on a loaded 2-core machine a rank aborted there
    # ("terminate called without an active exception", no Python frame on the stack) after
    # destroy_process_group() had returned and the report was complete, failing the spawn.
    os._exit(0)


def test_ranks_share_the_writes_and_any_layout_restores_on_any_number_of_ranks(tmp_path, same):
    store = LocalStore(str(tmp_path / "store"))
    with AsyncCheckpointer(store) as alone:  # one process saves a whole and a sharded tensor
        one_rank_id = alone.save(
            {"whole": global_tensor(), "emb": Shard(global_tensor(), (0, 0), (ROWS, COLS))}
        ).result()

    mp.start_processes(
        _rank_main, args=(str(tmp_path), one_rank_id), nprocs=WORLD, start_method="spawn"
    )
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(WORLD)]
    assert all(r.get("ok") and r.get("one_to_two") for r in reports), reports
    assert all(r["pending_manifest"] for r in reports), reports

    # every rank's result() is the one committed manifest id
    replicated_id = reports[0]["replicated"]
    assert reports[1]["replicated"] == replicated_id
    sharded_id = reports[0]["sharded"]
    assert reports[1]["sharded"] == sharded_id
    dtensor_id = reports[0]["dtensor"]
    assert reports[1]["dtensor"] == dtensor_id
    manifests = sorted(p.name for p in (tmp_path / "store" / "manifests").rglob("*.json"))
    ids = (one_rank_id, replicated_id, sharded_id, dtensor_id)
    assert manifests == sorted(f"{i}.json" for i in ids)  # no partial manifests left behind

    # the writing was split: each rank wrote and copied close to half of the bytes
    stats = [r["replicated_stats"] for r in reports]
    per_rank = stats[0]["rank_new_bytes"]
    assert per_rank == stats[1]["rank_new_bytes"] and len(per_rank) == WORLD
    assert sum(per_rank) == stats[0]["new_bytes"]
    logical = sum(t.nbytes for t in replicated_state()["model"].values())
    for rank in range(WORLD):
        assert 0.4 * logical <= per_rank[rank] <= 0.6 * logical + 1024, per_rank
        assert 0.4 * logical <= stats[rank]["bytes_copied"] <= 0.6 * logical, stats
    assert stats[0]["bytes_copied"] + stats[1]["bytes_copied"] == logical

    with AsyncCheckpointer(store) as reader:
        # 2→1, replicated: rank 0's non-tensor values, every tensor bit-exact
        same(replicated_state(), reader.load(replicated_id))
        manifest = reader.manifest(replicated_id)
        assert manifest.metadata == {"rank": 0} and manifest.step == 3 and manifest.version == 1
        assert len(manifest.objects) >= WORLD  # at least one pack per rank

        # 2→1, sharded: the global tensor, assembled from both ranks' blocks
        manifest = reader.manifest(sharded_id)
        assert manifest.version == 2
        entry = manifest.tensors["emb"]
        assert entry.shape == (ROWS, COLS) and entry.nbytes == ROWS * COLS * 8
        assert [(s.offsets, s.shape) for s in entry.shards] == [
            ((0, 0), (SPLIT, COLS)),
            ((SPLIT, 0), (ROWS - SPLIT, COLS)),
        ]
        assert reports[0]["sharded_new_bytes"][0] > 0 and reports[0]["sharded_new_bytes"][1] > 0
        same({"emb": global_tensor(), "head": torch.full((4,), 2.0)}, reader.load(sharded_id))

        # 2→3: each of three ranks asks for its rows, spanning both saved blocks
        for rank in range(3):
            lo, hi = rows(rank, 3)
            got = reader.load(sharded_id, shards={"emb": ((lo, 0), (hi - lo, COLS))})["emb"]
            assert isinstance(got, Shard) and got.offsets == (lo, 0)
            same(global_tensor()[lo:hi].contiguous(), got.local)
        assert verify(store, sharded_id).ok

        # DTensors: column blocks from both ranks; the replicated one written by rank 0 only
        same({"cols": global_tensor(), "copy": global_tensor()}, reader.load(dtensor_id))
        manifest = reader.manifest(dtensor_id)
        cols = manifest.tensors["cols"]
        assert [(s.offsets, s.shape) for s in cols.shards] == [
            ((0, 0), (ROWS, 3)),
            ((0, 3), (ROWS, 3)),
        ]
        assert [s.offsets for s in manifest.tensors["copy"].shards] == [(0, 0)]

    # the fault on rank 1: both ranks' result() raised; rank 1 its own OSError
    assert reports[1]["fault"].startswith("OSError: [Errno 28] injected on rank 1")
    assert reports[0]["fault"].startswith("CheckpointError: checkpoint ")
    assert "rank 1 failed: OSError" in reports[0]["fault"]
