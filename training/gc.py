"""Garbage collection: the registry decides what is unreferenced, this deletes the bytes.

The protocol (see ``Registry.gc_plan``/``apply_gc``/``forget_objects``) is crash-safe: the
registry first marks pruned checkpoints and "doomed" keys (commits that reference them are
refused), then the bytes are deleted here, then the registry forgets the keys. A crash in
between leaves doomed keys that the next collection hands out again. Objects and manifests
the registry has never heard of (a save that crashed before its commit) are deleted only
after they have been seen for ``grace``: listing them records when they were first seen, so
no file timestamps are needed (S3 has none worth trusting).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from tlreg.ckpt.manifest import manifest_key, stored_manifests
from tlreg.ckpt.objects import delete_object, stored_objects
from tlreg.registry import GcPlan, Registry
from tlreg.storage_backends import Store


def collect_garbage(
    registry: Registry,
    store: Store,
    *,
    keep_last: int | None = None,
    grace: timedelta = timedelta(hours=24),
    dry_run: bool = False,
) -> GcPlan:
    """Prune what the retention rules allow and delete unreferenced bytes from ``store``.

    Never touches tagged checkpoints, branch heads, branch bases, or (without ``keep_last``)
    any ancestor of a live branch. Returns what was (or, with ``dry_run``, would be) deleted.
    """
    plan = registry.gc_plan(
        keep_last=keep_last,
        grace=grace,
        store_objects=stored_objects(store),
        store_manifests=stored_manifests(store),
    )
    # A put killed mid-way leaves a temporary file or an open multipart upload, never an
    # object: nothing refers to it, and only its age tells it from a put still running.
    abandoned = store.sweep_abandoned(plan.created - grace, dry_run=dry_run)
    if dry_run:
        return dataclasses.replace(plan, abandoned=abandoned)
    done = registry.apply_gc(plan)
    for digest, _nbytes in done.objects:
        delete_object(store, digest)
    for digest in done.orphan_objects:
        delete_object(store, digest)
    for manifest_id in done.orphan_manifests:
        store.delete(manifest_key(manifest_id))
    registry.forget_objects(
        [h for h, _ in done.objects] + list(done.orphan_objects),
        manifests=done.orphan_manifests,
    )
    return dataclasses.replace(done, abandoned=abandoned)
