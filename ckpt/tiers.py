"""A node-local tier in front of the shared store (DESIGN §4, item 6; docs/storage.md, Tiers).

A save with a local tier is first *local*: its objects and manifest are durable on the node's
own disk (RAM disk, NVMe, burst buffer), written through :class:`TieredStore`. A
:class:`Drainer` then copies them to the shared store (PFS path or ``s3://``) under a bytes/s
budget: each object's chunk files first, its ``zarr.json`` marker after them, the manifest
after every object. A reader of the shared store therefore never sees a partial object or a
manifest whose objects are missing, whenever a drain stops; a drain killed mid-copy leaves
chunk files without a marker, which the next drain rewrites and ``gc`` sweeps. Objects are
content-addressed, so draining is idempotent and safe to retry, and an object the shared store
already holds is not copied again. Every drained object is hash-checked on the way: a damaged
local copy is never propagated.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from tlreg.ckpt.errors import CheckpointError, CorruptCheckpoint
from tlreg.ckpt.hashing import hasher
from tlreg.ckpt.manifest import manifest_key
from tlreg.ckpt.objects import chunk_key, is_stored, meta_key, read_layout
from tlreg.storage_backends import Store
from tlreg.storage_backends.base import Data
from tlreg.storage_backends.errors import InvalidKey, ObjectNotFound

__all__ = [
    "DrainStats",
    "Drainer",
    "PruneStats",
    "TieredStore",
    "TokenBucket",
    "expand_tier",
    "node_id",
    "prune_local",
    "share_key",
    "write_share",
]

NODE = "{node}"
"""The placeholder of a local tier path that names the node (its Ray node id)."""

T = TypeVar("T")


def expand_tier(path: str, node: str) -> str:
    """``path`` with ``{node}`` replaced by ``node``: one path names each node's own disk."""
    return path.replace(NODE, node)


