"""zarr's own store conformance suite, ``zarr.testing.store.StoreTests``, against
:class:`~tlreg.ckpt.view.CheckpointStore` in its read-only form, on a local store and on the
S3 server.

The suite's fixtures write arbitrary keys into the store under test, or "behind its back"
(its ``set`` helper), and read them back. A checkpoint view holds only the keys its
manifest gives it, and nothing can write there; so the tests that need such a write are
skipped, each with its reason (:data:`NEEDS_WRITES`), and the suite's ``set`` helper skips
too. The tests that need none run as zarr wrote them, except where a read-only store's
answer is the other branch of the same assertion (``read_only`` is True; opening with
``read_only=False`` is refused), or the key the test reads must be one the view holds
(``test_get_raises``, ``test_exists``, ``test_get_bytes``, ``test_get_json``,
``test_is_empty``, ``test_list_dir``, and ``test_serializable_store`` without its write);
those are rewritten here, named the same. The view's own reads
(every chunk, every byte request) are checked against the tensors in tests/ckpt/.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, cpu, default_buffer_prototype
from zarr.core.sync import _collect_aiterator
from zarr.testing.store import StoreTests

from tlreg.ckpt import AsyncCheckpointer
from tlreg.ckpt.view import CheckpointStore
from tlreg.storage_backends import Store, open_store

_WRITES = "it writes keys into the store (a checkpoint view is read-only)"
_BEHIND = "it puts arbitrary keys behind the store's back (a view holds only its manifest's keys)"
_EMPTY = "it expects an empty store first (a view always holds its checkpoint)"

NEEDS_WRITES: dict[str, str] = {
    "test_get": _BEHIND,
    "test_get_not_open": _BEHIND,
    "test_get_many": _BEHIND,
    "test_getsize": _BEHIND,
    "test_getsize_prefix": _WRITES,
    "test_set": _WRITES,
    "test_set_not_open": _WRITES,
    "test_set_many": _WRITES,
    "test_get_partial_values": _BEHIND,
    "test_clear": _BEHIND,
    "test_list": _EMPTY,
    "test_list_prefix": _WRITES,
    "test_list_empty_path": _WRITES,
    "test_set_if_not_exists": _BEHIND,
    "test_get_bytes_sync": _BEHIND,
    "test_get_json_sync": _BEHIND,
    "test_get_sync": _BEHIND,
    "test_get_sync_missing": "the view implements no SupportsGetSync",
    "test_set_sync": _WRITES,
    "test_delete_sync": _WRITES,
    "test_delete_sync_missing": "the view implements no SupportsDeleteSync",
}


def _skipped(reason: str) -> Any:
    def test(self: Any, *args: Any, **kwargs: Any) -> None:
        pytest.skip(reason)

    return test


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def checkpoint(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Store, str]]:
    """A tlreg store holding one small checkpoint, and its manifest id."""
    if request.param == "s3":
        url = request.getfixturevalue("s3_bucket_url")
    else:
        url = str(tmp_path / "store")
    store = open_store(url)
    torch.manual_seed(0)
    state = {
        "model": {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)},
        "step": torch.tensor(7),
    }
    with AsyncCheckpointer(store) as engine:
        manifest_id = engine.save(state, step=7).result()
    yield store, str(manifest_id)


class TestCheckpointStoreIsAZarrStore(StoreTests[CheckpointStore, cpu.Buffer]):
    store_cls = CheckpointStore
    buffer_cls = cpu.Buffer

    @pytest.fixture
    def store_kwargs(self, checkpoint: tuple[Store, str]) -> dict[str, Any]:
        store, manifest_id = checkpoint
        return {"store": store, "manifest_id": manifest_id}

    async def set(self, store: CheckpointStore, key: str, value: Buffer) -> None:
        pytest.skip(_BEHIND)

    async def get(self, store: CheckpointStore, key: str) -> Buffer:
        pytest.skip(_WRITES)

    def test_store_repr(self, store: CheckpointStore) -> None:
        assert repr(store) == f"CheckpointStore({store.store.url!r}, {store.manifest.id!r})"

    def test_store_supports_writes(self, store: CheckpointStore) -> None:
        assert not store.supports_writes
        assert not store.supports_deletes

    def test_store_supports_listing(self, store: CheckpointStore) -> None:
        assert store.supports_listing

    # a read-only store's side of zarr's assertions
    def test_store_read_only(self, store: CheckpointStore) -> None:
        assert store.read_only
        with pytest.raises(AttributeError):
            store.read_only = False  # type: ignore[misc]

    @pytest.mark.parametrize("read_only", [True, False])
    async def test_store_open_read_only(self, open_kwargs: dict[str, Any], read_only: bool) -> None:
        open_kwargs["read_only"] = read_only
        if not read_only:
            with pytest.raises(ValueError, match="a checkpoint view is read-only"):
                await self.store_cls.open(**open_kwargs)
            return
        store = await self.store_cls.open(**open_kwargs)
        assert store._is_open
        assert store.read_only

    async def test_get_raises(self, store: CheckpointStore) -> None:
        """zarr's test, on a chunk the view holds (zarr's writes "c/0" first)."""
        key = "model/fc.weight/c/0/0"
        assert await store.exists(key)
        with pytest.raises((ValueError, TypeError), match=r"Unexpected byte_range, got.*"):
            await store.get(key, prototype=default_buffer_prototype(), byte_range=(0, 2))  # type: ignore[arg-type]

    async def test_serializable_store(self, store: CheckpointStore) -> None:
        """zarr's test without its write: the unpickled store is equal and reads the same."""
        new_store: CheckpointStore = pickle.loads(pickle.dumps(store))
        assert new_store == store
        assert new_store.read_only == store.read_only
        key = "model/fc.weight/c/0/0"
        prototype = default_buffer_prototype()
        observed = await new_store.get(key, prototype=prototype)
        expected = await store.get(key, prototype=prototype)
        assert observed is not None and expected is not None
        assert observed.to_bytes() == expected.to_bytes()

    async def test_exists(self, store: CheckpointStore) -> None:
        assert not await store.exists("foo")
        assert await store.exists("zarr.json")
        assert await store.exists("model/fc.bias/zarr.json")
        assert await store.exists("model/fc.bias/c/0")
        assert not await store.exists("model/fc.bias/c/1")

    async def test_get_bytes(self, store: CheckpointStore) -> None:
        data = await store._get_bytes("zarr.json", prototype=default_buffer_prototype())
        assert json.loads(data)["node_type"] == "group"
        with pytest.raises(FileNotFoundError):
            await store._get_bytes("nonexistent_key", prototype=default_buffer_prototype())

    async def test_get_json(self, store: CheckpointStore) -> None:
        doc = await store._get_json(
            "model/fc.weight/zarr.json", prototype=default_buffer_prototype()
        )
        assert (doc["shape"], doc["data_type"]) == ([4, 3], "float32")
        assert doc["dimension_names"] == ["fc.weight#0", "fc.weight#1"]

    async def test_is_empty(self, store: CheckpointStore) -> None:
        assert not await store.is_empty("")
        assert await store.is_empty("mod")  # a prefix is a folder, not a string prefix
        assert not await store.is_empty("model/")
        assert not await store.is_empty("model")
        assert await store.is_empty("spam/")

    async def test_list_dir(self, store: CheckpointStore) -> None:
        assert sorted(await _collect_aiterator(store.list_dir(""))) == sorted(
            ["zarr.json", "model", "step"]
        )
        for root in ("model", "model/"):
            observed = await _collect_aiterator(store.list_dir(root))
            assert sorted(observed) == ["fc.bias", "fc.weight", "zarr.json"]
        observed = await _collect_aiterator(store.list_dir("model/fc.weight"))
        assert sorted(observed) == ["c", "zarr.json"]

    # the view's reads, as zarr's test_get reads (every kind of byte request)
    @pytest.mark.parametrize(
        "byte_range",
        [None, RangeByteRequest(1, 4), OffsetByteRequest(1), SuffixByteRequest(1)],
    )
    async def test_get_reads_the_tensor_bytes(
        self, store: CheckpointStore, checkpoint: tuple[Store, str], byte_range: Any
    ) -> None:
        observed = await store.get(
            "model/fc.bias/c/0", prototype=default_buffer_prototype(), byte_range=byte_range
        )
        assert observed is not None
        whole = (await store.get("model/fc.bias/c/0", default_buffer_prototype())).to_bytes()
        assert len(whole) == 16
        expected = {
            None: whole,
            RangeByteRequest: whole[1:4],
            OffsetByteRequest: whole[1:],
            SuffixByteRequest: whole[-1:],
        }[None if byte_range is None else type(byte_range)]
        assert observed.to_bytes() == expected


for _name, _reason in NEEDS_WRITES.items():
    assert hasattr(StoreTests, _name), _name  # a test zarr renamed or dropped
    setattr(TestCheckpointStoreIsAZarrStore, _name, _skipped(_reason))
