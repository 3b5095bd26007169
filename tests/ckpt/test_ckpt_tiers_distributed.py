"""Two real gloo ranks, each with its own node-local tier: every rank writes its share to its
own tier, a persisted save is drained by both and its manifest written by rank 0 last, and a
restart restores from the ranks' tiers (peers send each other their shares) without reading
the shared store.

One spawn runs the cases in order (spawning is the slow part); each rank writes a JSON report.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tlreg.ckpt import AsyncCheckpointer, CheckpointError
from tlreg.ckpt.manifest import manifest_key
from tlreg.ckpt.verify import verify
from tlreg.storage_backends import LocalStore

WORLD = 2


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {f"w{i}": torch.randn(1 << 18, generator=g) for i in range(4)}, "step": seed}


def _objects_on(store: LocalStore) -> set[str]:
    return {k.split("/")[3] for k in store.list("objects") if k.endswith("/zarr.json")}


def _rank_main(rank: int, root: str) -> None:
    tmp = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=WORLD)
    report: dict[str, Any] = {}
    try:
        shared = LocalStore(str(tmp / "shared"))
        tier = LocalStore(str(tmp / f"tier-{rank}"))
        with AsyncCheckpointer(shared, local_tier=tier, process_group=dist.group.WORLD) as ckpt:
            local = ckpt.save(_state(1), step=1, persist=False)
            report["local_id"] = local.result()
            report["tier_objects"] = sorted(_objects_on(tier))
            report["tier_has_manifest"] = tier.exists(manifest_key(report["local_id"]))
            report["shared_keys_after_local"] = len(list(shared.list("")))
            persisted = ckpt.save(_state(2), step=2)
            report["local_before_shared"] = persisted.local.result() is not None
            report["shared_id"] = persisted.result()
            # a rank that did not write the manifest reads it from the shared store, once there
            report["manifest_id"] = persisted.manifest().id
            try:
                local.manifest()
                report["local_manifest_error"] = ""
            except CheckpointError as e:
                report["local_manifest_error"] = str(e)
        dist.barrier()
        # a restart: new checkpointers, nothing in memory; the shared store is unreachable
        # for reads of the local-only checkpoint (it was never drained)
        with AsyncCheckpointer(shared, local_tier=tier, process_group=dist.group.WORLD) as ckpt:
            restored = ckpt.load(report["local_id"])
            report["restored_exact"] = all(
                torch.equal(restored["model"][k], v) for k, v in _state(1)["model"].items()
            )
            report["tiers"] = ckpt.last_load_tiers
            report["local_objects"] = sorted(ckpt.manifest(report["local_id"]).objects)
            again = ckpt.load(report["local_id"])  # now every object is on this rank's tier
            report["tiers_again"] = ckpt.last_load_tiers
            report["again_exact"] = torch.equal(again["model"]["w0"], _state(1)["model"]["w0"])
        # a restart that puts each rank on the other's node: rank 0's tier now holds no
        # manifest of the local-only checkpoint, rank 1's does
        swapped = LocalStore(str(tmp / f"tier-{1 - rank}"))
        with AsyncCheckpointer(shared, local_tier=swapped, process_group=dist.group.WORLD) as c:
            moved = c.load(report["local_id"])
            report["swapped_exact"] = all(
                torch.equal(moved["model"][k], v) for k, v in _state(1)["model"].items()
            )
            report["swapped_tiers"] = c.last_load_tiers
        with AsyncCheckpointer(shared, local_tier=tier, process_group=dist.group.WORLD) as ckpt:
            # rank 1 lost a chunk of its share of the shared checkpoint (its marker stays):
            # it cannot send it, so both ranks read that object from the shared store
            if rank == 1:
                mine = _objects_on(tier) & set(ckpt.manifest(report["shared_id"]).objects)
                (digest,) = mine
                tier.delete(f"objects/{digest[:2]}/{digest[2:4]}/{digest}/c/0")
                report["damaged"] = digest
            shared_state = ckpt.load(report["shared_id"])
            report["shared_exact"] = all(
                torch.equal(shared_state["model"][k], v) for k, v in _state(2)["model"].items()
            )
            report["tiers_damaged"] = ckpt.last_load_tiers
            # each rank prunes its own tier to the local-only checkpoint: rank 0 keeps every
            # object of its manifest, rank 1 (no manifest on its tier) its own share
            ckpt.prune_local([report["local_id"]])
            report["pruned_to"] = sorted(_objects_on(tier))
        report["ok"] = True
    finally:
        (tmp / f"report-{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
    os._exit(0)  # (see test_ckpt_distributed.py: no interpreter teardown in a spawned rank)


def test_ranks_write_their_shares_locally_drain_together_and_restore_from_their_peers(
    tmp_path: Path, same: Any
) -> None:
    mp.start_processes(_rank_main, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(WORLD)]
    assert all(r.get("ok") for r in reports), reports
    r0, r1 = reports
    assert r0["local_id"] == r1["local_id"] and r0["shared_id"] == r1["shared_id"]
    # each rank wrote its own share, on its own tier; rank 0's tier holds the manifest
    assert r0["tier_objects"] and r1["tier_objects"]
    assert not set(r0["tier_objects"]) & set(r1["tier_objects"])
    assert (r0["tier_has_manifest"], r1["tier_has_manifest"]) == (True, False)
    assert r0["shared_keys_after_local"] == r1["shared_keys_after_local"] == 0
    assert r0["manifest_id"] == r1["manifest_id"] == r0["shared_id"]
    assert r0["local_manifest_error"] == ""
    assert r1["local_manifest_error"] == (
        f"checkpoint {r0['local_id']} is a local-only save: its manifest is on rank 0's local "
        "tier only; read it on rank 0, or load it with AsyncCheckpointer.load on every rank"
    )

    shared = LocalStore(str(tmp_path / "shared"))
    # the local-only checkpoint never reached the shared store; the persisted one did, whole
    assert not shared.exists(manifest_key(r0["local_id"]))
    assert verify(shared, r0["shared_id"]).ok
    with AsyncCheckpointer(shared) as plain:
        same(plain.load(r0["shared_id"]), _state(2))

    # the restart read nothing from the shared store: its own share locally, the other's
    # from the peer; a second restore is all local
    for r in reports:
        assert r["restored_exact"] and r["again_exact"]
        assert r["swapped_exact"] and r["swapped_tiers"]["shared"] == 0
        assert r["tiers"]["shared"] == 0 and r["tiers"]["local"] > 0 and r["tiers"]["peer"] > 0
        assert r["shared_exact"]
        assert r["tiers_damaged"]["shared"] > 0 or r is r1  # rank 1 counts its marker local
        assert r["pruned_to"] == (r["local_objects"] if r is r0 else r1["tier_objects"])
        assert r["tiers_again"] == {
            "local": r["tiers"]["local"] + r["tiers"]["peer"],
            "peer": 0,
            "shared": 0,
        }


def _dying_rank_main(rank: int, root: str) -> None:
    """Rank 1 dies once the save is local-safe, before its slow drain is done."""
    tmp = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=WORLD)
    shared = LocalStore(str(tmp / "shared"))
    tier = LocalStore(str(tmp / f"tier-{rank}"))
    ckpt = AsyncCheckpointer(
        shared,
        local_tier=tier,
        process_group=dist.group.WORLD,
        collective_timeout=timedelta(seconds=20),
        drain_bytes_per_s=None if rank == 0 else 1 << 16,  # rank 1: 1 MiB takes ~16 s
    )
    pending = ckpt.save(_state(3), step=3)
    manifest_id = pending.local.result()
    if rank == 1:
        os._exit(0)  # a dead node: no drain, no exchange
    report: dict[str, Any] = {"local_id": manifest_id}
    try:
        pending.result(timeout=60)
        report["committed"] = ""
    except CheckpointError as e:
        report["committed"] = str(e)
    report["local_done"] = pending.local.exception() is None
    report["on_tier"] = tier.exists(manifest_key(manifest_id))
    (tmp / "report-0.json").write_text(json.dumps(report))
    os._exit(0)  # (the group is broken: no teardown)


def test_a_rank_that_dies_before_draining_leaves_the_checkpoint_on_the_local_tier(
    tmp_path: Path,
) -> None:
    mp.start_processes(_dying_rank_main, args=(str(tmp_path),), nprocs=WORLD, start_method="spawn")
    report = json.loads((tmp_path / "report-0.json").read_text())
    manifest_id = report["local_id"]
    assert report["local_done"] and report["on_tier"]
    assert report["committed"].startswith(f"checkpoint {manifest_id} stayed on the local tier")
    # the shared store holds no manifest: nobody sees a checkpoint whose share never arrived
    assert not LocalStore(str(tmp_path / "shared")).exists(manifest_key(manifest_id))
