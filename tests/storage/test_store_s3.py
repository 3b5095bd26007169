"""The S3 store against the conformance suite, on a real SeaweedFS server; the oracle is a
second s3fs client with its own credentials."""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import Any

import pytest
from store_pickling import PickleTests

from tlreg.storage_backends import ObjectNotFound, StoreUnavailable, open_store
from tlreg.storage_backends.s3 import MIN_PART_SIZE, THREADED_MIN, S3Store
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


class PartFails(S3Store):
    """A store whose upload of part ``failing`` fails (as a dropped connection would), after
    the parts before it have landed."""

    failing = 2

    def _sync_call(self, method: str, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs["PartNumber"] == self.failing:
            time.sleep(0.2)  # let the other parts in flight land first
            raise ConnectionResetError("network died")
        return super()._sync_call(method, **kwargs)


def _open_uploads(s3_server: Any, bucket: str) -> list[Any]:
    return s3_server.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads") or []


@pytest.mark.parametrize("failing", [1, 2, 4])
def test_a_part_failing_mid_upload_leaves_no_object_and_no_open_upload(
    s3_bucket_url: str, s3_server: Any, failing: int
) -> None:
    store = PartFails(s3_bucket_url, part_size=MIN_PART_SIZE, max_concurrency=2)
    store.failing = failing
    with pytest.raises(StoreUnavailable, match="network died") as info:
        store.put("big", os.urandom(3 * MIN_PART_SIZE + MIN_PART_SIZE // 2))
    assert "\n" not in str(info.value)
    assert not store.exists("big")
    assert not s3_server.fs.exists(f"{store.bucket}/{store.prefix}/big")
    assert _open_uploads(s3_server, store.bucket) == []


def test_a_failed_large_put_keeps_the_object_it_was_replacing(
    s3_bucket_url: str, s3_server: Any
) -> None:
    store = PartFails(s3_bucket_url, part_size=MIN_PART_SIZE)
    store.put("big", b"old")
    with pytest.raises(StoreUnavailable):
        store.put("big", os.urandom(3 * MIN_PART_SIZE))
    assert store.get("big") == b"old"
    assert _open_uploads(s3_server, store.bucket) == []


@pytest.mark.parametrize(
    "size",
    [THREADED_MIN, MIN_PART_SIZE + 1, 3 * MIN_PART_SIZE + MIN_PART_SIZE // 2],
    ids=["threaded-single-put", "two-parts", "3.5-parts"],
)
def test_large_puts_from_threads_round_trip_bit_exactly(
    store: S3Store, s3_server: Any, size: int
) -> None:
    data = os.urandom(size)
    # buffers whose edges fall inside parts, not on them
    pieces = [data[: MIN_PART_SIZE // 3], data[MIN_PART_SIZE // 3 : 2 * MIN_PART_SIZE - 5]]
    pieces.append(data[2 * MIN_PART_SIZE - 5 :])
    senders: set[str] = set()
    store._client().meta.events.register(
        "before-send.s3.UploadPart", lambda **_: senders.add(threading.current_thread().name)
    )
    store.put("big", pieces)
    assert s3_server.fs.cat_file(f"{store.bucket}/{store.prefix}/big") == data
    assert store.get("big") == data
    parts = -(-size // MIN_PART_SIZE)
    etag = s3_server.fs.info(f"{store.bucket}/{store.prefix}/big")["ETag"].strip('"')
    if parts > 1:
        assert etag.endswith(f"-{parts}")
        assert len(senders) > 1 and all(name.startswith("tlreg-s3") for name in senders)
    else:
        assert "-" not in etag and not senders  # one PUT


@pytest.mark.parametrize(
    "size",
    [MIN_PART_SIZE - 1, MIN_PART_SIZE, MIN_PART_SIZE + 1, 3 * MIN_PART_SIZE + 12345],
    ids=["one-short-of-a-part", "one-part", "one-byte-over", "3-parts-and-a-bit"],
)
def test_a_get_returns_the_exact_bytes_of_objects_around_the_part_size(
    store: S3Store, s3_server: Any, size: int
) -> None:
    data = os.urandom(size)
    s3_server.fs.pipe_file(f"{store.bucket}/{store.prefix}/obj", data)  # written by another
    got = store.get("obj")
    assert type(got) is bytes and len(got) == size and got == data


def _error(action: Any) -> str:
    with pytest.raises(StoreUnavailable) as info:
        action()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fault", ["wrong secret", "wrong key id", "missing bucket"])
def test_large_transfers_fail_with_the_same_one_line_error_as_small_ones(
    s3_bucket_url: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", os.urandom(2 * MIN_PART_SIZE + 1))
    url = s3_bucket_url
    if fault == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-5f2a")
    elif fault == "wrong key id":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOTTHEKEYID")
    else:
        url = "s3://tlreg-no-such-bucket-78/store"
    store = S3Store(url, part_size=MIN_PART_SIZE)
    small = _error(lambda: store.put("small", b"x"))
    assert _error(lambda: store.put("big", b"x" * (2 * MIN_PART_SIZE))) == small
    assert _error(lambda: store.put("mid", b"x" * THREADED_MIN)) == small
    assert _error(lambda: store.get("big")) == small
    assert _error(lambda: store.get("small")) == small
    assert url.split("/")[2] in small and "not-the-secret" not in small
    assert s3_server.secret_key not in small
    expected = "does not exist" if fault == "missing bucket" else "refused access"
    assert expected in small


def test_a_missing_key_is_object_not_found_on_the_large_path(store: S3Store) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("nothing/here")


def test_deletes_by_another_client_are_seen(store: S3Store, s3_server: Any) -> None:
    store.put("a/b", b"1")
    assert list(store.list("a")) == ["a/b"]
    s3_server.fs.rm_file(f"{store.bucket}/{store.prefix}/a/b")
    assert not store.exists("a/b")
    assert list(store.list("a")) == []


@pytest.mark.parametrize("used", [False, True], ids=["fresh", "after-a-large-put"])
def test_pickle_holds_no_credentials(store: S3Store, s3_server: Any, used: bool) -> None:
    if used:  # both clients made, credentials resolved
        store.put("big", b"x" * (MIN_PART_SIZE + 1))
        store.put("small", b"x")
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


def _connections_to(endpoint_url: str) -> set[int]:
    """Local ports of this process's open connections to the server (other tests' stores may
    hold some too, and close them when collected: compare sets, not counts)."""
    import psutil

    port = int(endpoint_url.rsplit(":", 1)[1].strip("/"))
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


def test_close_releases_the_connections_of_both_clients_and_a_later_call_reconnects(
    store: S3Store, s3_server: Any
) -> None:
    before = _connections_to(s3_server.endpoint_url)
    big = os.urandom(THREADED_MIN + 1)
    store.put("big", big)  # the synchronous client, from threads
    store.put("small", b"1")  # s3fs's client
    assert store.get("big") == big and store.get("small") == b"1"
    assert _connections_to(s3_server.endpoint_url) - before

    store.close()

    assert not _connections_to(s3_server.endpoint_url) - before
    assert store.get("big") == big and store.get("small") == b"1"
    store.close()
    assert not _connections_to(s3_server.endpoint_url) - before


def test_a_checkpointer_closes_the_store_it_opened_from_a_url_not_one_it_was_given(
    s3_bucket_url: str, s3_server: Any
) -> None:
    import torch

    from tlreg.ckpt import AsyncCheckpointer

    before = _connections_to(s3_server.endpoint_url)
    state = {"w": torch.arange(THREADED_MIN // 4 + 1, dtype=torch.float32)}
    with AsyncCheckpointer(s3_bucket_url) as owner:
        owner.save(state).result()
    assert not _connections_to(s3_server.endpoint_url) - before

    given = S3Store(s3_bucket_url)
    with AsyncCheckpointer(given) as borrower:
        borrower.save(state).result()
    assert _connections_to(s3_server.endpoint_url) - before  # still the caller's, still open
    given.close()
    assert not _connections_to(s3_server.endpoint_url) - before
