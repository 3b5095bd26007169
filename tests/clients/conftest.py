"""Real clients read tlreg's files: the libraries our users already have, at the versions
they have them, each checked on a local store and on the S3 server (see client_sites.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh tlreg store: a local folder, or a bucket of the S3 server."""
    if request.param == "s3":
        yield request.getfixturevalue("s3_bucket_url")
    else:
        yield str(tmp_path / "store")
