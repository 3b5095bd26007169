"""The manifest: the immutable JSON document that makes a set of objects one checkpoint.

``manifests/<id>.json``::

    {"format": "tlreg.manifest", "version": 1, "id": "<32 hex>", "step": 100,
     "created": "2025-01-01T00:00:00.000000+00:00", "metadata": {...}, "tree": {...},
     "tensors": {"model/fc.weight": {"object": "<hash>", "offset": 0, "nbytes": 4096,
                                     "dtype": "float32", "shape": [32, 32], "hash": "<hash>"}},
     "objects": {"<hash>": 67108864}}

``tree`` is the state's structure (see :mod:`tlreg.ckpt.tree`), ``tensors`` maps every tensor
path to where its bytes live (an object and a byte offset in it) and the BLAKE3 hash of those
bytes, and ``objects`` lists every object the checkpoint references with its size. A
zero-byte tensor has ``object: ""`` and is never read.

Version 2 adds **sharded tensors** (saved as per-rank blocks, see :class:`tlreg.ckpt.Shard`).
Their entry describes the global tensor and lists its blocks, each stored like a tensor::

    "model/emb": {"object": "", "offset": 0, "nbytes": 8192, "dtype": "float32",
                  "shape": [64, 32], "hash": "<hash of the shard list>",
                  "shards": [{"offsets": [0, 0], "shape": [32, 32], "object": "<hash>",
                              "offset": 0, "nbytes": 4096, "hash": "<hash>"},
                             {"offsets": [32, 0], "shape": [32, 32], ...}]}

``shape``/``nbytes`` are the global tensor's, the shards tile it exactly once (sorted by
offsets), and ``hash`` is the BLAKE3 digest of the JSON list ``[[offsets, shape, hash], ...]``
of its shards, so equal shardings of equal data compare equal. A manifest is written with
the lowest version that can express it: one without sharded tensors is still version 1 and
every earlier tlreg reads it; this one reads versions 1 and 2.

The file ends with ``"checksum": "<BLAKE3 of the document before it>"``, and the file must be
exactly what this module writes (compact JSON, keys in the written order). Together the two
make every damaged byte an error: a flipped digit that still parses (a step, a shape, a
tensor name) fails the checksum, and a flip that parses to the same values fails the byte
comparison. Manifest ids are not content hashes, so the checksum is the only guard.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tlreg.ckpt.errors import CheckpointNotFound, CorruptCheckpoint, UnsupportedFormat
from tlreg.ckpt.hashing import hash_bytes
from tlreg.storage_backends import ObjectNotFound, Store

FORMAT = "tlreg.manifest"
VERSION = 2
"""The newest manifest version this tlreg reads and writes."""
MANIFESTS = "manifests"

_ID = re.compile(r"^[0-9a-f]{32}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ShardEntry:
    """One block of a sharded tensor: where it sits in the global tensor and where it is stored.

    Its bytes are the block as a contiguous tensor of the entry's dtype, stored like an
    unsharded tensor (an object, a byte offset in it, a length and a BLAKE3 hash).
    """

    offsets: tuple[int, ...]
    """Position of the block in the global tensor, per dimension."""
    shape: tuple[int, ...]
    """Shape of the block."""
    object: str
    """Hash of the object holding the bytes ('' for an empty block)."""
    offset: int
    """Byte offset of the block in the object."""
    nbytes: int
    """Length of the block's bytes."""
    hash: str
    """BLAKE3 hex digest of the block's bytes."""

    @property
    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(offsets, shape)``."""
        return self.offsets, self.shape

    def piece(self, dtype: str) -> TensorEntry:
        """The block as an unsharded entry of ``dtype`` (to read it like any tensor)."""
        return TensorEntry(self.object, self.offset, self.nbytes, dtype, self.shape, self.hash)

    def to_json(self) -> dict[str, Any]:
        """The shard as it appears in the manifest."""
        return {
            "offsets": list(self.offsets),
            "shape": list(self.shape),
            "object": self.object,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardEntry:
        """Parse a shard; ``ValueError``/``KeyError``/``TypeError`` if malformed."""
        shard = cls(
            offsets=tuple(_nonneg(n) for n in data["offsets"]),
            shape=tuple(_nonneg(n) for n in data["shape"]),
            object=_str(data["object"]),
            offset=_nonneg(data["offset"]),
            nbytes=_nonneg(data["nbytes"]),
            hash=_str(data["hash"]),
        )
        if not _HASH.match(shard.hash) or (shard.object and not _HASH.match(shard.object)):
            raise ValueError(f"bad hash in shard {dict(data)}")
        if len(shard.offsets) != len(shard.shape):
            raise ValueError(f"shard offsets and shape differ in length in {dict(data)}")
        return shard


def shards_digest(shards: Iterable[ShardEntry]) -> str:
    """The ``hash`` of a sharded tensor: BLAKE3 of its ``[[offsets, shape, hash], ...]``."""
    doc = [[list(s.offsets), list(s.shape), s.hash] for s in shards]
    return hash_bytes(json.dumps(doc, separators=(",", ":")).encode())


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live and what they are."""

    object: str
    """Hash of the object holding the bytes ('' for a zero-byte tensor)."""
    offset: int
    """Byte offset of the tensor in the object."""
    nbytes: int
    """Length of the tensor's bytes."""
    dtype: str
    """Torch dtype name, e.g. ``bfloat16`` (see :data:`tlreg.ckpt.dtypes.DTYPES`)."""
    shape: tuple[int, ...]
    """Tensor shape; ``()`` for a 0-d tensor."""
    hash: str
    """BLAKE3 hex digest of the tensor's bytes (of its shard list when sharded)."""
    shards: tuple[ShardEntry, ...] = ()
    """The blocks of a sharded tensor, sorted by offsets; ``()`` for an unsharded one, whose
    bytes are at ``object``/``offset``. ``shape`` and ``nbytes`` are the global tensor's."""

    @property
    def sharded(self) -> bool:
        """Whether the tensor was saved as shards."""
        return bool(self.shards)

    def pieces(self) -> list[ShardEntry]:
        """Every stored block of the tensor (an unsharded tensor is one block at offset 0)."""
        if self.shards:
            return list(self.shards)
        origin = (0,) * len(self.shape)
        return [ShardEntry(origin, self.shape, self.object, self.offset, self.nbytes, self.hash)]

    def to_json(self) -> dict[str, Any]:
        """The entry as it appears in the manifest."""
        doc: dict[str, Any] = {
            "object": self.object,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "hash": self.hash,
        }
        if self.shards:
            doc["shards"] = [s.to_json() for s in self.shards]
        return doc

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorEntry:
        """Parse an entry; ``ValueError``/``KeyError``/``TypeError`` if malformed."""
        entry = cls(
            object=_str(data["object"]),
            offset=_nonneg(data["offset"]),
            nbytes=_nonneg(data["nbytes"]),
            dtype=_str(data["dtype"]),
            shape=tuple(_nonneg(n) for n in data["shape"]),
            hash=_str(data["hash"]),
            shards=tuple(ShardEntry.from_json(s) for s in data.get("shards", ())),
        )
        if not _HASH.match(entry.hash) or (entry.object and not _HASH.match(entry.object)):
            raise ValueError(f"bad hash in {dict(data)}")
        if entry.shards and entry.object:
            raise ValueError(f"a sharded entry names an object of its own: {dict(data)}")
        if any(len(s.offsets) != len(entry.shape) for s in entry.shards):
            raise ValueError(f"shards of another rank than the tensor in {dict(data)}")
        return entry


