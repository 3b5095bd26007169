"""Which tensors differ between two checkpoints, from their manifests alone (no tensor reads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tlreg.ckpt.manifest import Manifest


@dataclass(frozen=True, slots=True)
class TensorChange:
    """One tensor path that is not identical in both checkpoints."""

    path: str
    status: str
    """``added`` (only in B), ``removed`` (only in A) or ``changed`` (bytes, dtype or shape)."""
    nbytes_a: int
    nbytes_b: int
    detail: str = ""
    """What changed for a ``changed`` tensor: ``values``, ``dtype a->b``, ``shape a->b``."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return {
            "path": self.path,
            "status": self.status,
            "nbytes_a": self.nbytes_a,
            "nbytes_b": self.nbytes_b,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class ManifestDiff:
    """The tensor-level difference from checkpoint A to checkpoint B."""

    changes: list[TensorChange]
    unchanged: int
    """Tensors with the same path, dtype, shape and content hash in both."""
    unchanged_bytes: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        return {
            "changes": [c.to_json() for c in self.changes],
            "unchanged": self.unchanged,
            "unchanged_bytes": self.unchanged_bytes,
        }


def diff_manifests(a: Manifest, b: Manifest) -> ManifestDiff:
    """Compare two manifests tensor by tensor using the recorded content hashes."""
    changes: list[TensorChange] = []
    unchanged = unchanged_bytes = 0
    for path in sorted(a.tensors.keys() | b.tensors.keys()):
        ea, eb = a.tensors.get(path), b.tensors.get(path)
        if ea is None:
            assert eb is not None
            changes.append(TensorChange(path, "added", 0, eb.nbytes))
        elif eb is None:
            changes.append(TensorChange(path, "removed", ea.nbytes, 0))
        elif ea.dtype != eb.dtype:
            changes.append(
                TensorChange(path, "changed", ea.nbytes, eb.nbytes, f"dtype {ea.dtype}->{eb.dtype}")
            )
        elif ea.shape != eb.shape:
            changes.append(
                TensorChange(
                    path,
                    "changed",
                    ea.nbytes,
                    eb.nbytes,
                    f"shape {list(ea.shape)}->{list(eb.shape)}",
                )
            )
        elif ea.hash != eb.hash:
            changes.append(TensorChange(path, "changed", ea.nbytes, eb.nbytes, "values"))
        else:
            unchanged += 1
            unchanged_bytes += ea.nbytes
    return ManifestDiff(changes, unchanged, unchanged_bytes)
