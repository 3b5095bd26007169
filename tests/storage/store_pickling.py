"""Pickling of stores (Ray ships them to workers), for every backend's conformance tests.

Kept out of the package on purpose: no tlreg module unpickles anything. These tests pickle a
store object they made themselves, never stored data.
"""

from __future__ import annotations

import pickle

import pytest

from tlreg.storage_backends import Store
from tlreg.storage_backends.testing import Oracle


class PickleTests:
    """Mix into a ``StoreTests`` subclass: its ``store`` and ``oracle`` fixtures and its
    ``pickle_shares_data`` flag are used."""

    pickle_shares_data: bool

    def test_pickled_store_works(self, store: Store) -> None:
        store.put("p/before", b"before")
        clone = pickle.loads(pickle.dumps(store))
        assert type(clone) is type(store)
        assert clone.url == store.url
        assert clone.get("p/before") == b"before"
        clone.put("p/clone", b"from clone")
        assert clone.get("p/clone") == b"from clone"

    def test_pickled_store_reaches_the_same_objects(self, store: Store, oracle: Oracle) -> None:
        if not self.pickle_shares_data:
            pytest.skip("this store's pickle is a copy of its contents")
        clone = pickle.loads(pickle.dumps(store))
        clone.put("p/clone", b"from clone")
        assert oracle.read("p/clone") == b"from clone"
        assert store.get("p/clone") == b"from clone"
