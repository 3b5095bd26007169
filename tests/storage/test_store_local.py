"""The local-directory store against the conformance suite; the oracle is the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from store_pickling import PickleTests

from tlreg.storage_backends import LocalStore, open_store
from tlreg.storage_backends.testing import DirectoryOracle, StoreTests


class TestLocalStore(StoreTests, PickleTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        return LocalStore(tmp_path / "store", durability="none")

    @pytest.fixture
    def oracle(self, store: LocalStore) -> DirectoryOracle:
        return DirectoryOracle(store.root)


class TestLocalStoreWithFsync(TestLocalStore):
    """The default (fsync on), through open_store with a file:// URL."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalStore:
        store = open_store((tmp_path / "store").as_uri())
        assert isinstance(store, LocalStore) and store.supports_fsync
        return store


def test_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, durability="none")
    store.put("a/b", [b"x", b"y"])
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]


def test_delete_prunes_empty_folders_but_not_the_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", durability="none")
    store.put("objects/ab/cd/x", b"1")
    store.delete("objects/ab/cd/x")
    assert (tmp_path / "root").is_dir()
    assert list((tmp_path / "root").iterdir()) == []
