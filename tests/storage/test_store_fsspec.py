"""The generic fsspec store against the conformance suite, on two fsspec filesystems:
``file://`` (a filesystem: temporary name + rename) and ``memory://`` (an object store:
one upload)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from store_pickling import PickleTests

from tlreg.storage_backends.errors import StoreUnavailable
from tlreg.storage_backends.fsspec_store import FsspecStore
from tlreg.storage_backends.testing import DirectoryOracle, StoreTests


class TestFsspecFileStore(StoreTests, PickleTests):
    @pytest.fixture
    def store(self, tmp_path: Path) -> FsspecStore:
        store = FsspecStore((tmp_path / "store").as_uri())
        assert not store.atomic_put
        return store

    @pytest.fixture
    def oracle(self, tmp_path: Path) -> DirectoryOracle:
        return DirectoryOracle(tmp_path / "store")


class MemoryFsOracle:
    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.filesystem("memory"), root

    def read(self, key: str) -> bytes | None:
        path = f"{self.root}/{key}"
        return bytes(self.fs.cat_file(path)) if self.fs.isfile(path) else None

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{key}", data)


class TestFsspecMemoryStore(StoreTests, PickleTests):
    @pytest.fixture
    def store(self) -> Iterator[FsspecStore]:
        # fsspec's memory filesystem is one global namespace: a fresh folder per test
        root = f"/tlreg-test-{uuid.uuid4().hex}"
        store = FsspecStore(f"memory://{root}")
        assert store.atomic_put
        yield store
        memfs = fsspec.filesystem("memory")
        if memfs.exists(root):
            memfs.rm(root, recursive=True)

    @pytest.fixture
    def oracle(self, store: FsspecStore) -> MemoryFsOracle:
        return MemoryFsOracle(store.root)


def test_filesystem_put_hides_its_temporary_name(tmp_path: Path) -> None:
    store = FsspecStore(tmp_path.as_uri())
    store.put("a/b", [b"x", b"y"])
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]
    (tmp_path / "a" / ".c.tmp-0123").write_bytes(b"an abandoned write")
    assert list(store.list()) == ["a/b"]


@pytest.mark.parametrize(
    "options",
    [
        {"password": "hunter2-planted"},
        {"key": "AKIA-planted", "secret": "s-planted"},
        {"account_key": "planted"},
        {"client_kwargs": {"aws_secret_access_key": "planted"}},
        {"token": "planted"},
    ],
)
def test_credentials_as_storage_options_are_refused_without_echoing_them(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    with pytest.raises(StoreUnavailable, match="credentials cannot be storage options") as e:
        FsspecStore(tmp_path.as_uri(), **options)
    assert "planted" not in str(e.value)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing was opened or written
