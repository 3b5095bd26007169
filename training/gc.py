"""Garbage collection: the registry decides what is unreferenced, this deletes the bytes.

The protocol (see ``Registry.gc_plan``/``apply_gc``/``forget_objects``) is crash-safe: the
registry first marks pruned checkpoints and "doomed" keys (commits that reference them are
refused), then the bytes are deleted here, then the registry forgets the keys. A crash in
between leaves doomed keys that the next collection hands out again. Objects and manifests
the registry has never heard of (a save that crashed before its commit) are deleted only
after they have been seen for ``grace``: listing them records when they were first seen, so
no file timestamps are needed (S3 has none worth trusting).

Then objects that kept checkpoints still reference but mostly do not use (more than
``max_unused`` of their bytes) are repacked: their live ranges are copied into new objects,
the kept checkpoints are pointed at those, and the old objects are deleted like any other
(see :mod:`tlreg.ckpt.repack` for why readers never see wrong bytes, and crash safety).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from tlreg.ckpt.fsck import StoreReport, check_store
from tlreg.ckpt.manifest import (
    Manifest,
    flat_manifest_key,
    manifest_key,
    read_manifest,
    stored_manifests,
)
from tlreg.ckpt.objects import delete_object, stored_objects
from tlreg.ckpt.repack import DEFAULT_MAX_UNUSED, Span, live_bytes, live_spans, repack
from tlreg.registry import GcPlan, Registry
from tlreg.storage_backends import Store
from tlreg.training.events import ProgressFactory, open_bar


def collect_garbage(
    registry: Registry,
    store: Store,
    *,
    keep_last: int | None = None,
    grace: timedelta = timedelta(hours=24),
    dry_run: bool = False,
    max_unused: float | None = DEFAULT_MAX_UNUSED,
    progress: ProgressFactory | None = None,
    problems: list[str] | None = None,
) -> GcPlan:
    """Prune what the retention rules allow and delete unreferenced bytes from ``store``.

    Never touches tagged checkpoints, branch heads, branch bases, or (without ``keep_last``)
    any ancestor of a live branch. Then repacks every object more than ``max_unused`` (a
    fraction, 0 to 1; None never repacks) of whose bytes no kept checkpoint uses. Returns
    what was (or, with ``dry_run``, would be) deleted and repacked; a dry run's repack
    estimate counts only checkpoints pruned by earlier collections. Objects that could not
    be repacked (damaged or missing) are described in ``problems`` when given.
    """
    if max_unused is not None and not 0 <= max_unused <= 1:
        raise ValueError(f"max_unused must be a fraction from 0 to 1, got {max_unused}")
    plan = registry.gc_plan(
        keep_last=keep_last,
        grace=grace,
        store_objects=stored_objects(store),
        store_manifests=stored_manifests(store),
    )
    # A put killed mid-way leaves a temporary file or an open multipart upload, never an
    # object: nothing refers to it, and only its age tells it from a put still running.
    abandoned = store.sweep_abandoned(plan.created - grace, dry_run=dry_run)
    if not dry_run:
        plan = _delete(registry, store, registry.apply_gc(plan), progress)
    plan = dataclasses.replace(plan, abandoned=abandoned)
    if max_unused is None or max_unused >= 1:
        return plan
    chosen, users = plan_repack(registry, store, max_unused)
    if dry_run or not chosen:
        return dataclasses.replace(
            plan, repacked=tuple((h, n, live_bytes(s)) for h, (n, s) in sorted(chosen.items()))
        )
    total = sum(live_bytes(s) for _, s in chosen.values())
    with open_bar(progress, "repack", total) as bar:
        done, skipped = repack(store, chosen, on_bytes=bar.update)
    if problems is not None:
        problems.extend(skipped)
    moved = set(registry.relocate((r.object, users[r.object], r.targets) for r in done))
    repacked = tuple((r.object, r.nbytes, r.live) for r in done if r.object in moved)
    if not moved:
        return plan
    # the old objects are unreferenced now: the same collection, without a second listing
    again = registry.gc_plan(keep_last=keep_last, grace=grace)
    second = _delete(registry, store, registry.apply_gc(again), progress)
    return dataclasses.replace(
        plan,
        objects=tuple(sorted({*plan.objects, *second.objects})),
        orphan_objects=tuple(sorted({*plan.orphan_objects, *second.orphan_objects})),
        orphan_manifests=tuple(sorted({*plan.orphan_manifests, *second.orphan_manifests})),
        repacked=repacked,
    )


def plan_repack(
    registry: Registry, store: Store, max_unused: float
) -> tuple[dict[str, tuple[int, set[Span]]], dict[str, list[str]]]:
    """The objects to repack (``hash -> (nbytes, live spans)``) and, for each, the kept
    checkpoints whose manifests were read to find its live spans."""
    candidates = registry.repack_candidates()
    manifests: dict[str, Manifest] = {}
    for _, users in candidates.values():
        for checkpoint in users:
            if checkpoint not in manifests:
                manifests[checkpoint] = read_manifest(store, checkpoint)
    spans = live_spans(store, manifests.values(), candidates)
    chosen: dict[str, tuple[int, set[Span]]] = {}
    for digest, (nbytes, _) in candidates.items():
        live = live_bytes(spans[digest])
        # an object none of whose bytes a manifest names is left to the plain collection
        if live and (nbytes - live) > max_unused * nbytes:
            chosen[digest] = (nbytes, spans[digest])
    return chosen, {d: candidates[d][1] for d in chosen}


def _delete(
    registry: Registry, store: Store, done: GcPlan, progress: ProgressFactory | None
) -> GcPlan:
    """Delete what ``apply_gc`` handed out, then let the registry forget it."""
    keys = [h for h, _ in done.objects] + list(done.orphan_objects)
    with open_bar(progress, "delete", len(keys) + len(done.orphan_manifests)) as bar:
        for digest in keys:
            delete_object(store, digest)
            bar.update(1)
        for manifest_id in done.orphan_manifests:
            store.delete(manifest_key(manifest_id))
            store.delete(flat_manifest_key(manifest_id))  # a store written before the fan-out
            bar.update(1)
    registry.forget_objects(keys, manifests=done.orphan_manifests)
    return done


def check_kept(
    registry: Registry,
    store: Store,
    *,
    quick: bool = False,
    progress: ProgressFactory | None = None,
) -> StoreReport:
    """``tlreg verify --all``: every kept (unpruned) checkpoint of ``registry`` and every
    object they use, each once; orphans and pinned bytes reported (see
    :func:`tlreg.ckpt.fsck.check_store`)."""
    with open_bar(progress, "verify", None) as bar:
        return check_store(
            store,
            registry.kept_manifests(),
            registered=registry.known_objects(),
            quick=quick,
            on_object=bar.update,
        )
