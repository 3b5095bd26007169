"""The S3 store against the conformance suite, on a real SeaweedFS server; the oracle is a
second s3fs client with its own credentials."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from store_pickling import PickleTests

from tlreg.storage_backends import StoreUnavailable, open_store
from tlreg.storage_backends.s3 import MIN_PART_SIZE, S3Store
from tlreg.storage_backends.testing import StoreTests

pytestmark = pytest.mark.s3


class S3Oracle:
    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root

    def read(self, key: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(f"{self.root}/{key}"))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{key}", data)


class TestS3Store(StoreTests, PickleTests):
    large_size = 2 * MIN_PART_SIZE + 12345  # three parts of a multipart upload
    hypothesis_examples = 15

    @pytest.fixture
    def store(self, s3_bucket_url: str) -> S3Store:
        store = open_store(s3_bucket_url, part_size=MIN_PART_SIZE)
        assert isinstance(store, S3Store)
        return store

    @pytest.fixture
    def oracle(self, s3_server: Any, store: S3Store) -> S3Oracle:
        return S3Oracle(s3_server.fs, f"{store.bucket}/{store.prefix}")


def test_store_at_the_bucket_root_lists_keys_relative_to_it(
    s3_bucket_url: str, s3_server: Any
) -> None:
    store = open_store(s3_bucket_url.rsplit("/", 1)[0])  # s3://bucket, no prefix
    assert isinstance(store, S3Store) and store.prefix == ""
    store.put("a/b", b"1")
    s3_server.fs.pipe_file(f"{store.bucket}/ab/c", b"2")
    assert sorted(store.list()) == ["a/b", "ab/c"]
    assert list(store.list("a")) == ["a/b"]
    assert store.get("ab/c") == b"2"
    store.delete("a/b")
    assert list(store.list()) == ["ab/c"]


@pytest.fixture
def store(s3_bucket_url: str) -> S3Store:
    return S3Store(s3_bucket_url, part_size=MIN_PART_SIZE)


def test_large_put_is_a_multipart_upload(store: S3Store, s3_server: Any) -> None:
    store.put("big", [b"x" * MIN_PART_SIZE, b"y" * MIN_PART_SIZE, b"z"])
    etag = s3_server.fs.info(f"{store.bucket}/{store.prefix}/big")["ETag"]
    assert etag.strip('"').endswith("-3")  # S3's multipart ETag: md5-of-parts-<count>


def test_failed_multipart_upload_leaves_nothing(
    store: S3Store, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = store._fs._call_s3

    async def flaky(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs["PartNumber"] == 2:
            raise ConnectionResetError("network died")
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(store._fs, "_call_s3", flaky)
    with pytest.raises(StoreUnavailable, match="network died"):
        store.put("big", b"x" * (3 * MIN_PART_SIZE))
    monkeypatch.undo()
    assert not store.exists("big")
    uploads = s3_server.fs.call_s3("list_multipart_uploads", Bucket=store.bucket)
    assert not uploads.get("Uploads")


def test_deletes_by_another_client_are_seen(store: S3Store, s3_server: Any) -> None:
    store.put("a/b", b"1")
    assert list(store.list("a")) == ["a/b"]
    s3_server.fs.rm_file(f"{store.bucket}/{store.prefix}/a/b")
    assert not store.exists("a/b")
    assert list(store.list("a")) == []


def test_pickle_holds_no_credentials(store: S3Store, s3_server: Any) -> None:
    blob = pickle.dumps(store)
    assert s3_server.secret_key.encode() not in blob
    assert s3_server.access_key.encode() not in blob
    assert s3_server.secret_key not in repr(store)


def test_unpickled_store_reads_credentials_from_its_environment(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("k", b"1")
    blob = pickle.dumps(store)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreUnavailable, match="AWS_SECRET_ACCESS_KEY"):
        pickle.loads(blob).get("k")


@pytest.mark.parametrize("option", [{"key": "AK"}, {"secret": "s"}, {"token": "t"},
                                    {"client_kwargs": {"aws_secret_access_key": "s"}}])  # fmt: skip
def test_credentials_are_refused_as_options(option: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        S3Store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", **option)
