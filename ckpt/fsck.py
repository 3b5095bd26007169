"""Checking a whole store, like ``git fsck``: every kept checkpoint, every object once.

:func:`check_store` walks the manifests of the checkpoints it is given (the registry's kept
ones), maps every tensor to the object that holds its bytes now (following the records that
:mod:`~tlreg.ckpt.repack` leaves), and then checks each object once, however many
checkpoints share it:

- in full mode every byte is read: the object must hash to its name and each tensor's bytes
  to the tensor's hash (:func:`tlreg.ckpt.verify`'s object check, one object at a time);
- in quick mode (``quick=True``) no object byte is read: manifests are parsed and checked,
  and each object's files must exist with the sizes its layout needs
  (:func:`tlreg.ckpt.validate.object_problem`).

A damaged byte is reported under every checkpoint and tensor that uses it, so a flipped byte
in a checkpoint nobody restores is found before someone needs it. The report also names
orphans (objects in the store that no checkpoint the registry knows references) and pinned
bytes (bytes of stored objects that no kept checkpoint uses: ``tlreg gc`` repacks them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tlreg.ckpt.errors import CheckpointError
from tlreg.ckpt.manifest import (
    MANIFESTS,
    Manifest,
    TensorEntry,
    flat_manifest_key,
    manifest_key,
    read_manifest,
    utc_now,
)
from tlreg.ckpt.objects import is_stored, read_layout, read_relocation, stored_objects
from tlreg.ckpt.repack import Span, live_bytes
from tlreg.ckpt.validate import object_problem
from tlreg.ckpt.verify import VerifyReport, _check_object
from tlreg.storage_backends import ObjectNotFound, Store


@dataclass
class StoreReport:
    """What :func:`check_store` found; ``ok`` when every kept checkpoint is whole."""

    quick: bool
    checkpoints: int = 0
    """Kept checkpoints checked."""
    objects: int = 0
    """Distinct objects checked."""
    checked_bytes: int = 0
    """Object bytes read (0 in quick mode)."""
    broken: dict[str, VerifyReport] = field(default_factory=dict)
    """Checkpoint id -> what is wrong with it (only checkpoints with a problem)."""
    unreadable: dict[str, str] = field(default_factory=dict)
    """Checkpoint id -> why its manifest cannot be read."""
    orphans: list[str] = field(default_factory=list)
    """Stored objects that no checkpoint the registry knows references (a crashed save's,
    or a save still running; ``tlreg gc`` deletes them after the grace)."""
    pinned_bytes: int = 0
    """Bytes of stored objects that no kept checkpoint uses (``tlreg gc`` repacks them)."""
    live_bytes: int = 0
    """Bytes of stored objects that kept checkpoints use."""

    @property
    def ok(self) -> bool:
        """Whether every kept checkpoint is whole (orphans and pinned bytes are not damage)."""
        return not (self.broken or self.unreadable)

    @property
    def problems(self) -> list[str]:
        """One line per finding, for people."""
        lines = [f"checkpoint {c}: {why}" for c, why in sorted(self.unreadable.items())]
        for checkpoint, report in sorted(self.broken.items()):
            lines += [f"checkpoint {checkpoint}: {p}" for p in report.problems]
        return lines

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (for ``--json`` output)."""
        return {
            "ok": self.ok,
            "quick": self.quick,
            "checkpoints": self.checkpoints,
            "objects": self.objects,
            "checked_bytes": self.checked_bytes,
            "broken": {c: r.to_json() for c, r in sorted(self.broken.items())},
            "unreadable": dict(sorted(self.unreadable.items())),
            "orphans": list(self.orphans),
            "pinned_bytes": self.pinned_bytes,
            "live_bytes": self.live_bytes,
            "problems": self.problems,
        }


@dataclass
class _Use:
    """One tensor (or shard) of one checkpoint, at its bytes' current place."""

    checkpoint: str
    path: str
    entry: TensorEntry


