"""S3 retries against the real server: transient errors are retried with backoff, a bounded
number of times; permanent ones fail at once. Each case counts the requests botocore sent.

The server is reached through a relay (``faultlib.TcpProxy``) that can reset connections or
stop listening, which is what a crashing or stopped server does to a client.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultlib import TcpProxy

from tlreg.storage_backends import StoreUnavailable
from tlreg.storage_backends.s3 import MIN_PART_SIZE, THREADED_MIN, S3Store

pytestmark = pytest.mark.s3


@pytest.fixture
def relay(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])).start()
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    yield proxy
    proxy.stop()


def _counted(store: S3Store, operation: str) -> list[float]:
    """Times at which botocore sent ``operation`` (every attempt, retries included)."""
    sent: list[float] = []
    store._fs.connect()
    store._fs.s3.meta.events.register(
        f"before-send.s3.{operation}", lambda **_: sent.append(time.monotonic())
    )
    return sent


def test_reset_connections_are_retried_until_the_put_lands(
    s3_bucket_url: str, relay: TcpProxy
) -> None:
    store = S3Store(s3_bucket_url, max_attempts=5)
    sent = _counted(store, "PutObject")
    relay.reset_next = 3
    store.put("k", b"payload")
    # every reset connection was an attempt that failed (aiohttp may open a replacement
    # connection within one attempt), and the last attempt landed
    assert relay.reset_next == 0 and 2 <= len(sent) <= 4
    assert store.get("k") == b"payload"


def test_retries_are_bounded_and_the_error_names_bucket_endpoint_and_knob(
    s3_bucket_url: str, relay: TcpProxy
) -> None:
    store = S3Store(s3_bucket_url, max_attempts=3)
    sent = _counted(store, "PutObject")
    relay.reset_next = 1000
    with pytest.raises(StoreUnavailable) as info:
        store.put("k", b"payload")
    message = str(info.value)
    assert len(sent) == 3
    assert "\n" not in message and s3_bucket_url.split("/")[2] in message
    assert f"127.0.0.1:{relay.port}" in message and "TLREG_S3_MAX_ATTEMPTS" in message


def _counted_sync(store: S3Store, operation: str) -> list[float]:
    """As ``_counted``, for the thread pool's botocore client (objects over THREADED_MIN)."""
    sent: list[float] = []
    store._client().meta.events.register(
        f"before-send.s3.{operation}", lambda **_: sent.append(time.monotonic())
    )
    return sent


def test_reset_connections_on_the_large_path_are_retried_until_the_put_lands(
    s3_bucket_url: str, relay: TcpProxy
) -> None:
    store = S3Store(s3_bucket_url, max_attempts=5, part_size=MIN_PART_SIZE)
    sent = _counted_sync(store, "CreateMultipartUpload")
    data = os.urandom(2 * MIN_PART_SIZE + 3)
    relay.reset_next = 2
    store.put("big", data)
    assert relay.reset_next == 0 and 2 <= len(sent) <= 3
    assert store.get("big") == data


@pytest.mark.parametrize("action", ["multipart put", "threaded put", "large get"])
def test_large_path_retries_are_bounded_and_the_error_is_the_small_paths(
    s3_bucket_url: str, s3_server: Any, relay: TcpProxy, action: str
) -> None:
    store = S3Store(s3_bucket_url, max_attempts=3, part_size=MIN_PART_SIZE)
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", b"x" * (MIN_PART_SIZE + 1))
    operation = {
        "multipart put": "CreateMultipartUpload",
        "threaded put": "PutObject",
        "large get": "GetObject",
    }[action]
    sent = _counted_sync(store, operation)
    relay.reset_next = 1000
    with pytest.raises(StoreUnavailable) as info:
        if action == "multipart put":
            store.put("big", b"x" * (MIN_PART_SIZE + 1))
        elif action == "threaded put":
            store.put("big", b"x" * THREADED_MIN)
        else:
            store.get("big")
    message = str(info.value)
    assert len(sent) == 3
    assert "\n" not in message and s3_bucket_url.split("/")[2] in message
    assert f"127.0.0.1:{relay.port}" in message and "TLREG_S3_MAX_ATTEMPTS" in message
    assert message.startswith("S3 request for object 'big' in bucket")