def node_id() -> str:
    """This process's node: the Ray node id inside a Ray worker or driver, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception:  # Ray missing or half started: the host name names the node
        pass
    return socket.gethostname()


class TieredStore(Store):
    """``local`` in front of ``shared``: writes go to the local tier, reads come from the
    local tier when it holds the key and from the shared store otherwise.

    Its ``url`` is the shared store's: that is where the checkpoints live for everybody else
    (the registry records it). Closing it closes both tiers.
    """

    def __init__(self, local: Store, shared: Store) -> None:
        super().__init__(shared.url)
        self.local = local
        self.shared = shared
        self.supports_fsync = local.supports_fsync
        self.supports_local_path = local.supports_local_path

    def __repr__(self) -> str:
        return f"TieredStore(local={self.local.url!r}, shared={self.shared.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # JSON arguments (each tier's own recipe), as the writer process needs
        from tlreg.ckpt.writer import store_recipe

        return (_rebuild_tiered, (store_recipe(self.local), store_recipe(self.shared)))

    def _read(self, key: str, read: Callable[[Store], T]) -> T:
        try:
            return read(self.local)
        except ObjectNotFound:
            return read(self.shared)

    def put(self, key: str, data: Data) -> None:
        self.local.put(key, data)

    def get(self, key: str) -> bytes:
        return self._read(key, lambda s: s.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._read(key, lambda s: s.get_range(key, start, length))

    def get_into(self, key: str, out: memoryview, start: int = 0) -> None:
        self._read(key, lambda s: s.get_into(key, out, start))

    def exists(self, key: str) -> bool:
        return self.local.exists(key) or self.shared.exists(key)

    def size(self, key: str) -> int:
        return self._read(key, lambda s: s.size(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        seen = set(self.local.list(prefix))
        yield from seen
        yield from (key for key in self.shared.list(prefix) if key not in seen)

    def delete(self, key: str) -> None:
        self.local.delete(key)

    def local_path(self, key: str) -> str | None:
        if self.local.exists(key):
            return self.local.local_path(key)
        return self.shared.local_path(key)

    def sweep_abandoned(self, before: datetime, *, dry_run: bool = False) -> int:
        return self.local.sweep_abandoned(before, dry_run=dry_run)

    def close(self) -> None:
        self.local.close()
        self.shared.close()


def _rebuild_tiered(local: dict[str, Any], shared: dict[str, Any]) -> TieredStore:
    from tlreg.ckpt.writer import build_store

    return TieredStore(build_store(local), build_store(shared))


class TokenBucket:
    """A bytes/s budget: :meth:`take` waits until ``n`` more bytes fit in it.

    It holds at most ``burst`` bytes (default one second of budget), so a drain that was idle
    does not then run unthrottled. ``rate`` None is no limit. ``taken`` and ``waited_s``
    account for what passed through and how long it was held back.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"a drain budget must be positive bytes/s, not {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()
        self.taken = 0
        self.waited_s = 0.0

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes are within the budget, then count them."""
        with self._lock:
            self.taken += n
            if self.rate is None:
                return
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            if self._tokens >= 0:
                return
            wait = -self._tokens / self.rate
            self.waited_s += wait
            self._sleep(wait)
            self._last = self._clock()
            self._tokens = 0.0


@dataclass
class DrainStats:
    """What one drain did."""

    objects: int = 0
    """Objects copied to the shared store."""
    present: int = 0
    """Objects the shared store already held (an earlier drain or save wrote them)."""
    bytes: int = 0
    """Bytes copied (chunk files and markers)."""
    seconds: float = 0.0
    throttled_s: float = 0.0
    """Of ``seconds``, the time the bytes/s budget held the copy back."""


def _transient(error: BaseException) -> bool:
    """Worth another try: a connection or I/O failure, not a missing key or a damaged copy."""
    return isinstance(error, OSError | ConnectionError) and not isinstance(
        error, ObjectNotFound | InvalidKey | CheckpointError
    )


class Drainer:
    """Copies local-tier checkpoints to the shared store on one background thread.

    One thread and a bytes/s budget (:class:`TokenBucket`) keep the drain from competing with
    training for CPU and bandwidth. Store operations that fail with a connection or I/O error
    are retried (``attempts`` in all, exponential back-off).
    """

    def __init__(
        self,
        local: Store,
        shared: Store,
        *,
        bytes_per_s: float | None = None,
        attempts: int = 4,
    ) -> None:
        self.local = local
        self.shared = shared
        self.bucket = TokenBucket(bytes_per_s)
        self._attempts = attempts
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tlreg-ckpt-drain")

    def submit(self, objects: Iterable[str], manifest_id: str | None = None) -> Future[DrainStats]:
        """Drain ``objects``, then (if given) manifest ``manifest_id``, in the background."""
        digests = list(objects)
        return self._pool.submit(self.drain, digests, manifest_id)

    def drain(self, objects: Iterable[str], manifest_id: str | None = None) -> DrainStats:
        """Copy ``objects`` (digests) that the shared store lacks, then the manifest.

        An object the local tier does not hold must already be in the shared store (a save
        deduplicated against it there); otherwise :class:`CheckpointError` names it.
        """
        stats = DrainStats()
        start, throttled = time.perf_counter(), self.bucket.waited_s
        for digest in objects:
            self._copy_object(digest, stats)
        if manifest_id is not None:
            key = manifest_key(manifest_id)
            raw = self._retry(lambda: self.local.get(key))
            self.bucket.take(len(raw))
            self._retry(lambda: self.shared.put(key, raw))
            stats.bytes += len(raw)
        stats.seconds = time.perf_counter() - start
        stats.throttled_s = self.bucket.waited_s - throttled
        return stats

    def _copy_object(self, digest: str, stats: DrainStats) -> None:
        if self._retry(lambda: is_stored(self.shared, digest)):
            stats.present += 1
            return
        try:
            layout = read_layout(self.local, digest)
        except ObjectNotFound:
            raise CheckpointError(
                f"object {digest} is neither on the local tier {self.local.url} nor in the "
                f"shared store {self.shared.url}: the checkpoint cannot be drained"
            ) from None
        whole = hasher(layout.nbytes)
        for index in range(layout.nchunks):
            key = chunk_key(digest, index)
            data = self.local.get(key)
            logical = min(layout.chunk, layout.nbytes - index * layout.chunk)
            whole.update(memoryview(data)[:logical])
            self.bucket.take(len(data))
            self._retry(functools.partial(self.shared.put, key, data))
            stats.bytes += len(data)
        if whole.hexdigest() != digest:
            raise CorruptCheckpoint(
                f"object {digest} on the local tier {self.local.url} fails its hash check: "
                "it was not drained (the shared store has no copy of it)"
            )
        marker = self.local.get(meta_key(digest))  # written last: the object is complete
        self._retry(lambda: self.shared.put(meta_key(digest), marker))
        stats.bytes += len(marker)
        stats.objects += 1

    def _retry(self, call: Callable[[], T]) -> T:
        for attempt in Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception(_transient),
            reraise=True,
        ):
            with attempt:
                return call()
        raise AssertionError("unreachable")  # Retrying re-raises the last error

    def close(self) -> None:
        """Finish the drains already submitted, then stop the thread."""
        self._pool.shutdown(wait=True)


SHARES = "shares"
"""The local tier's records of the rank shares it holds: ``shares/<manifest id>.json``, the
objects this node's rank wrote or referenced for that checkpoint (JSON). A rank other than 0
holds no manifest on its tier, so this is what keeps its share when the tier is pruned."""


def share_key(manifest_id: str) -> str:
    """The local-tier key of this node's share record of checkpoint ``manifest_id``."""
    return f"{SHARES}/{manifest_id}.json"