class _Where:
    """Where an object's ranges live now: the object while stored, else through records."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stored: dict[str, bool] = {}

    def stored(self, digest: str) -> bool:
        if digest not in self._stored:
            self._stored[digest] = is_stored(self.store, digest)
        return self._stored[digest]

    def locate(self, entry: TensorEntry) -> TensorEntry | None:
        digest, offset, seen = entry.object, entry.offset, set()
        while not self.stored(digest):
            if digest in seen:
                return None
            seen.add(digest)
            try:
                record = read_relocation(self.store, digest)
            except CheckpointError:
                return None
            moved = None if record is None else record.find(offset, entry.nbytes)
            if moved is None:
                return entry  # reported missing under its own name
            digest, offset = moved.target, moved.target_offset + (offset - moved.offset)
        return TensorEntry(digest, offset, entry.nbytes, entry.dtype, entry.shape, entry.hash)


def check_store(
    store: Store,
    checkpoints: Iterable[str],
    *,
    registered: Iterable[str] | None = None,
    quick: bool = False,
    threads: int = 8,
    on_object: Callable[[int], None] | None = None,
) -> StoreReport:
    """Check every checkpoint of ``checkpoints`` (manifest ids of the kept checkpoints) and
    every object they use, each object once (see the module docstring).

    ``registered`` lists every object the registry knows (kept or not): stored objects
    outside it are reported as orphans (None skips that listing). ``on_object`` is called
    with the bytes of each object once it is checked, for progress.
    """
    report = StoreReport(quick=quick)
    where = _Where(store)
    uses: dict[str, list[_Use]] = {}
    sizes: dict[str, int] = {}
    for checkpoint in checkpoints:
        report.checkpoints += 1
        try:
            manifest = read_manifest(store, checkpoint)
        except CheckpointError as e:
            report.unreadable[checkpoint] = str(e)
            continue
        for path, entry in manifest.stored():
            if not entry.object or not entry.nbytes:
                continue
            here = where.locate(entry)
            if here is None:
                here = entry
            uses.setdefault(here.object, []).append(_Use(checkpoint, path, here))
            if here.object == entry.object:
                sizes.setdefault(here.object, manifest.objects[entry.object])
    for digest in uses:
        if digest not in sizes and where.stored(digest):
            sizes[digest] = read_layout(store, digest).nbytes  # a repack's target
    report.objects = len(uses)

    def check(digest: str) -> tuple[str, int, set[str]]:
        members = uses[digest]
        if quick:
            problem = object_problem(store, digest, sizes.get(digest, 0))
            if problem is None:
                return "ok", 0, set()
            return ("missing" if problem == "is missing" else "damaged"), 0, set()
        if digest not in sizes:
            return "missing", 0, set()
        # verify's object check, given every use of the object as one manifest's tensors
        names = [(str(i), u.entry) for i, u in enumerate(members)]
        fake = Manifest(
            id="0" * 32, step=None, created=utc_now(), tensors={}, objects={digest: sizes[digest]}
        )
        try:
            return _check_object(store, fake, names, digest)
        except ObjectNotFound:
            return "missing", 0, set()

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="tlreg-fsck") as pool:
        for digest, (status, read, bad) in zip(uses, pool.map(check, uses), strict=True):
            report.checked_bytes += read
            if on_object is not None:
                on_object(sizes.get(digest, 0))
            members = uses[digest]
            for i, use in enumerate(members):
                lost = status == "missing" or (quick and status == "damaged")
                if not (lost or str(i) in bad or status == "damaged"):
                    continue
                found = report.broken.setdefault(use.checkpoint, VerifyReport(use.checkpoint))
                if status == "missing":
                    _add(found.missing_objects, digest)
                    _add(found.missing_tensors, use.path)
                else:
                    if status == "damaged":
                        _add(found.damaged_objects, digest)
                    if str(i) in bad or quick:
                        _add(found.damaged_tensors, use.path)
            spans: set[Span] = {(u.entry.offset, u.entry.nbytes, u.entry.hash) for u in members}
            live = min(live_bytes(spans), sizes.get(digest, 0))
            report.live_bytes += live
            report.pinned_bytes += sizes.get(digest, 0) - live
    if registered is not None:
        known = set(registered)
        listed = stored_objects(store)
        report.orphans = sorted(listed - known)
        # registered objects no kept checkpoint uses (pruned checkpoints' not yet collected)
        report.pinned_bytes += _sizes(store, (listed & known) - uses.keys())
    return report


def _sizes(store: Store, digests: Iterable[str]) -> int:
    """Bytes of the complete objects among ``digests``."""
    total = 0
    for digest in digests:
        try:
            total += read_layout(store, digest).nbytes
        except (ObjectNotFound, CheckpointError):
            continue
    return total


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def verify_checkpoint(store: Store, manifest_id: str, *, threads: int = 8) -> VerifyReport:
    """:func:`tlreg.ckpt.verify` for one checkpoint, whose objects may have been repacked
    (its tensors are checked where their bytes live now). Raises like
    :func:`~tlreg.ckpt.manifest.read_manifest` for a missing or malformed manifest."""
    read_manifest(store, manifest_id)
    found = check_store(store, [manifest_id], threads=threads)
    report = found.broken.get(manifest_id, VerifyReport(manifest_id))
    report.checked_bytes = found.checked_bytes
    return report


def upgrade_store(store: Store, *, on_item: Callable[[int], None] | None = None) -> int:
    """Move manifests kept flat (``manifests/<id>.json``, tlreg before the fan-out) to their
    fanned-out keys; returns how many moved. Each is copied, then the flat file deleted, so a
    crash leaves at most a duplicate that the next run removes; readers find either."""
    moved = 0
    flat = [
        key
        for key in store.list(MANIFESTS)
        if key.count("/") == 1 and key in {flat_manifest_key(key[len(MANIFESTS) + 1 : -5])}
    ]
    for key in flat:
        manifest_id = key[len(MANIFESTS) + 1 : -5]
        store.put(manifest_key(manifest_id), store.get(key))
        store.delete(key)
        moved += 1
        if on_item is not None:
            on_item(1)
    return moved
