"""Restore from the nearest tier with several ranks: peers hand each other their local shares.

With a node-local tier, each rank wrote only its share of a checkpoint to its own node's disk,
and rank 0 its manifest. A collective load (every rank, in the same order) first makes every
rank's local tier whole, from the nearest place that has each object:

1. the lowest rank that can read the manifest (its tier, else the shared store) broadcasts
   its bytes; every rank parses and checks it as a reader of the store would;
2. every rank says which of the manifest's objects its own tier holds (rank 0 gathers);
3. each object some rank lacks is sent by the lowest rank that holds it, chunk by chunk, as
   uint8 tensors on the checkpointer's private gloo group (nothing is pickled), and written to
   the tiers that lacked it; the receivers check its hash before marking it complete;
4. an object no rank holds is read from the shared store by whoever needs it.

The restore that follows reads each rank's own tier, with the usual hash checks. The copies
stay: a second restore of the same checkpoint on the same nodes is all local.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
import torch.distributed as dist

from tlreg.ckpt.collective import Collective
from tlreg.ckpt.errors import CheckpointError
from tlreg.ckpt.hashing import hasher
from tlreg.ckpt.manifest import Manifest, read_manifest
from tlreg.ckpt.objects import ObjectLayout, chunk_key, is_stored, read_layout, write_marker
from tlreg.ckpt.tree import select_subtree, tensor_refs
from tlreg.storage_backends import Store

TIERS = ("local", "peer", "shared")
"""Where a restore's bytes came from: this node's tier, another rank's, the shared store."""


def broadcast_manifest(
    collective: Collective, read: Store, manifest_id: str, manifest: Manifest | None
) -> Manifest:
    """Manifest ``manifest_id`` on every rank, sent by the lowest rank that can read it
    (``manifest``: this rank's copy if it holds one). After a restart, rank 0 may run on
    another node than the rank 0 that wrote a local checkpoint, whose tier alone holds the
    manifest. When no rank can read it, every rank raises with its own reason."""
    found, why = manifest, ""
    if found is None:
        try:
            found = read_manifest(read, manifest_id)
        except CheckpointError as e:
            why = str(e)
    flags = collective.gather(json.dumps(found is not None).encode())
    if flags is not None:
        holders = [rank for rank, flag in enumerate(flags) if json.loads(flag)]
        raw = collective.broadcast(json.dumps(holders[0] if holders else -1).encode())
    else:
        raw = collective.broadcast(None)
    source = int(json.loads(raw))
    if source < 0:
        raise CheckpointError(f"no rank can read the manifest: {why}")
    payload = found.to_bytes() if collective.rank == source and found is not None else b""
    length = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(length, group=collective.group, group_src=source)
    if collective.rank == source:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        buf = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(buf, group=collective.group, group_src=source)
    if collective.rank == source and found is not None:
        return found
    return Manifest.from_json(
        buf.numpy().tobytes(), name=f"manifest {manifest_id} (from rank {source})"
    )


def objects_under(manifest: Manifest, prefix: str | None) -> set[str]:
    """The objects holding the tensors of ``manifest`` under ``prefix`` (all for None)."""
    if prefix is None:
        return set(manifest.objects)
    paths = tensor_refs(select_subtree(manifest.tree, prefix))
    return {
        piece.object
        for path in paths
        if path in manifest.tensors
        for piece in manifest.tensors[path].pieces()
        if piece.object
    }


def tiers_of(local: Store, manifest: Manifest, objects: Iterable[str]) -> dict[str, int]:
    """Object bytes of ``objects`` by the tier a single rank reads them from."""
    tiers = dict.fromkeys(TIERS, 0)
    for digest in objects:
        tiers["local" if is_stored(local, digest) else "shared"] += manifest.objects[digest]
    return tiers


def share_objects(
    collective: Collective, local: Store, shared: Store, manifest: Manifest, objects: Iterable[str]
) -> dict[str, int]:
    """Make ``local`` hold each of ``objects`` (digests of ``manifest``), from a peer's tier
    where one holds it; the object bytes by where they come from (:data:`TIERS`)."""
    wanted = sorted(set(objects))
    mine = [is_stored(local, d) for d in wanted]
    gathered = collective.gather(json.dumps(mine).encode())
    owners: list[int] | None = None
    if gathered is not None:
        held = [json.loads(raw) for raw in gathered]
        owners = [next((r for r, h in enumerate(held) if h[i]), -1) for i in range(len(wanted))]
        needed = [not all(h[i] for h in held) for i in range(len(wanted))]
        plan = [o if n else -2 for o, n in zip(owners, needed, strict=True)]
        raw = collective.broadcast(json.dumps(plan).encode())
    else:
        raw = collective.broadcast(None)
    plan = json.loads(raw)
    tiers = dict.fromkeys(TIERS, 0)
    for digest, have, source in zip(wanted, mine, plan, strict=True):
        nbytes = manifest.objects[digest]
        sent = source >= 0 and _send_object(  # some rank lacks it, some rank holds it
            collective, local, digest, nbytes, source, receive=not have
        )
        if have:
            tiers["local"] += nbytes
        elif sent:
            tiers["peer"] += nbytes
        else:
            tiers["shared"] += nbytes  # no rank holds it whole: read from the shared store
    return tiers


def _send_object(
    collective: Collective, local: Store, digest: str, nbytes: int, source: int, *, receive: bool
) -> bool:
    """Broadcast object ``digest`` from rank ``source``'s tier; a receiving rank writes it to
    its own ``local`` tier (chunks, then the marker once the bytes hash to ``digest``).

    Whether the object arrived whole. A sender that cannot read its copy says so (a length
    of -1) and every rank moves on; a receiver whose copy fails the hash check removes it.
    Either way the restore then reads that object from the shared store.
    """
    sending = collective.rank == source
    layout = ObjectLayout.plan(nbytes)
    chunk = -1
    if sending:
        try:
            layout = read_layout(local, digest)
            chunk = layout.chunk
        except Exception:  # gone or unreadable here: the others read the shared copy
            chunk = -1
    size = torch.tensor([chunk], dtype=torch.int64)
    dist.broadcast(size, group=collective.group, group_src=source)
    if int(size.item()) < 0:
        return False
    layout = ObjectLayout(nbytes, int(size.item()))
    whole = hasher(nbytes)
    written: list[str] = []
    for index in range(layout.nchunks):
        key = chunk_key(digest, index)
        data = b""
        if sending:
            try:
                data = local.get(key)
            except Exception:
                data = b""  # a length of -1 below: the object is abandoned on every rank
        length = torch.tensor([len(data) if data or not sending else -1], dtype=torch.int64)
        dist.broadcast(length, group=collective.group, group_src=source)
        if int(length.item()) < 0:
            _remove(local, written)
            return False
        if sending:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(buf, group=collective.group, group_src=source)
        if receive:
            view = buf.numpy().data.cast("B")
            whole.update(view[: min(layout.chunk, nbytes - index * layout.chunk)])
            local.put(key, view)
            written.append(key)
    if receive:
        if whole.hexdigest() != digest:
            _remove(local, written)
            return False
        write_marker(local, digest, layout)
    return True


def _remove(local: Store, keys: list[str]) -> None:
    for key in keys:
        local.delete(key)
