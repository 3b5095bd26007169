"""The non-tensor structure of a state, as JSON that decodes to exactly the same Python values.

``flatten_state`` splits a nested state into a JSON tree and a flat ``{path: tensor}`` map;
``unflatten_state`` puts them back together. Plain JSON values stay as they are; everything
JSON cannot say is a one-key object whose key starts with ``$``:

=========================  ===========================================================
``{"$tensor": path}``      a tensor (or a :class:`~tlreg.ckpt.Shard` or DTensor of a
                           sharded one), stored under ``path`` in the manifest
``{"$tuple": [...]}``      a tuple (e.g. Adam's ``betas``)
``{"$dict": [[k, v]...]}`` a dict with a non-str key or a key starting with ``$``
                           (optimizer ``state`` has int keys); keys are encoded values
``{"$odict": [[k, v]...]}`` a ``collections.OrderedDict`` (what ``state_dict()`` returns)
``{"$float": "nan"}``      ``nan``, ``inf`` or ``-inf``
``{"$bytes": base64}``     bytes
``{"$size": [...]}``       a ``torch.Size``
``{"$dtype": name}``       a ``torch.dtype``
=========================  ===========================================================

Types are matched exactly (a subclass such as ``numpy.float64`` or a namedtuple would come
back as its base class, so it is refused). Nothing is ever pickled: a value that is none of
the above raises ``TypeError`` naming its path.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tlreg.ckpt.dtypes import dtype_name
from tlreg.ckpt.errors import CorruptCheckpoint
from tlreg.ckpt.shards import Shard, from_dtensor, is_dtensor
from tlreg.ckpt.validate import MAX_DEPTH, safe_path, value_depth

_TAGS = ("$tensor", "$tuple", "$dict", "$odict", "$float", "$bytes", "$size", "$dtype")


class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor | Shard] = {}
        self._stack: set[int] = set()  # containers being encoded, to refuse cycles

    def encode(self, obj: Any, parts: list[str], *, key: bool = False) -> Any:
        t = type(obj)
        if obj is None or t is bool or t is int or t is str:
            return obj
        if t is float:
            if math.isfinite(obj):
                return obj
            return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if (t is Shard or isinstance(obj, torch.Tensor)) and not key:
            if is_dtensor(obj):
                obj = from_dtensor(obj, _path(parts))
            return {"$tensor": self._add_tensor(obj, parts)}
        if t is bytes:
            return {"$bytes": base64.b64encode(obj).decode("ascii")}
        if t is torch.Size:
            return {"$size": list(obj)}
        if t is torch.dtype:
            return {"$dtype": str(obj).removeprefix("torch.")}
        if t is list or t is tuple or t is dict or t is OrderedDict:
            if key and t is not tuple:
                raise TypeError(
                    f"cannot checkpoint a {t.__name__} as a dict key at {_path(parts)!r}"
                )
            if id(obj) in self._stack:
                raise TypeError(
                    f"cannot checkpoint a cycle at {_path(parts)!r}: it contains itself"
                )
            if len(self._stack) >= MAX_DEPTH:
                raise TypeError(
                    f"cannot checkpoint the state at {_path(parts)!r}: it nests containers "
                    f"deeper than {MAX_DEPTH} levels"
                )
            self._stack.add(id(obj))
            try:
                return self._encode_container(obj, parts, key=key)
            finally:
                self._stack.discard(id(obj))
        what = "a tensor as a dict key" if key else f"a {t.__module__}.{t.__qualname__}"
        raise TypeError(
            f"cannot checkpoint {what} at {_path(parts)!r}: only tensors, dict, OrderedDict, "
            "list, tuple, str, int, float, bool, None, bytes, torch.Size and torch.dtype are "
            "stored (nothing is pickled); convert it or leave it out of the state"
        )

    def _encode_container(self, obj: Any, parts: list[str], *, key: bool) -> Any:
        if type(obj) is list:
            return [self.encode(v, [*parts, str(i)]) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return {
                "$tuple": [self.encode(v, [*parts, str(i)], key=key) for i, v in enumerate(obj)]
            }
        if type(obj) is dict and all(type(k) is str and not k.startswith("$") for k in obj):
            return {k: self.encode(v, [*parts, k]) for k, v in obj.items()}
        pairs = [
            [self.encode(k, [*parts, str(k)], key=True), self.encode(v, [*parts, str(k)])]
            for k, v in obj.items()
        ]
        return {"$odict" if type(obj) is OrderedDict else "$dict": pairs}

    def _add_tensor(self, value: torch.Tensor | Shard, parts: list[str]) -> str:
        path = _path(parts)
        tensor = value.local if isinstance(value, Shard) else value
        if (
            tensor.layout is not torch.strided
            or tensor.is_quantized
            or tensor.device.type == "meta"
        ):
            raise TypeError(
                f"cannot checkpoint the {tensor.layout} {tensor.device.type} tensor at {path!r}: "
                "only dense tensors with data are stored; convert it with .to_dense() or drop it"
            )
        try:
            dtype_name(tensor.dtype)
        except TypeError as e:
            raise TypeError(f"cannot checkpoint the tensor at {path!r}: {e}") from None
        # Paths are display names built from str(key), with control characters escaped; a
        # collision (int key 3 next to str key "3", a key containing "/", an escape) gets a
        # suffix, the tree keeps the exact reference.
        path = safe_path(path)
        unique, n = path, 0
        while unique in self.tensors:
            n += 1
            unique = f"{path}~{n}"
        self.tensors[unique] = value
        return unique


def _path(parts: list[str]) -> str:
    return "/".join(parts) or "<root>"


def flatten_state(state: Mapping[str, Any]) -> tuple[Any, dict[str, torch.Tensor | Shard]]:
    """Split ``state`` into a JSON tree and its tensors.

    Returns ``(tree, tensors)``: ``tree`` is JSON-serialisable (``json.dumps`` with the
    default settings writes standard JSON for it) and references each tensor by its path in
    ``tensors`` (e.g. ``"optimizer/state/3/exp_avg"``). The tensors are the caller's own
    objects, not copies; a :class:`~tlreg.ckpt.Shard` stays a shard and a DTensor becomes
    this rank's shard of it. Raises ``TypeError`` naming the path of anything that cannot be
    stored.
    """
    flattener = _Flattener()
    tree = flattener.encode(state, [])
    # a manifest holds the tree one level down, and tags add levels ({"$dict": [[k, v]]})
    if value_depth(tree) >= MAX_DEPTH:
        raise TypeError(
            f"cannot checkpoint a state this deeply nested: its structure takes more than "
            f"{MAX_DEPTH - 1} levels of JSON; flatten it"
        )
    return tree, flattener.tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor | Shard]) -> Any:
    """Inverse of :func:`flatten_state`: the nested state with ``tensors`` put in place.

    Raises :class:`CorruptCheckpoint` if ``tree`` is malformed or references a path that is
    not in ``tensors``.
    """
    return _decode(tree, tensors, "")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor | Shard], where: str) -> Any:
    t = type(node)
    if node is None or t is bool or t is int or t is float or t is str:
        return node
    if t is list:
        return [_decode(v, tensors, f"{where}/{i}") for i, v in enumerate(node)]
    if t is not dict:
        raise CorruptCheckpoint(f"malformed checkpoint tree at {where or '<root>'!r}: {t.__name__}")
    tag = _tag(node, where)
    if tag is None:
        return {k: _decode(v, tensors, f"{where}/{k}") for k, v in node.items()}
    value = node[tag]
    try:
        if tag == "$tensor":
            return tensors[value]
        if tag == "$tuple":
            return tuple(_decode(v, tensors, f"{where}/{i}") for i, v in enumerate(value))
        if tag == "$dict" or tag == "$odict":
            items = (
                (_decode(k, tensors, where), _decode(v, tensors, f"{where}/{k}")) for k, v in value
            )
            return OrderedDict(items) if tag == "$odict" else dict(items)
        if tag == "$float":
            return float(value)
        if tag == "$bytes":
            return base64.b64decode(value, validate=True)
        if tag == "$size":
            return torch.Size(value)
        dtype = getattr(torch, value)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(value)
        return dtype
    except CorruptCheckpoint:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"malformed checkpoint tree at {where or '<root>'!r}: bad {tag} value ({e!r})"
        ) from None


def _tag(node: dict[str, Any], where: str) -> str | None:
    dollar = [k for k in node if k.startswith("$")]
    if not dollar:
        return None
    if len(node) != 1 or dollar[0] not in _TAGS:
        raise CorruptCheckpoint(
            f"malformed checkpoint tree at {where or '<root>'!r}: unknown tag {dollar[0]!r}"
        )
    return dollar[0]


class _References(dict[str, Any]):
    """The tensors of a manifest as placeholders, for decoding a tree without its data."""

    def __init__(self, paths: Mapping[str, Any]) -> None:
        super().__init__()
        self._paths = paths

    def __missing__(self, path: Any) -> Any:
        if type(path) is not str or path not in self._paths:
            raise KeyError(f"{path!r} is not a tensor of the checkpoint")
        return None


def check_tree(tree: Any, tensors: Mapping[str, Any]) -> None:
    """:class:`CorruptCheckpoint` unless ``tree`` decodes (every tag well formed) and each
    tensor it references is in ``tensors``; reads no tensor."""
    if tree is not None:
        unflatten_state(tree, _References(tensors))


def tensor_refs(tree: Any) -> Iterator[str]:
    """Every tensor path that ``tree`` references, in order."""
    if type(tree) is list:
        for v in tree:
            yield from tensor_refs(v)
    elif type(tree) is dict:
        if len(tree) == 1 and "$tensor" in tree:
            yield tree["$tensor"]
            return
        for v in tree.values():
            yield from tensor_refs(v)


def select_subtree(tree: Any, prefix: str) -> Any:
    """``tree`` pruned to the branch that ``prefix`` names (mapping keys joined by ``/``).

    The result keeps the nesting above the branch, so it decodes to a dict shaped like the
    full state with only that branch present. Raises ``KeyError`` if a part of ``prefix``
    names no mapping entry.
    """
    parts = [p for p in prefix.split("/") if p]
    if not parts:
        return tree
    return _select(tree, parts, "")


def _select(node: Any, parts: list[str], where: str) -> Any:
    head, rest = parts[0], parts[1:]
    here = f"{where}/{head}" if where else head

    def pick(value: Any) -> Any:
        return _select(value, rest, here) if rest else value

    if type(node) is dict:
        tag = _tag(node, where)
        if tag is None and head in node:
            return {head: pick(node[head])}
        if tag in ("$dict", "$odict"):
            for k, v in node[tag]:
                if str(_decode(k, {}, where)) == head:
                    return {tag: [[k, pick(v)]]}
    raise KeyError(f"no entry {here!r} in the checkpoint's state (prefix must name dict keys)")
