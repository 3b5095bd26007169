"""The in-process store against the conformance suite; the oracle is its dict."""

from __future__ import annotations

import pickle

import pytest
from store_pickling import PickleTests

from tlreg.storage_backends import MemoryStore, open_store
from tlreg.storage_backends.testing import StoreTests


class DictOracle:
    def __init__(self, store: MemoryStore) -> None:
        self.objects = store._objects

    def read(self, key: str) -> bytes | None:
        return self.objects.get(key)

    def write(self, key: str, data: bytes) -> None:
        self.objects[key] = data


class TestMemoryStore(StoreTests, PickleTests):
    pickle_shares_data = False  # a worker gets a snapshot

    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore()

    @pytest.fixture
    def oracle(self, store: MemoryStore) -> DictOracle:
        return DictOracle(store)


def test_every_memory_url_opens_a_new_empty_store() -> None:
    a, b = open_store("memory://x"), open_store("memory://x")
    a.put("k", b"1")
    assert not b.exists("k")


def test_pickle_copies_the_contents() -> None:
    store = MemoryStore()
    store.put("k", b"1")
    clone = pickle.loads(pickle.dumps(store))
    clone.put("k2", b"2")
    assert clone.get("k") == b"1"
    assert not store.exists("k2")
