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
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tlreg.ckpt.errors import (
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    UnsupportedFormat,
)
from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.tree import check_tree
from tlreg.ckpt.validate import (
    HASH,
    ID,
    MAX_DEPTH,
    MAX_INT,
    MAX_MANIFEST_BYTES,
    BadField,
    Fields,
    check_cover,
    check_document,
    check_path,
    show,
    value_depth,
)
from tlreg.storage_backends import ObjectNotFound, Store

FORMAT = "tlreg.manifest"
VERSION = 2
"""The newest manifest version this tlreg reads and writes."""
MANIFESTS = "manifests"

_MANIFEST_KEYS = ("format", "version", "id", "step", "created", "tensors", "objects")
_ENTRY_KEYS = ("object", "offset", "nbytes", "dtype", "shape", "hash")
_SHARD_KEYS = ("offsets", "shape", "object", "offset", "nbytes", "hash")


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
    def from_json(cls, data: Any, field: str = "shard") -> ShardEntry:
        """Parse a shard, each field in its grammar; :class:`BadField` naming the field."""
        Fields.keys(data, field, _SHARD_KEYS)
        offsets = Fields.shape(data["offsets"], f"{field}.offsets")
        shape = Fields.shape(data["shape"], f"{field}.shape")
        if len(offsets) != len(shape):
            raise BadField(f"{field}.offsets", f"{len(offsets)} offsets for {len(shape)} dims")
        digest = data["object"]
        if digest != "":
            Fields.string(digest, f"{field}.object", HASH)
        return cls(
            offsets=offsets,
            shape=shape,
            object=digest,
            offset=Fields.integer(data["offset"], f"{field}.offset"),
            nbytes=Fields.integer(data["nbytes"], f"{field}.nbytes"),
            hash=Fields.string(data["hash"], f"{field}.hash", HASH),
        )


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
    def from_json(cls, data: Any, field: str = "tensor") -> TensorEntry:
        """Parse an entry, each field in its grammar and ``nbytes`` agreeing with its dtype
        and shape (its own and each shard's); :class:`BadField` naming the field."""
        Fields.keys(data, field, _ENTRY_KEYS, ["shards"])
        dtype = Fields.dtype(data["dtype"], f"{field}.dtype")
        shape = Fields.shape(data["shape"], f"{field}.shape")
        nbytes = Fields.nbytes(data["nbytes"], f"{field}.nbytes", dtype, shape)
        digest = data["object"]
        if digest != "":
            Fields.string(digest, f"{field}.object", HASH)
        raw_shards = data.get("shards", [])
        if type(raw_shards) is not list or (("shards" in data) and not raw_shards):
            raise BadField(f"{field}.shards", f"expected a non-empty list, got {show(raw_shards)}")
        shards = tuple(
            ShardEntry.from_json(s, f"{field}.shards[{i}]") for i, s in enumerate(raw_shards)
        )
        for i, shard in enumerate(shards):
            where = f"{field}.shards[{i}]"
            if len(shard.shape) != len(shape):
                raise BadField(f"{where}.shape", f"{len(shard.shape)} dims for {len(shape)}")
            Fields.nbytes(shard.nbytes, f"{where}.nbytes", dtype, shard.shape)
        if shards and (digest or data["offset"] != 0):
            raise BadField(f"{field}.object", "a sharded tensor names no object of its own")
        return cls(
            object=digest,
            offset=Fields.integer(data["offset"], f"{field}.offset"),
            nbytes=nbytes,
            dtype=dtype,
            shape=shape,
            hash=Fields.string(data["hash"], f"{field}.hash", HASH),
            shards=shards,
        )


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
        if isinstance(raw, bytes):
            check_document(raw, name)  # before parsing: bounded memory
        try:
            if isinstance(data, str | bytes):
                data = json.loads(data)
            too_deep = value_depth(data) > MAX_DEPTH
            if not isinstance(data, Mapping):
                raise TypeError("not a JSON object")
        except RecursionError:
            too_deep = True  # deeper than the parser goes
        except (ValueError, TypeError) as e:
            raise CorruptCheckpoint(
                f"{name} is not valid JSON ({show(str(e))}); the file is damaged, "
                "restore it from a copy"
            ) from None
        if too_deep or not isinstance(data, Mapping):
            raise CorruptCheckpoint(
                f"{name} nests JSON deeper than {MAX_DEPTH} levels; "
                "it is damaged or was not written by tlreg"
            )
        fmt, version = data.get("format"), data.get("version")
        if fmt != FORMAT:
            raise UnsupportedFormat(
                f"{name} is not a tlreg manifest (format {show(fmt)}): it is damaged or another "
                "tool wrote it; restore it from a copy"
            )
        if type(version) is not int or version < 1:
            raise CorruptCheckpoint(f"{name} has no valid version ({show(version)})")
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
            return cls._parse(data, version)
        except BadField as e:
            raise CorruptCheckpoint(f"{name} is malformed: {e}; it cannot be loaded") from None

    @classmethod
    def _parse(cls, data: Mapping[str, Any], version: int) -> Manifest:
        """Every field checked on its own terms and against the others (:class:`BadField`)."""
        Fields.keys(data, "", _MANIFEST_KEYS, ["metadata", "tree", "checksum"])
        manifest_id = Fields.string(data["id"], "id", ID)
        step = data["step"]
        if step is not None:
            Fields.integer(step, "step", -MAX_INT - 1)
        stamp = data["created"]
        try:
            if type(stamp) is not str or len(stamp) > 64:
                raise ValueError(stamp)
            created = datetime.fromisoformat(stamp)
        except ValueError:
            raise BadField("created", f"expected an ISO 8601 time, got {show(stamp)}") from None
        if created.tzinfo is None:
            raise BadField("created", f"{stamp} has no timezone")
        metadata = data.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise BadField("metadata", f"expected an object, got {show(metadata)}")
        raw_objects = data["objects"]
        if not isinstance(raw_objects, Mapping):
            raise BadField("objects", f"expected an object, got {show(raw_objects)}")
        objects = {
            Fields.string(h, f"objects[{show(h)}]", HASH): Fields.integer(
                n, f"objects[{show(h)}]", 1
            )
            for h, n in raw_objects.items()
        }
        raw_tensors = data["tensors"]
        if not isinstance(raw_tensors, Mapping):
            raise BadField("tensors", f"expected an object, got {show(raw_tensors)}")
        tensors: dict[str, TensorEntry] = {}
        for path, doc in raw_tensors.items():
            field = f"tensors[{show(path)}]"
            try:
                check_path(path)
            except (TypeError, ValueError) as e:
                raise BadField(field, str(e)) from None
            entry = tensors[path] = TensorEntry.from_json(doc, field)
            if not entry.shards:
                Fields.location(doc, field, entry.nbytes, objects)
                continue
            if version < 2:
                raise BadField(f"{field}.shards", "sharded tensors in a version 1 manifest")
            for i, (shard, shard_doc) in enumerate(zip(entry.shards, doc["shards"], strict=True)):
                Fields.location(shard_doc, f"{field}.shards[{i}]", shard.nbytes, objects)
            check_cover([s.box for s in entry.shards], entry.shape, f"{field}.shards")
            if entry.hash != shards_digest(entry.shards):
                raise BadField(f"{field}.hash", "is not the digest of its shard list")
        tree = data.get("tree")
        if tree is not None and type(tree) is not dict:
            raise BadField("tree", f"expected an object, got {show(tree)}")
        try:
            check_tree(tree, tensors)
        except CorruptCheckpoint as e:
            raise BadField("tree", str(e)) from None
        return cls(
            id=manifest_id,
            step=step,
            created=created,
            tensors=tensors,
            objects=objects,
            metadata=metadata,
            tree=tree,
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
    if not isinstance(checksum, str) or not HASH.fullmatch(checksum):
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


def manifest_key(manifest_id: str) -> str:
    """The store key of a manifest, ``manifests/<id[-2:]>/<id[-4:-2]>/<id>.json``: fanned out
    like ``objects/``, so no directory holds millions of files (ids begin with their creation
    time; their last digits are random). Stores written before the fan-out keep
    :func:`flat_manifest_key` until ``tlreg upgrade`` moves them; readers look in both."""
    return f"{MANIFESTS}/{manifest_id[-2:]}/{manifest_id[-4:-2]}/{manifest_id}.json"


def flat_manifest_key(manifest_id: str) -> str:
    """Where tlreg before the fan-out kept a manifest: ``manifests/<id>.json``."""
    return f"{MANIFESTS}/{manifest_id}.json"


def stored_manifests(store: Store) -> set[str]:
    """Ids of every manifest in ``store``, fanned out or flat (for garbage collection)."""
    found = set()
    for key in store.list(MANIFESTS):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        if ID.fullmatch(name) and key in (manifest_key(name), flat_manifest_key(name)):
            found.add(name)
    return found


def read_manifest(store: Store, manifest_id: str) -> Manifest:
    """Read and parse the manifest ``manifest_id`` from ``store``.

    Raises :class:`CheckpointNotFound` if it does not exist, :class:`UnsupportedFormat` if a
    newer tlreg wrote it and :class:`CorruptCheckpoint` if it is malformed.
    """
    if not isinstance(manifest_id, str) or not ID.fullmatch(manifest_id):
        raise CheckpointNotFound(
            f"{manifest_id!r} is not a checkpoint manifest id (32 hex digits); "
            "list the store's manifests/ or ask the registry for the id"
        )
    name = f"manifest {manifest_id} in {store.url}"
    key = manifest_key(manifest_id)
    try:
        try:
            size = store.size(key)  # before reading: a huge file is refused, not allocated
        except ObjectNotFound:  # a store not yet upgraded to the fanned-out layout
            key = flat_manifest_key(manifest_id)
            size = store.size(key)
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpoint(
                f"{name} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may be; "
                "it is damaged or was not written by tlreg"
            )
        raw = store.get(key)
    except ObjectNotFound:
        raise CheckpointNotFound(
            f"no checkpoint manifest {manifest_id} in {store.url}; check the id and the store URL"
        ) from None
    manifest = Manifest.from_json(raw, name=name)
    if manifest.id != manifest_id:
        raise CorruptCheckpoint(
            f"manifest {manifest_id} in {store.url} claims id {manifest.id}; "
            "it was renamed or damaged"
        )
    return manifest


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write ``manifest`` (atomically, as every store put is); this is the checkpoint's commit.

    The bytes are first read back through every check a reader makes, so that tlreg never
    writes a manifest it would refuse (:class:`CheckpointError` naming the field).
    """
    raw = manifest.to_bytes()
    try:
        Manifest.from_json(raw, name=f"manifest {manifest.id}")
    except CheckpointError as e:
        raise CheckpointError(f"cannot write checkpoint {manifest.id}: {e}") from None
    store.put(manifest_key(manifest.id), raw)


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
