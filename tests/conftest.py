"""Shared fixtures: a real S3 server (SeaweedFS) for tests marked ``pytest.mark.s3``.

``s3_server`` (session): one ``weed mini`` on 127.0.0.1, every port it opens chosen free by
us, a fresh data directory and throwaway credentials. ``s3_bucket_url`` (function): a new
bucket and ``AWS_*`` variables set so that ``open_store("s3://<bucket>/<prefix>")`` works with
no options, as it would for a user. If the server cannot start, the fixture fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from s3_server import S3Server, seaweed_server

from tlreg.registry import Registry

# Nothing in the tests may leave 127.0.0.1: botocore must not probe a cloud metadata service
# (169.254.169.254), and no HTTP(S)_PROXY from the environment may carry local requests away.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h]
    if "127.0.0.1" not in _hosts:
        os.environ[_var] = ",".join([*_hosts, "127.0.0.1"])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session, stopped and wiped at the end."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(seaweed_server())
        except RuntimeError as e:
            pytest.fail(f"S3 tests need the local server: {e}")
        yield server


@pytest.fixture
def s3_bucket_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>/store``, with the environment a user of that server would set."""
    bucket = f"tlreg-{uuid.uuid4().hex[:16]}"
    s3_server.fs.mkdir(bucket)
    # SeaweedFS grows a volume for a bucket on its first non-empty write (~0.2 s, and >1 s
    # when several threads race for it): do it here, so tests time only themselves.
    s3_server.fs.pipe_file(f"{bucket}/.warm-up", b"1")
    s3_server.fs.rm_file(f"{bucket}/.warm-up")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # a developer's ~/.aws files must not leak a profile, endpoint or credentials in
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield f"s3://{bucket}/store"
    # Each bucket is a SeaweedFS collection with volumes of its own, and the server has room
    # for a few hundred volumes: drop the bucket, or a long session runs out (InternalError).
    with contextlib.suppress(Exception):
        s3_server.fs.rm(bucket, recursive=True)


# -- registries -------------------------------------------------------------------------------
# Every registry-backed test runs on SQLite (a temporary file) and on PostgreSQL. On PostgreSQL
# each test gets a fresh *schema* (selected through ``search_path`` in the URL) inside one
# database made for the session: CREATE DATABASE costs about a second on a busy machine,
# CREATE SCHEMA milliseconds, and isolation is the same since the registry only sees its own
# schema. PostgreSQL being down is a failure, not a skip: the suite promises both backends.

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}?options=-csearch_path%3D{schema}"


@pytest.fixture(scope="session")
def pg_session_database() -> Iterator[str]:
    """A database for this session's registry tests, dropped at the end."""
    import psycopg

    name = f"tlreg_{uuid.uuid4().hex}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it and rerun")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty registry database, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
        return
    import psycopg

    db = request.getfixturevalue("pg_session_database")
    schema = f"t_{uuid.uuid4().hex}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{db}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield PG_URL.format(db=db, schema=schema)
        finally:
            # Connections a test left open (a failed test's pool) must not block the drop.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid() AND state = 'idle'",
                (db,),
            )
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    """An open registry on an empty database; closed after the test."""
    reg = Registry(registry_url)
    try:
        yield reg
    finally:
        reg.close()
