"""open_store: URL scheme -> backend, and the errors a user sees for a wrong URL or setup."""

from __future__ import annotations

import importlib.util
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest

from tlreg.storage_backends import (
    BackendMissing,
    LocalStore,
    MemoryStore,
    StoreUnavailable,
    UnknownScheme,
    open_store,
)
from tlreg.storage_backends.fsspec_store import FsspecStore
from tlreg.storage_backends.s3 import S3Store


def test_plain_path_opens_a_local_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    assert isinstance(store, LocalStore) and store.root == tmp_path / "s"


def test_file_url_opens_a_local_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/s", durability="none")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "s"
    assert not store.supports_fsync


def test_memory_url_opens_a_memory_store() -> None:
    assert isinstance(open_store("memory://scratch"), MemoryStore)


def test_s3_url_opens_an_s3_store_without_contacting_it() -> None:
    store = open_store("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("bucket", "some/prefix")


def test_other_fsspec_protocols_open_an_fsspec_store(tmp_path: Path) -> None:
    store = open_store(f"local://{tmp_path}")
    assert isinstance(store, FsspecStore)
    store.put("k", b"1")
    assert (tmp_path / "k").read_bytes() == b"1"


def test_a_store_is_returned_unchanged() -> None:
    store = MemoryStore()
    assert open_store(store) is store


def test_empty_url_is_an_error() -> None:
    with pytest.raises(UnknownScheme, match="empty store URL"):
        open_store("")


def test_unknown_scheme_names_it_and_the_choices() -> None:
    with pytest.raises(UnknownScheme) as info:
        open_store("xyz://somewhere/x")
    assert str(info.value) == (
        "unknown store URL scheme 'xyz://': use a path, file://, memory://, s3:// "
        "or an installed fsspec protocol"
    )
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_known_fsspec_protocol_without_its_package_gives_the_install_hint() -> None:
    with pytest.raises(BackendMissing, match="install gcsfs") as info:
        open_store("gcs://bucket/prefix")
    assert isinstance(info.value, ImportError)


def test_s3_without_s3fs_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now raises ImportError
    monkeypatch.delitem(sys.modules, "tlreg.storage_backends.s3")
    with pytest.raises(BackendMissing, match=r"install s3fs .*tlreg\[s3\]"):
        open_store("s3://bucket/prefix")


def _assert_secret_free(error: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(error))
    for secret in secrets:
        assert secret not in text


@pytest.mark.s3
def test_wrong_credentials_raise_store_unavailable_without_the_secret(
    s3_bucket_url: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = open_store(s3_bucket_url)
    bucket = s3_bucket_url.split("/")[2]
    for call in (
        lambda: store.put("k", b"1"),
        lambda: store.get("k"),
        lambda: store.exists("k"),
        lambda: list(store.list()),
    ):
        with pytest.raises(StoreUnavailable) as info:
            call()
        message = str(info.value)
        assert repr(bucket) in message
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
        _assert_secret_free(info.value, wrong, s3_server.secret_key)


@pytest.mark.s3
def test_missing_credentials_raise_store_unavailable(
    s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreUnavailable, match="no AWS credentials"):
        open_store(s3_bucket_url).get("k")


@pytest.mark.s3
def test_missing_bucket_message_names_the_bucket(s3_bucket_url: str, s3_server: Any) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    store = open_store(f"s3://{bucket}/prefix")
    expected = (
        f"bucket '{bucket}' does not exist at {s3_server.endpoint_url}: "
        "create it or fix TLREG_STORE_URL"
    )
    for call in (
        lambda: store.put("k", b"1"),
        lambda: store.put("big", b"x" * (17 * 2**20)),  # a multipart upload
        lambda: store.get("k"),
        lambda: store.size("k"),
        lambda: store.exists("k"),
        lambda: list(store.list()),
        lambda: store.delete("k"),
    ):
        with pytest.raises(StoreUnavailable) as info:
            call()
        assert str(info.value) == expected