@dataclass(frozen=True)
class Manifest:
    """One checkpoint: its tensors' locations, the objects they live in, and its structure."""

    id: str
    step: int | None
    created: datetime
    """When the save was made (timezone-aware, UTC)."""
    tensors: dict[str, TensorEntry]
    objects: dict[str, int]
    """Every object the checkpoint references: hash -> size in bytes."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The caller's JSON metadata."""
    tree: Any = None
    """The state's structure, see :mod:`tlreg.ckpt.tree`."""
    version: int = 1
    """Format version: 1, or 2 when some tensor is sharded (see :func:`format_version`)."""

    @property
    def logical_bytes(self) -> int:
        """Bytes of all tensors, whether or not this checkpoint wrote them."""
        return sum(e.nbytes for e in self.tensors.values())

    def stored(self) -> Iterator[tuple[str, TensorEntry]]:
        """Every stored block with a name for people: an unsharded tensor under its path,
        each shard of a sharded tensor as ``path@[offsets]`` (an entry of the block's shape)."""
        for path, entry in self.tensors.items():
            if not entry.shards:
                yield path, entry
                continue
            for shard in entry.shards:
                yield f"{path}@{list(shard.offsets)}", shard.piece(entry.dtype)

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (key order kept: it is the state's order)."""
        return {
            "format": FORMAT,
            "version": self.version,
            "id": self.id,
            "step": self.step,
            "created": self.created.isoformat(),
            "metadata": self.metadata,
            "tree": self.tree,
            "tensors": {path: e.to_json() for path, e in self.tensors.items()},
            "objects": dict(self.objects),
        }

    def to_bytes(self) -> bytes:
        """The manifest file's content (UTF-8 JSON, standard: no NaN literals, checksummed)."""
        doc = self.to_json()
        return _dumps({**doc, "checksum": hash_bytes(_dumps(doc))})

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any] | str | bytes, *, name: str = "manifest"
    ) -> Manifest:
        """Parse a manifest document.

        Raises :class:`UnsupportedFormat` for another format or a newer version and
        :class:`CorruptCheckpoint` (naming ``name``) for anything malformed. A document given
        as text or bytes (a file) must also carry a matching checksum; a mapping is taken as
        already parsed from a trusted place.
        """
        raw = data.encode() if isinstance(data, str) else data
        try:
            if isinstance(data, str | bytes):
                data = json.loads(data)
            if not isinstance(data, Mapping):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as e:
            raise CorruptCheckpoint(
                f"{name} is not valid JSON ({e}); the file is damaged, restore it from a copy"
            ) from None
        fmt, version = data.get("format"), data.get("version")
        if fmt != FORMAT:
            raise UnsupportedFormat(
                f"{name} is not a tlreg manifest (format {fmt!r}): it is damaged or another tool "
                "wrote it; restore it from a copy"
            )
        if type(version) is not int or version < 1:
            raise CorruptCheckpoint(f"{name} has no valid version ({version!r})")
        if version > VERSION:
            # A flipped bit can make a version number too: only an intact file is "newer".
            if isinstance(raw, bytes) and not _intact(data, raw):
                raise CorruptCheckpoint(
                    f"{name} claims format version {version} and fails this tlreg's checksum: "
                    "it is damaged, or a newer tlreg wrote it (then upgrade tlreg)"
                )
            raise UnsupportedFormat(
                f"{name} has format version {version}, written by a newer tlreg "
                f"(this one reads up to {VERSION}); upgrade tlreg to read it"
            )
        if isinstance(raw, bytes):
            _check_integrity(data, raw, name)
        try:
            step = data["step"]
            if step is not None and type(step) is not int:
                raise TypeError(f"step {step!r}")
            created = datetime.fromisoformat(_str(data["created"]))
            if created.tzinfo is None:
                raise ValueError("created has no timezone")
            metadata = data.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise TypeError("metadata is not an object")
            tensors = {_str(p): TensorEntry.from_json(e) for p, e in data["tensors"].items()}
            objects = {_str(h): _nonneg(n) for h, n in data["objects"].items()}
            if not all(_HASH.match(h) for h in objects):
                raise ValueError("bad object hash")
            if version < 2 and any(e.shards for e in tensors.values()):
                raise ValueError("sharded tensors in a version 1 manifest")
            referenced = {s.object for e in tensors.values() for s in e.pieces() if s.object}
            missing = referenced - objects.keys()
            if missing:
                raise ValueError(f"tensors reference unlisted objects {sorted(missing)[:3]}")
            manifest_id = _str(data["id"])
            if not _ID.match(manifest_id):
                raise ValueError(f"bad id {manifest_id!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpoint(
                f"{name} is malformed ({type(e).__name__}: {e}); it cannot be loaded"
            ) from None
        return cls(
            id=manifest_id,
            step=step,
            created=created,
            tensors=tensors,
            objects=objects,
            metadata=metadata,
            tree=data.get("tree"),
            version=version,
        )


