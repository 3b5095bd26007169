"""Verification: re-read every object of a checkpoint and check every hash.

A sharded tensor is checked block by block; a damaged block is reported by the name
:meth:`Manifest.stored` gives it, ``path@[offsets]``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tlreg.ckpt.errors import UnsupportedFormat
from tlreg.ckpt.hashing import hasher
from tlreg.ckpt.manifest import Manifest, TensorEntry, read_manifest
from tlreg.ckpt.objects import iter_chunks, read_layout, relocation_key
from tlreg.ckpt.validate import check_objects
from tlreg.storage_backends import ObjectNotFound, Store, open_store


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` when nothing is damaged or missing."""

    manifest_id: str
    damaged_tensors: list[str] = field(default_factory=list)
    """Paths of tensors (``path@[offsets]`` for a shard) whose bytes do not match their hash."""
    missing_tensors: list[str] = field(default_factory=list)
    """Paths of tensors whose object is missing or unreadable."""
    damaged_objects: list[str] = field(default_factory=list)
    """Objects whose bytes do not match their name, or are truncated or malformed."""
    missing_objects: list[str] = field(default_factory=list)
    """Objects with no (complete) ``zarr.json`` or a missing chunk."""
    checked_bytes: int = 0
    """Object bytes read."""

    @property
    def ok(self) -> bool:
        """Whether every object and tensor checked out."""
        return not (
            self.damaged_tensors
            or self.missing_tensors
            or self.damaged_objects
            or self.missing_objects
        )

    @property
    def problems(self) -> list[str]:
        """One line per finding, for people."""
        return (
            [f"missing object {h}" for h in self.missing_objects]
            + [f"damaged object {h}" for h in self.damaged_objects]
            + [f"missing tensor {p}" for p in self.missing_tensors]
            + [f"damaged tensor {p}" for p in self.damaged_tensors]
        )

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data (for ``--json`` output)."""
        return {
            "manifest": self.manifest_id,
            "ok": self.ok,
            "damaged_tensors": list(self.damaged_tensors),
            "missing_tensors": list(self.missing_tensors),
            "damaged_objects": list(self.damaged_objects),
            "missing_objects": list(self.missing_objects),
            "checked_bytes": self.checked_bytes,
            "problems": self.problems,
        }


def verify(store: str | Store, manifest_id: str, *, threads: int = 8) -> VerifyReport:
    """Re-read every object of checkpoint ``manifest_id`` in ``store`` (a :class:`Store` or
    a store URL) and check all hashes.

    The manifest passes every check a reader makes first (:mod:`tlreg.ckpt.validate`); then
    each object must hash to its name and each tensor's bytes to the tensor's hash. Raises
    like :func:`read_manifest` if the manifest itself is missing or malformed; damage in the
    objects is reported, not raised.
    """
    if isinstance(store, str):
        opened = open_store(store)
        try:
            return verify(opened, manifest_id, threads=threads)
        finally:
            opened.close()
    manifest = read_manifest(store, manifest_id)
    report = VerifyReport(manifest_id)
    stored = list(manifest.stored())
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="tlreg-ckpt-verify") as pool:
        results = list(
            pool.map(lambda d: _check_object(store, manifest, stored, d), manifest.objects)
        )
    for digest, (status, read, bad) in zip(manifest.objects, results, strict=True):
        report.checked_bytes += read
        members = [p for p, e in stored if e.object == digest and e.nbytes]
        if status == "missing":
            report.missing_objects.append(digest)
            report.missing_tensors.extend(members)
        else:
            if status == "damaged":
                report.damaged_objects.append(digest)
            report.damaged_tensors.extend(p for p in members if p in bad)
    return report


def quick_check(store: str | Store, manifest_id: str, *, threads: int = 8) -> Manifest:
    """The checks that read no tensor byte: the manifest passes every check a reader makes
    (:mod:`tlreg.ckpt.validate`) and every object it lists exists with as many bytes as it
    says (the store's listing and sizes). Returns the manifest; raises like
    :func:`read_manifest`, and :class:`CorruptCheckpoint` naming the first object that fails.

    What ``tlreg branch`` and ``tlreg tag`` run before they point a name at a checkpoint.
    """
    if isinstance(store, str):
        opened = open_store(store)
        try:
            return quick_check(opened, manifest_id, threads=threads)
        finally:
            opened.close()
    manifest = read_manifest(store, manifest_id)
    name = f"checkpoint {manifest_id}"
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="tlreg-ckpt-check") as pool:
        check_objects(store, manifest.objects, name, pool=pool, moved=_relocated(store))
    return manifest


def _relocated(store: Store) -> Callable[[str], bool]:
    """Whether a missing object was moved by a repack (its relocation record exists)."""
    return lambda digest: store.exists(relocation_key(digest))


def _check_object(
    store: Store, manifest: Manifest, stored: list[tuple[str, TensorEntry]], digest: str
) -> tuple[str, int, set[str]]:
    """``(status, bytes read, damaged tensor names)``; status is ok, damaged or missing."""
    try:
        layout = read_layout(store, digest)
    except ObjectNotFound:
        return "missing", 0, set()
    except UnsupportedFormat:
        return "damaged", 0, {p for p, e in stored if e.object == digest}
    members = [(p, e) for p, e in stored if e.object == digest and e.nbytes]
    # each distinct (offset, nbytes, hash) once: deduplicated tensors share their bytes
    spans: dict[tuple[int, int, str], list[str]] = {}
    for path, e in members:
        spans.setdefault((e.offset, e.nbytes, e.hash), []).append(path)
    by_chunk: dict[int, list[tuple[tuple[int, int, str], int, int]]] = {}
    for span in spans:
        offset, nbytes, _ = span
        if offset + nbytes > layout.nbytes:
            continue  # cannot be read at all: reported as damaged below
        for index, start, n in layout.pieces(offset, nbytes):
            by_chunk.setdefault(index, []).append((span, start, n))
    hashers = {span: hasher(span[1]) for span in spans}
    whole = hasher(layout.nbytes)
    status, read = "ok", 0
    try:
        for index, data in enumerate(iter_chunks(store, digest, layout)):
            read += len(data)
            logical = min(layout.chunk, layout.nbytes - index * layout.chunk)
            if len(data) != layout.chunk:
                status = "damaged"
            whole.update(data[:logical])
            for span, start, n in by_chunk.get(index, []):
                hashers[span].update(data[start : start + n])
    except ObjectNotFound:
        # its zarr.json exists: a lost chunk, or a damaged chunk size that names too many
        return "damaged", read, {p for p, _ in members}
    if whole.hexdigest() != digest or layout.nbytes != manifest.objects[digest]:
        status = "damaged"
    bad = {
        path
        for span, paths in spans.items()
        if hashers[span].hexdigest() != span[2] or span[0] + span[1] > layout.nbytes
        for path in paths
    }
    return status, read, bad