def write_share(local: Store, manifest_id: str, rank: int, objects: Iterable[str]) -> None:
    """Record on the local tier ``local`` that it holds rank ``rank``'s share of
    ``manifest_id``: the digests ``objects``."""
    record = {"manifest": manifest_id, "rank": rank, "objects": sorted(set(objects))}
    local.put(share_key(manifest_id), json.dumps(record).encode())


def _share_objects(local: Store, manifest_id: str) -> set[str] | None:
    try:
        record = json.loads(local.get(share_key(manifest_id)))
    except ObjectNotFound:
        return None
    except ValueError:
        raise CheckpointError(
            f"the share record {share_key(manifest_id)} on the local tier {local.url} is not "
            "JSON: delete it (its checkpoint is then pruned like one not kept) and prune again"
        ) from None
    return {str(d) for d in record.get("objects", [])}


@dataclass
class PruneStats:
    """What :func:`prune_local` removed from a local tier."""

    manifests: int = 0
    objects: int = 0
    bytes: int = 0
    removed: set[str] = field(default_factory=set)
    """The digests of the objects removed."""


def prune_local(local: Store, keep_manifests: Iterable[str]) -> PruneStats:
    """Delete from the local tier ``local`` every manifest not in ``keep_manifests`` and every
    object that no kept manifest references (the shared store is never touched).

    A kept checkpoint keeps the objects of its manifest, if the tier holds it (rank 0's node),
    and of this node's share record (:func:`write_share`; the other ranks' nodes). One that
    is on the tier in neither form keeps nothing here.
    """
    from tlreg.ckpt.manifest import read_manifest

    keep = set(keep_manifests)
    live: set[str] = set()
    for manifest_id in keep:
        share = _share_objects(local, manifest_id)  # this node's share (ranks other than 0)
        live.update(share or ())
        try:
            live.update(read_manifest(local, manifest_id).objects)
        except CheckpointError:
            continue  # not on this tier (or unreadable): it pins nothing more here
    stats = PruneStats()
    for key in list(local.list(SHARES)):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[: -len(".json")] not in keep:
            local.delete(key)
    for key in list(local.list("manifests")):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[: -len(".json")] not in keep:
            local.delete(key)
            stats.manifests += 1
    by_object: dict[str, list[str]] = {}
    for key in local.list("objects"):
        parts = key.split("/")
        if len(parts) >= 4:
            by_object.setdefault(parts[3], []).append(key)
    for digest, keys in by_object.items():
        if digest in live:
            continue
        # the marker first: an object is complete only while its zarr.json exists
        for key in sorted(keys, key=lambda k: not k.endswith("/zarr.json")):
            try:
                stats.bytes += local.size(key)
            except ObjectNotFound:
                pass
            local.delete(key)
        stats.objects += 1
        stats.removed.add(digest)
    return stats
