"""Validation of a manifest against what it describes, before anything is allocated or read.

A manifest's checksum is integrity, not authentication: whoever can write the store can
recompute it. So every field is checked on its own terms as well, and every reader
(``show``, ``diff``, ``verify``, ``export``, ``load``, the zarr view) gets a manifest only
through these checks:

- **the document** (:func:`check_document`): at most :data:`MAX_MANIFEST_BYTES` before it
  is parsed, and JSON nested at most :data:`MAX_DEPTH` deep (a deeper one stops the parser
  with ``RecursionError`` or fails :func:`value_depth`, which walks without recursion; no
  walk after it recurses deeper);
- **the fields** (:class:`Fields`, used by :meth:`Manifest.from_json`): ids, hashes and tensor
  paths in their grammar; a dtype from :data:`ITEMSIZE`; at most :data:`MAX_NDIM` dimensions;
  ``nbytes == prod(shape) * itemsize``; a byte range inside the object's listed size; shards
  inside their tensor, tiling it exactly once; the tree's tags well formed and its tensor
  references present;
- **the store** (:func:`check_objects`): every object the manifest lists exists with as many
  chunk bytes as the manifest says, from the store's listing and sizes (no byte reads), so a
  lying size cannot make a reader allocate memory the object does not back.

Every failure is a :class:`CorruptCheckpoint` whose one-line message names the checkpoint and
the field (``tensors['model/w'].nbytes``).
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

from tlreg.ckpt.errors import CorruptCheckpoint
from tlreg.ckpt.objects import chunk_key, meta_key, object_prefix
from tlreg.storage_backends import ObjectNotFound, Store

MAX_MANIFEST_BYTES = 256 << 20
"""Largest manifest file read (a million tensors take about 250 MiB)."""
MAX_DEPTH = 64
"""Deepest JSON nesting in a manifest. A state's structure adds three levels per non-string
dict key ({"$dict": [[k, v]]}); optimizer states need about 10 in all."""
MAX_NDIM = 64
"""Most dimensions of a tensor (torch's own limit)."""
MAX_PATH_CHARS = 4096
"""Longest tensor path."""
MAX_INT = (1 << 63) - 1
"""Largest size, offset, dimension or step (int64, what torch and the registry hold)."""
MAX_META_BYTES = 4096
"""Largest ``zarr.json`` of an object (tlreg writes about 400 bytes)."""

ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
}
"""Bytes per element of every dtype a manifest may name (the names of
:mod:`tlreg.ckpt.dtypes`, whether or not this torch has them)."""

ID = re.compile(r"[0-9a-f]{32}")
HASH = re.compile(r"[0-9a-f]{64}")
# C0 and C1 control characters and lone surrogates: a path is printed, logged and used as a
# zarr key, and these would forge lines or terminal escapes (or fail to encode)
_BAD_PATH_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 6
_short.maxlevel = 2


def show(value: Any) -> str:
    """``repr(value)``, shortened (a hostile value can be megabytes long)."""
    return _short.repr(value)


class BadField(ValueError):
    """A field of a manifest that fails its check; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_document(raw: bytes, name: str) -> None:
    """:class:`CorruptCheckpoint` unless ``raw`` is small enough to parse (its depth is
    checked on the parsed value, :func:`value_depth`: JSON's own parser is linear in the
    bytes and stops a deep document with ``RecursionError``, which the caller refuses)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpoint(
            f"{name} is {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may be; "
            "it is damaged or was not written by tlreg"
        )