def test_a_server_back_within_the_retry_window_gets_the_put(
    s3_bucket_url: str, relay: TcpProxy
) -> None:
    store = S3Store(s3_bucket_url, max_attempts=8)
    sent = _counted(store, "PutObject")
    relay.stop()
    threading.Timer(0.5, relay.start).start()
    store.put("k", b"after the outage")
    assert len(sent) >= 2
    assert store.get("k") == b"after the outage"


def test_the_attempt_count_comes_from_the_environment(
    s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLREG_S3_MAX_ATTEMPTS", "2")
    assert S3Store(s3_bucket_url).max_attempts == 2
    monkeypatch.setenv("TLREG_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="TLREG_S3_MAX_ATTEMPTS='many'"):
        S3Store(s3_bucket_url)


@pytest.mark.parametrize("fault", ["wrong secret", "missing bucket"])
def test_permanent_errors_fail_at_once_without_the_secret(
    s3_bucket_url: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    url = s3_bucket_url
    if fault == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-5f2a")
    else:
        url = "s3://tlreg-no-such-bucket-77/store"
    store = S3Store(url, max_attempts=5)
    sent = _counted(store, "PutObject")
    with pytest.raises(StoreUnavailable) as info:
        store.put("k", b"x")
    assert len(sent) == 1
    message = str(info.value)
    assert url.split("/")[2] in message and "\n" not in message
    assert "not-the-secret" not in message and s3_server.secret_key not in message


def test_gc_sweep_aborts_multipart_uploads_abandoned_before_the_cutoff(s3_bucket_url: str) -> None:
    from datetime import datetime, timedelta, timezone

    store = S3Store(s3_bucket_url)
    key = store._key("objects/ab/cd/dead/c/0")
    upload = store._call("create_multipart_upload", Key=key)  # a writer killed mid-upload
    store._call("upload_part", Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    store.put("objects/ab/cd/live", b"whole")
    now = datetime.now(timezone.utc)
    assert store.sweep_abandoned(now - timedelta(hours=1)) == 0  # young: maybe still running
    assert store.sweep_abandoned(now + timedelta(seconds=5), dry_run=True) == 1
    assert store.sweep_abandoned(now + timedelta(seconds=5)) == 1
    assert store.sweep_abandoned(now + timedelta(seconds=5)) == 0
    assert list(store.list()) == ["objects/ab/cd/live"]


def test_a_get_whose_body_breaks_mid_way_is_read_again_exactly(
    s3_bucket_url: str, s3_server: Any, relay: TcpProxy
) -> None:
    data = os.urandom(3 * MIN_PART_SIZE + 5)
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", data)  # not through the relay
    store = S3Store(s3_bucket_url, max_attempts=3, part_size=MIN_PART_SIZE)
    sent = _counted_sync(store, "GetObject")
    relay.cut_after, relay.cut_next = 1 << 20, 2  # two replies reset after 1 MiB

    assert store.get("big") == data

    assert relay.cut_next == 0
    assert len(sent) == 4 + 2  # four ranges, two of them requested again


@pytest.mark.parametrize("reader", ["get_range", "get_into"])
@pytest.mark.parametrize(
    ("start", "length", "ranges"),
    [
        (1000, 3 << 20, 1),
        (MIN_PART_SIZE // 2, 2 * MIN_PART_SIZE, 2),
        (3 * MIN_PART_SIZE - (2 << 20), 4 << 20, 1),
    ],
    ids=["within-a-part", "across-parts", "past-the-end"],
)
def test_a_ranged_read_whose_body_breaks_mid_way_is_read_again_exactly(
    s3_bucket_url: str,
    s3_server: Any,
    relay: TcpProxy,
    reader: str,
    start: int,
    length: int,
    ranges: int,
) -> None:
    data = os.urandom(3 * MIN_PART_SIZE + 5)
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", data)  # not through the relay
    store = S3Store(s3_bucket_url, max_attempts=3, part_size=MIN_PART_SIZE)
    sent = _counted_sync(store, "GetObject")
    expected = data[start : start + length]
    relay.cut_after, relay.cut_next = 1 << 20, ranges  # every range's first reply breaks

    if reader == "get_range":
        assert store.get_range("big", start, length) == expected
    else:
        out = bytearray(len(expected))
        store.get_into("big", memoryview(out), start)
        assert out == expected

    assert relay.cut_next == 0
    assert len(sent) == 2 * ranges  # each range requested again once


@pytest.mark.parametrize("reader", ["get_range", "get_into"])
def test_a_ranged_read_whose_body_keeps_breaking_fails_after_max_attempts_gets(
    s3_bucket_url: str, s3_server: Any, relay: TcpProxy, reader: str
) -> None:
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", os.urandom(MIN_PART_SIZE))
    store = S3Store(s3_bucket_url, max_attempts=3, part_size=MIN_PART_SIZE)
    relay.cut_after, relay.cut_next = 1 << 20, 1000
    before = relay.accepted

    with pytest.raises(StoreUnavailable) as info:
        if reader == "get_range":
            store.get_range("big", 1000, 3 << 20)
        else:
            store.get_into("big", memoryview(bytearray(3 << 20)), 1000)

    # counted at the relay, whichever client sent them: every broken body closes its
    # connection, so each GET came on a connection of its own
    assert relay.accepted - before == 3
    message = str(info.value)
    assert "\n" not in message and message.startswith("S3 request for object 'big' in bucket")
    assert "TLREG_S3_MAX_ATTEMPTS" in message


def test_bodies_that_keep_breaking_fail_after_max_attempts_with_the_usual_error(
    s3_bucket_url: str, s3_server: Any, relay: TcpProxy
) -> None:
    s3_server.fs.pipe_file(f"{s3_bucket_url[5:]}/big", os.urandom(MIN_PART_SIZE + 1))
    store = S3Store(s3_bucket_url, max_attempts=3, part_size=MIN_PART_SIZE, max_concurrency=1)
    sent = _counted_sync(store, "GetObject")
    relay.cut_after, relay.cut_next = 1 << 20, 1000

    with pytest.raises(StoreUnavailable) as info:
        store.get("big")

    message = str(info.value)
    assert 3 <= len(sent) <= 6  # each range at most max_attempts times
    assert "\n" not in message and message.startswith("S3 request for object 'big' in bucket")
    assert "TLREG_S3_MAX_ATTEMPTS" in message


@pytest.mark.parametrize(
    "operation, call",
    [
        ("HeadObject", lambda store: store.exists("k")),
        ("ListObjectsV2", lambda store: list(store.list())),
        ("PutObject", lambda store: store.put("k", b"payload")),
    ],
)
def test_requests_on_the_s3fs_client_are_sent_max_attempts_times_not_more(
    s3_bucket_url: str, relay: TcpProxy, operation: str, call: Any
) -> None:
    # replies that break mid-way are retried by botocore; s3fs's own retry loop (5 rounds by
    # default) must not multiply its attempts
    store = S3Store(s3_bucket_url, max_attempts=3)
    sent = _counted(store, operation)
    relay.cut_after, relay.cut_next = 1, 1000

    with pytest.raises(StoreUnavailable) as info:
        call(store)

    assert len(sent) == 3
    assert "\n" not in str(info.value) and "TLREG_S3_MAX_ATTEMPTS" in str(info.value)
