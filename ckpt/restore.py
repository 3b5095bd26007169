"""Restore: read a checkpoint back, bit-exact and verified, in place where it can.

The read plan of ``AsyncCheckpointer.load``: the tensors under ``prefix``, each read into
its counterpart of ``into`` when that fits (a contiguous CPU tensor of the same dtype and
shape), else into new memory; sharded tensors (and ``shards=`` targets) are assembled from
the saved blocks that overlap the wanted block. Bytes are read object by object on the I/O
pool through :class:`~tlreg.ckpt.objects.ObjectReader` and every tensor's hash is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tlreg.ckpt.dtypes import DTYPES, dtype_from_name, from_bytes
from tlreg.ckpt.errors import CorruptCheckpoint, UnsupportedFormat
from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.manifest import Manifest, ShardEntry, TensorEntry
from tlreg.ckpt.objects import LayoutCache, ObjectReader
from tlreg.ckpt.repack import follow_relocations
from tlreg.ckpt.shards import Box, Shard, check_box, intersect, slices, volume
from tlreg.ckpt.staging import page_aligned_empty
from tlreg.ckpt.tasks import Tasks
from tlreg.ckpt.tree import flatten_state, select_subtree, tensor_refs, unflatten_state
from tlreg.ckpt.validate import object_chunks
from tlreg.storage_backends import Store

_DIRECT_READ_BYTES = 1 << 20  # tensors this large are read straight into their own memory


def _fits(dest: torch.Tensor, entry: TensorEntry) -> bool:
    """Whether ``load(into=...)`` can read ``entry`` straight into ``dest``'s memory."""
    return (
        dest.device.type == "cpu"
        and dest.layout == torch.strided
        and dest.is_contiguous()
        and not dest.is_conj()
        and not dest.is_neg()
        and DTYPES.get(entry.dtype) == dest.dtype
        and tuple(dest.shape) == tuple(entry.shape)
    )


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a flat uint8 tensor sharing its memory."""
    flat = tensor.detach().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


class Restorer:
    """The restore stage of one checkpointer: reads on ``io_pool``, layouts cached."""

    def __init__(self, store: Store, io_pool: ThreadPoolExecutor, layouts: LayoutCache) -> None:
        self.store = store
        self._io_pool = io_pool
        self._layouts = layouts

    def load(
        self,
        manifest: Manifest,
        *,
        prefix: str | None = None,
        shards: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
        into: Mapping[str, Any] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> tuple[dict[Any, Any], list[TensorEntry]]:
        """The state of ``manifest`` (see ``AsyncCheckpointer.load``), and the entries read
        (their locations seed the dedup index)."""
        tree = manifest.tree if prefix is None else select_subtree(manifest.tree, prefix)
        paths = list(dict.fromkeys(tensor_refs(tree)))
        missing = [p for p in paths if p not in manifest.tensors]
        if missing:
            raise CorruptCheckpoint(
                f"manifest {manifest.id} in {self.store.url} has no entry for tensor "
                f"{missing[0]!r} that its tree references; the manifest is damaged"
            )
        destinations = flatten_state(into)[1] if into is not None else {}
        targets: dict[str, Box] = {}
        for path, (offsets, shape) in (shards or {}).items():
            if path not in paths:
                raise KeyError(
                    f"shards names tensor {path!r}, which checkpoint {manifest.id} does not "
                    f"hold (under prefix {prefix!r}); use a path of manifest(id).tensors"
                )
            box = (tuple(int(o) for o in offsets), tuple(int(n) for n in shape))
            check_box(box, manifest.tensors[path].shape, path)
            targets[path] = box
        reads: dict[str, TensorEntry] = {}
        in_place: dict[str, torch.Tensor] = {}
        filled: dict[int, str] = {}  # data_ptr -> the path filled in place
        assemble: dict[str, tuple[Box, list[tuple[str, ShardEntry]]]] = {}
        for path in paths:
            entry = manifest.tensors[path]
            if not entry.shards and path not in targets:
                reads[path] = entry
                dest = destinations.get(path)
                if isinstance(dest, torch.Tensor) and _fits(dest, entry):
                    # a tensor under two paths (tied weights) is filled once; the other path
                    # loads apart (two reads into one memory would race)
                    if dest.numel() == 0 or filled.setdefault(dest.data_ptr(), path) == path:
                        in_place[path] = dest
                continue
            want = targets.get(path, ((0,) * len(entry.shape), entry.shape))
            pieces = []
            for shard in entry.pieces():
                overlap = intersect(shard.box, want)
                if overlap is not None and volume(overlap[1]):
                    key = f"{path}@{list(shard.offsets)}"
                    reads[key] = shard.piece(entry.dtype)
                    pieces.append((key, shard))
            assemble[path] = (want, pieces)
        raw = self._read_raw(
            manifest, reads, {path: _byte_view(t) for path, t in in_place.items()}, on_bytes
        )
        for dest in in_place.values():
            if not dest.is_inference():  # (those keep no version counter)
                torch.autograd.graph.increment_version(dest)
        tensors: dict[str, torch.Tensor | Shard] = dict(in_place)
        for path in paths:
            entry = manifest.tensors[path]
            dtype = dtype_from_name(entry.dtype)
            if path in in_place:
                continue
            if path not in assemble:
                tensors[path] = from_bytes(raw[path], dtype, entry.shape)
                continue
            want, pieces = assemble[path]
            # assembled as bytes ([..., itemsize] uint8), so that any dtype copies exactly
            item = dtype.itemsize
            out = torch.empty((*want[1], item), dtype=torch.uint8)
            for key, shard in pieces:
                overlap = intersect(shard.box, want)
                assert overlap is not None
                src = raw[key].view(*shard.shape, item)
                out[slices(overlap, want[0])] = src[slices(overlap, shard.offsets)]
            block = from_bytes(out.reshape(-1), dtype, want[1])
            tensors[path] = Shard(block, want[0], entry.shape) if path in targets else block
        state = unflatten_state(tree, tensors)
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"manifest {manifest.id} in {self.store.url} holds no dict")
        return state, list(reads.values())

    def _read_raw(
        self,
        manifest: Manifest,
        reads: Mapping[str, TensorEntry],
        buffers: Mapping[str, torch.Tensor] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`_read_once`, read again through the relocation records when an object went
        missing (``tlreg gc`` repacked it, maybe while this read ran; see ckpt/repack.py)."""
        try:
            return self._read_once(manifest, reads, buffers, on_bytes)
        except CorruptCheckpoint:
            moved = follow_relocations(self.store, reads)
            if moved is None:
                raise
            return self._read_once(manifest, moved, buffers, on_bytes)

    def _check_sizes(self, reader: ObjectReader, reads: Mapping[str, TensorEntry]) -> None:
        """:class:`CorruptCheckpoint` unless the chunk files of every object hold the bytes
        ``reads`` take from it (the store's listing and sizes, on the I/O pool): a manifest
        that lies about sizes must not make a restore allocate what no object backs."""
        members: dict[str, list[str]] = {}
        for name, entry in reads.items():
            if entry.nbytes:
                members.setdefault(entry.object, []).append(name)
        found = self._io_pool.map(lambda d: object_chunks(self.store, d), list(members))
        for (digest, names), chunks in zip(members.items(), found, strict=True):
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            subject = f"tensor {names[0]!r}{more}"
            if isinstance(chunks, str):
                raise reader.damaged(subject, digest, chunks)
            end, room = max(reads[n].offset + reads[n].nbytes for n in names), chunks[0] * chunks[1]
            if end > room:
                why = f"holds at most {room} bytes, too few for {end}"
                raise reader.damaged(subject, digest, why)

    def _read_once(
        self,
        manifest: Manifest,
        reads: Mapping[str, TensorEntry],
        buffers: Mapping[str, torch.Tensor] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read and verify the bytes of ``reads`` (name -> entry) in parallel on the I/O pool;
        returns each as a flat uint8 tensor: the one in ``buffers`` under its name if any
        (exactly ``entry.nbytes`` long), else a new one. ``on_bytes(n)`` is called from the
        I/O threads as each read of ``n`` tensor bytes completes."""
        reader = ObjectReader(self.store, manifest.id, self._layouts)
        self._check_sizes(reader, reads)  # before any memory is allocated for the bytes
        outs: dict[str, torch.Tensor] = {}
        by_object: dict[str, list[str]] = {}
        for name, entry in reads.items():
            if entry.dtype not in DTYPES:
                raise UnsupportedFormat(
                    f"tensor {name!r} of checkpoint {manifest.id} has dtype {entry.dtype!r}, "
                    f"which torch {torch.__version__} lacks; upgrade torch to load it"
                )
            if buffers is not None and name in buffers:
                outs[name] = buffers[name]
            elif entry.nbytes >= _DIRECT_READ_BYTES:  # read in place, with direct I/O if it can
                outs[name] = page_aligned_empty(entry.nbytes)
            else:
                outs[name] = torch.empty(entry.nbytes, dtype=torch.uint8)
            if entry.nbytes:
                by_object.setdefault(entry.object, []).append(name)

        def read_object(name: str, members: list[str]) -> None:
            more = f" and {len(members) - 1} more" if len(members) > 1 else ""
            layout = reader.layout(name, f"tensor {members[0]!r}{more}")
            # small tensors: one ranged read per chunk they touch, then copies out of it
            by_chunk: dict[int, list[tuple[str, int, int, int]]] = {}
            for path in members:
                entry = reads[path]
                reader.layout(name, f"tensor {path!r}", entry.offset, entry.nbytes)
                if entry.nbytes >= _DIRECT_READ_BYTES:
                    tasks.submit(read_direct, path)
                    continue
                done = 0
                for index, offset, n in layout.pieces(entry.offset, entry.nbytes):
                    by_chunk.setdefault(index, []).append((path, offset, n, done))
                    done += n
            for index, pieces in by_chunk.items():
                tasks.submit(read_pieces, name, index, pieces)

        def read_direct(path: str) -> None:
            entry = reads[path]
            out = outs[path].numpy().data
            reader.read_into(entry.object, entry.offset, out, f"tensor {path!r}")
            if on_bytes is not None:
                on_bytes(entry.nbytes)
            # hashed while the other reads go on (a damaged one is reported below, in order)
            verified[path] = hash_bytes(out) == entry.hash

        def read_pieces(name: str, index: int, pieces: list[tuple[str, int, int, int]]) -> None:
            lo = min(offset for _, offset, _, _ in pieces)
            hi = max(offset + n for _, offset, n, _ in pieces)
            src = memoryview(
                reader.read_chunk(name, index, lo, hi - lo, f"tensor {pieces[0][0]!r}")
            )
            for path, offset, n, at in pieces:
                outs[path].numpy().data[at : at + n] = src[offset - lo : offset - lo + n]
            if on_bytes is not None:
                on_bytes(sum(n for _, _, n, _ in pieces))

        verified: dict[str, bool] = {}  # large tensors, hashed by the task that read them
        tasks = Tasks(self._io_pool)
        for name, members in by_object.items():
            tasks.submit(read_object, name, members)
        tasks.wait()

        def check(path: str) -> bool:
            return hash_bytes(outs[path].numpy().data) == reads[path].hash

        checks = {name: self._io_pool.submit(check, name) for name in reads if name not in verified}
        # the first damaged tensor in the state's order is the one reported
        for name in reads:
            ok = verified[name] if name in verified else checks[name].result()
            if not ok:
                entry = reads[name]
                raise reader.damaged(
                    f"tensor {name!r}", entry.object, "does not match the tensor's hash"
                )
        return outs