def _dumps(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _intact(doc: Mapping[str, Any], raw: bytes) -> bool:
    """Whether ``raw`` is byte for byte the document tlreg wrote, with a matching checksum."""
    checksum = doc.get("checksum")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    try:
        return hash_bytes(_dumps(body)) == checksum and _dumps(doc) == raw
    except ValueError:  # NaN or Infinity literals: never written by tlreg
        return False


def _check_integrity(doc: Mapping[str, Any], raw: bytes, name: str) -> None:
    """Raise :class:`CorruptCheckpoint` unless ``raw`` is exactly the checksummed ``doc``."""
    checksum = doc.get("checksum")
    if not isinstance(checksum, str) or not _HASH.match(checksum):
        raise CorruptCheckpoint(
            f"{name} has no valid checksum; it is damaged or was not written by tlreg"
        )
    if not _intact(doc, raw):
        raise CorruptCheckpoint(
            f"{name} fails its checksum: the file is damaged; "
            "restore it from a copy, or delete the branch that holds it"
        )


def format_version(tensors: Mapping[str, TensorEntry]) -> int:
    """The lowest manifest version that can hold ``tensors``: 2 with sharded ones, else 1."""
    return 2 if any(e.shards for e in tensors.values()) else 1


def _str(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _nonneg(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def manifest_key(manifest_id: str) -> str:
    """The store key of a manifest."""
    return f"{MANIFESTS}/{manifest_id}.json"


def stored_manifests(store: Store) -> set[str]:
    """Ids of every manifest in ``store`` (for garbage collection)."""
    return {
        key.removeprefix(f"{MANIFESTS}/").removesuffix(".json")
        for key in store.list(MANIFESTS)
        if key.endswith(".json") and _ID.match(key.removeprefix(f"{MANIFESTS}/")[:-5])
    }


def read_manifest(store: Store, manifest_id: str) -> Manifest:
    """Read and parse the manifest ``manifest_id`` from ``store``.

    Raises :class:`CheckpointNotFound` if it does not exist, :class:`UnsupportedFormat` if a
    newer tlreg wrote it and :class:`CorruptCheckpoint` if it is malformed.
    """
    if not isinstance(manifest_id, str) or not _ID.match(manifest_id):
        raise CheckpointNotFound(
            f"{manifest_id!r} is not a checkpoint manifest id (32 hex digits); "
            "list the store's manifests/ or ask the registry for the id"
        )
    try:
        raw = store.get(manifest_key(manifest_id))
    except ObjectNotFound:
        raise CheckpointNotFound(
            f"no checkpoint manifest {manifest_id} in {store.url}; check the id and the store URL"
        ) from None
    manifest = Manifest.from_json(raw, name=f"manifest {manifest_id} in {store.url}")
    if manifest.id != manifest_id:
        raise CorruptCheckpoint(
            f"manifest {manifest_id} in {store.url} claims id {manifest.id}; "
            "it was renamed or damaged"
        )
    return manifest


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write ``manifest`` (atomically, as every store put is); this is the checkpoint's commit."""
    store.put(manifest_key(manifest.id), manifest.to_bytes())


_id_lock = threading.Lock()
_last_id = (0, 0)


def new_manifest_id() -> str:
    """A unique id that sorts by creation time: 48 bits of milliseconds + 80 random bits.

    Within one process ids are strictly increasing even inside one millisecond.
    """
    global _last_id
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _last_id
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
        _last_id = (ms, rand)
    return f"{ms:012x}{rand:020x}"


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)
