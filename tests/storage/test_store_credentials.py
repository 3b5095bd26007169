"""Every backend refuses the same credential options (one list, storage_backends.credentials),
without echoing their values: a store's options pickle, and would travel to every worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tlreg.storage_backends import StoreUnavailable
from tlreg.storage_backends.credentials import SECRET_OPTIONS, SECRET_WORDS, secret_options
from tlreg.storage_backends.fsspec_store import FsspecStore
from tlreg.storage_backends.s3 import S3Store

PLANTED = "planted-5e7c"

SECRETS: list[dict[str, Any]] = [
    *({name: PLANTED} for name in sorted(SECRET_OPTIONS)),
    *({word: PLANTED} for word in SECRET_WORDS),
    {"client_secret": PLANTED},
    {"sas_token": PLANTED},
    {"AWS_SECRET_ACCESS_KEY": PLANTED},
    {"client_kwargs": {"aws_secret_access_key": PLANTED}},
    {"client_kwargs": {"aws_session_token": PLANTED}},
    {"client_kwargs": {"password": PLANTED}},
]


def _refusals(options: dict[str, Any], tmp_path: Path) -> list[str]:
    """Which backends refuse ``options`` (each must say so without the planted value)."""
    refused = []
    try:
        S3Store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", **options)
    except ValueError as e:
        assert "AWS_ACCESS_KEY_ID" in str(e) and PLANTED not in str(e)
        refused.append("s3")
    try:
        FsspecStore(tmp_path.as_uri(), **options)
    except StoreUnavailable as e:
        assert "credentials cannot be storage options" in str(e) and PLANTED not in str(e)
        refused.append("fsspec")
    return refused


@pytest.mark.parametrize("options", SECRETS, ids=lambda o: ",".join(o))
def test_s3_and_fsspec_refuse_the_same_credential_options(
    options: dict[str, Any], tmp_path: Path
) -> None:
    assert secret_options(options)
    assert _refusals(options, tmp_path) == ["s3", "fsspec"]


@pytest.mark.parametrize(
    "options", [{"anon": False}, {"default_block_size": 2**20}, {"client_kwargs": {}}]
)
def test_options_without_secrets_are_accepted_by_both(
    options: dict[str, Any], tmp_path: Path
) -> None:
    assert secret_options(options) == []
    assert _refusals(options, tmp_path) == []


def test_a_user_name_is_a_secret_for_s3_only() -> None:
    # s3fs reads username= as the access key id; for sftp, ftp, smb or webdav it is a login
    assert secret_options({"username": "bob"}, s3=True) == ["username"]
    assert secret_options({"username": "bob"}) == []
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        S3Store("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", username=PLANTED)