def value_depth(value: Any) -> int:
    """How deeply a parsed JSON value nests lists and dicts (iteratively: any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, Mapping):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_path(path: Any) -> str:
    """A tensor path in its grammar: 1 to :data:`MAX_PATH_CHARS` characters, no control
    characters or lone surrogates; ``ValueError`` or ``TypeError`` otherwise."""
    if type(path) is not str:
        raise TypeError(f"a tensor path is a string, not {show(path)}")
    if not 0 < len(path) <= MAX_PATH_CHARS:
        raise ValueError(f"a tensor path has 1 to {MAX_PATH_CHARS} characters, not {len(path)}")
    bad = _BAD_PATH_CHARS.search(path)
    if bad:
        raise ValueError(f"tensor path {show(path)} holds the control character {bad[0]!r}")
    return path


def safe_path(path: str) -> str:
    """``path`` in the grammar of :func:`check_path`: control characters and lone surrogates
    written as ``\\xNN``/``\\uNNNN`` escapes, and cut to leave room for a ``~n`` suffix."""
    escaped = _BAD_PATH_CHARS.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", path
    )
    return escaped[: MAX_PATH_CHARS - 24] or "<empty>"


class Fields:
    """Checks of single fields, each raising :class:`BadField` naming the field."""

    @staticmethod
    def keys(data: Any, field: str, required: Iterable[str], optional: Iterable[str] = ()) -> None:
        """``data`` is a JSON object with exactly the ``required`` keys and maybe ``optional``."""
        if not isinstance(data, Mapping):
            raise BadField(field, f"expected an object, got {show(data)}")
        if data.keys() == set(required):  # the common case, at once
            return
        need = set(required)
        missing = need - data.keys()
        if missing:
            raise BadField(f"{field}.{sorted(missing)[0]}", "missing")
        extra = data.keys() - need - set(optional)
        if extra:
            raise BadField(f"{field}.{sorted(extra)[0]}", "not a field of this format")

    @staticmethod
    def integer(value: Any, field: str, low: int = 0, high: int = MAX_INT) -> int:
        """An int (not a bool) in ``[low, high]``."""
        if type(value) is not int or not low <= value <= high:
            raise BadField(field, f"expected an integer in [{low}, {high}], got {show(value)}")
        return value

    @staticmethod
    def string(value: Any, field: str, grammar: re.Pattern[str] | None = None) -> str:
        """A str, matching ``grammar`` in full if given."""
        if type(value) is not str or (grammar is not None and not grammar.fullmatch(value)):
            what = f"a string matching {grammar.pattern}" if grammar else "a string"
            raise BadField(field, f"expected {what}, got {show(value)}")
        return value

    @staticmethod
    def shape(value: Any, field: str) -> tuple[int, ...]:
        """A list of at most :data:`MAX_NDIM` sizes."""
        if type(value) is not list or len(value) > MAX_NDIM:
            raise BadField(field, f"expected a list of at most {MAX_NDIM} sizes, got {show(value)}")
        if all(type(n) is int and 0 <= n <= MAX_INT for n in value):  # the common case
            return tuple(value)
        return tuple(Fields.integer(n, f"{field}[{i}]") for i, n in enumerate(value))

    @staticmethod
    def dtype(value: Any, field: str) -> str:
        """A dtype name of :data:`ITEMSIZE`."""
        if type(value) is not str or value not in ITEMSIZE:
            raise BadField(field, f"{show(value)} is not a dtype tlreg stores")
        return value

    @staticmethod
    def nbytes(value: Any, field: str, dtype: str, shape: tuple[int, ...]) -> int:
        """``prod(shape) * itemsize`` of ``dtype``, and addressable by torch (every stride
        of the shape fits in int64)."""
        nbytes = Fields.integer(value, field)
        span = ITEMSIZE[dtype]
        for n in shape:
            span *= max(n, 1)
            if span > MAX_INT:
                raise BadField(field.rpartition(".")[0] + ".shape", f"{list(shape)} is too large")
        expected = ITEMSIZE[dtype]
        for n in shape:
            expected *= n
        if nbytes != expected:
            raise BadField(
                field,
                f"{nbytes} bytes, but shape {list(shape)} of {dtype} holds {expected}",
            )
        return nbytes

    @staticmethod
    def location(
        entry: Mapping[str, Any], field: str, nbytes: int, objects: Mapping[str, int]
    ) -> tuple[str, int]:
        """``(object, offset)`` of stored bytes: '' and 0 for no bytes, else an object the
        manifest lists, holding ``[offset, offset + nbytes)``."""
        digest = entry["object"]
        offset = Fields.integer(entry["offset"], f"{field}.offset")
        if nbytes == 0:
            if digest != "" or offset != 0:
                raise BadField(f"{field}.object", "an empty tensor names no object and offset 0")
            return "", 0
        Fields.string(digest, f"{field}.object", HASH)
        size = objects.get(digest)
        if size is None:
            raise BadField(f"{field}.object", f"object {digest} is not in the manifest's objects")
        if offset + nbytes > size:
            raise BadField(
                f"{field}.offset",
                f"bytes [{offset}, {offset + nbytes}) lie past the end of object {digest} "
                f"({size} bytes)",
            )
        return digest, offset


def check_cover(
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...], field: str
) -> None:
    """:class:`BadField` unless ``boxes`` (sorted by offsets) lie inside ``shape`` and tile it
    exactly once.

    A sweep along the dimension with the most distinct offsets: each box is compared only
    with the boxes still open at its start there, so shards cut along one dimension cost
    ``O(n log n)`` rather than ``O(n^2)``.
    """
    for i, (offsets, size) in enumerate(boxes):
        if any(o + n > g for o, n, g in zip(offsets, size, shape, strict=True)):
            raise BadField(
                f"{field}[{i}]", f"block {list(offsets)}+{list(size)} lies outside {list(shape)}"
            )
    if any(boxes[i][0] >= boxes[i + 1][0] for i in range(len(boxes) - 1)):
        raise BadField(field, "shards are not sorted by their offsets without repeats")
    total = sum(_volume(size) for _, size in boxes)
    if total != _volume(shape):
        raise BadField(field, f"shards hold {total} of the tensor's {_volume(shape)} elements")
    if not shape:
        return
    axis = max(range(len(shape)), key=lambda d: len({offsets[d] for offsets, _ in boxes}))
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][axis])
    open_: list[int] = []
    for i in order:
        offsets, size = boxes[i]
        if not _volume(size):
            continue
        start = offsets[axis]
        open_ = [j for j in open_ if boxes[j][0][axis] + boxes[j][1][axis] > start]
        for j in open_:
            if _overlap(boxes[i], boxes[j]):
                raise BadField(
                    field,
                    f"shards at offsets {list(boxes[j][0])} and {list(offsets)} overlap",
                )
        open_.append(i)


def _volume(shape: Iterable[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _overlap(
    a: tuple[tuple[int, ...], tuple[int, ...]], b: tuple[tuple[int, ...], tuple[int, ...]]
) -> bool:
    return all(
        max(ao, bo) < min(ao + an, bo + bn)
        for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True)
    )


# -- the store: do the objects exist, as large as the manifest says? -------------------------


def object_chunks(store: Store, digest: str) -> tuple[int, int] | str:
    """``(count, size)`` of the chunk files of object ``digest``, from the store's listing
    and sizes only (no byte reads), or why it has none that zarr could read.

    An object of ``n`` bytes is ``count`` chunk files ``c/0`` .. ``c/{count-1}`` of one
    ``size`` (zarr pads the last one) with ``(count - 1) * size < n <= count * size``, and
    its ``zarr.json``, written last, that marks it complete.
    """
    prefix = object_prefix(digest)
    keys = set(store.list(prefix))
    meta = meta_key(digest)
    if meta not in keys:
        return "is missing"
    try:
        if store.size(meta) > MAX_META_BYTES:
            return f"has a zarr.json larger than {MAX_META_BYTES} bytes"
        count = sum(1 for k in keys if k.startswith(f"{prefix}/c/"))
        if count == 0 or chunk_key(digest, count - 1) not in keys:
            return f"lacks a chunk among its {count}"
        size = store.size(chunk_key(digest, 0))
        last = store.size(chunk_key(digest, count - 1)) if count > 1 else size
    except ObjectNotFound:
        return "lost a file while it was being checked"
    if size == 0 or last != size:
        return f"has chunks of {size} and {last} bytes (zarr needs them all the same size)"
    return count, size


def object_problem(store: Store, digest: str, nbytes: int) -> str | None:
    """Why object ``digest`` cannot be the ``nbytes`` bytes a manifest lists for it, from
    the store's listing and sizes (see :func:`object_chunks`); None when it can."""
    found = object_chunks(store, digest)
    if isinstance(found, str):
        return found
    count, size = found
    if not (count - 1) * size < nbytes <= count * size:
        return f"holds {count} chunks of {size} bytes, not the {nbytes} bytes listed for it"
    return None


def check_objects(
    store: Store,
    objects: Mapping[str, int],
    name: str,
    *,
    pool: Executor | None = None,
    moved: Callable[[str], bool] | None = None,
) -> None:
    """:class:`CorruptCheckpoint` naming the first object of ``objects`` (digest -> size
    listed by checkpoint ``name``) that the store does not back with that many bytes (see
    :func:`object_problem`: listing and sizes, no byte reads; on ``pool`` if given).

    A missing object for which ``moved(digest)`` is true (a repack moved its bytes and left
    a record of where) is not a problem.
    """
    digests = list(objects)

    def probe(digest: str) -> str | None:
        problem = object_problem(store, digest, objects[digest])
        if problem == "is missing" and moved is not None and moved(digest):
            return None
        return problem

    problems: Iterator[str | None] = pool.map(probe, digests) if pool else map(probe, digests)
    for digest, problem in zip(digests, problems, strict=True):
        if problem is not None:
            raise CorruptCheckpoint(
                f"{name}: objects[{digest}] in {store.url} {problem}; "
                "run `tlreg verify` and restore the object from a copy"
            )
