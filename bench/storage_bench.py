"""Store throughput: tlreg's stores against the raw client writing the same bytes, same run.

Local disk: ``LocalStore.put`` (durability "full": fsync the file, rename, fsync the folder)
against plain ``open``/``write``/``fsync``/``os.replace``/folder fsync, both from the same
page-aligned buffer (as checkpoints are written from their staging arena); reads are ``get``
against ``open().read()``, both cold (the files dropped from the page cache first).
S3: ``S3Store`` against boto3's transfer manager (``upload_fileobj``/``download_fileobj``
with a tuned ``TransferConfig``: 16 MiB parts, 8 threads per object) on a SeaweedFS server
started on loopback for the run. Both sides put
``--threads`` objects at once (as the checkpoint writer does) and each size's total is the
same, so the columns compare MB/s for the same work; every figure is the median of
``--repeat`` runs, tlreg and raw interleaved.

    make bench-storage                       # installs boto3 to match botocore, then runs this
    python bench/storage_bench.py            # 64 KiB .. 256 MiB objects, 256 MiB per size
    python bench/storage_bench.py --quick    # 32 MiB per size, one repetition
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from _cache import evict
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from tlreg.storage_backends import LocalStore
from tlreg.storage_backends.s3 import S3Store

# The throwaway S3 server lives beside the test suite, not in tlreg.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import seaweed_server

SIZES = [64 << 10, 1 << 20, 16 << 20, 256 << 20]
MiB = 1 << 20


def _raw_local_put(root: Path, key: str, data: bytes | memoryview) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_pair(
    runs: dict[str, list[float]], rep: int, threads: int, pair: dict[str, list[Callable[..., Any]]]
) -> None:
    """Time both sides of one comparison, tlreg first on even repetitions, raw first on odd
    ones, so neither side always meets the warmer cache."""
    names = list(pair) if rep % 2 == 0 else list(reversed(pair))
    for name in names:
        runs[name].append(_timed(threads, pair[name]))


def _timed(threads: int, jobs: list[Callable[[], Any]]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    return time.perf_counter() - start


def _median_rates(runs: dict[str, list[float]], nbytes: int) -> dict[str, float]:  # MB/s per method
    return {name: nbytes / statistics.median(times) / 1e6 for name, times in runs.items()}


def bench_local(root: Path, size: int, count: int, repeat: int, threads: int) -> dict[str, float]:
    # page-aligned, like the staging buffers checkpoints are written from
    buffer = mmap.mmap(-1, size)
    buffer.write(os.urandom(size))
    data = memoryview(buffer)
    store = LocalStore(root / "tlreg", durability="full")
    raw_root = root / "raw"
    runs: dict[str, list[float]] = {k: [] for k in ("tlreg put", "raw put", "tlreg get", "raw get")}
    for r in range(repeat):
        keys = [f"objects/{i % 256:02x}/{r}-{i}" for i in range(count)]
        puts = {
            "tlreg put": [lambda k=k: store.put(k, data) for k in keys],
            "raw put": [lambda k=k: _raw_local_put(raw_root, k, data) for k in keys],
        }
        _run_pair(runs, r, threads, puts)
        # cold reads for both (tlreg's direct-I/O puts leave nothing in the page cache)
        evict(root)
        gets = {
            "tlreg get": [lambda k=k: store.get(k) for k in keys],
            "raw get": [lambda k=k: (raw_root / k).read_bytes() for k in keys],
        }
        _run_pair(runs, r, threads, gets)
    shutil.rmtree(root / "tlreg", ignore_errors=True)
    shutil.rmtree(raw_root, ignore_errors=True)
    return _median_rates(runs, size * count)


def bench_s3(
    server: Any, bucket: str, size: int, count: int, repeat: int, threads: int
) -> dict[str, float]:
    data = os.urandom(size)
    store = S3Store(f"s3://{bucket}/tlreg", max_concurrency=8, part_size=16 * MiB)
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(max_pool_connections=max(10, threads * 8)),
    )
    transfer = TransferConfig(
        multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8
    )

    def boto_get(key: str) -> bytes:
        out = io.BytesIO()
        client.download_fileobj(bucket, f"raw/{key}", out, Config=transfer)
        return out.getvalue()

    runs: dict[str, list[float]] = {k: [] for k in ("tlreg put", "raw put", "tlreg get", "raw get")}
    for r in range(repeat):
        keys = [f"objects/{r}-{i}" for i in range(count)]
        puts = {
            "tlreg put": [lambda k=k: store.put(k, data) for k in keys],
            "raw put": [
                lambda k=k: client.upload_fileobj(
                    io.BytesIO(data), bucket, f"raw/{k}", Config=transfer
                )
                for k in keys
            ],
        }
        _run_pair(runs, r, threads, puts)
        gets = {
            "tlreg get": [lambda k=k: store.get(k) for k in keys],
            "raw get": [lambda k=k: boto_get(k) for k in keys],
        }
        _run_pair(runs, r, threads, gets)
        for k in keys:
            store.delete(k)
            client.delete_object(Bucket=bucket, Key=f"raw/{k}")
    return _median_rates(runs, size * count)


def _label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size >> 10} KiB"


def _row(size: int, count: int, rates: dict[str, float]) -> str:
    label = _label(size)
    put, get = rates["tlreg put"] / rates["raw put"], rates["tlreg get"] / rates["raw get"]
    return (
        f"| {label} | {count} | {rates['tlreg put']:.0f} | {rates['raw put']:.0f} | {put:.2f} "
        f"| {rates['tlreg get']:.0f} | {rates['raw get']:.0f} | {get:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes per object size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="objects in flight at once")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure")
    parser.add_argument("--quick", action="store_true", help="32 MiB per size, one repetition")
    parser.add_argument("--only", choices=["local", "s3"], default=None)
    parser.add_argument(
        "--sizes",
        default=",".join(_label(size) for size in SIZES),
        help="object sizes to measure, e.g. 16MiB,256MiB (default: all four)",
    )
    args = parser.parse_args()
    if args.quick:
        args.total_mib, args.repeat = 32, 1
    header = (
        "| object size | objects | tlreg put MB/s | raw put MB/s | put ratio "
        "| tlreg get MB/s | raw get MB/s | get ratio |\n|---|---|---|---|---|---|---|---|"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads {args.threads}")
    chosen = {label.strip().replace(" ", "") for label in args.sizes.split(",")}
    sizes = [size for size in SIZES if _label(size).replace(" ", "") in chosen]
    if not sizes:
        parser.error(f"--sizes: none of {args.sizes!r} is one of {[_label(s) for s in SIZES]}")
    plan = [(size, max(1, args.total_mib * MiB // size)) for size in sizes]
    if args.only in (None, "local"):
        root = Path(tempfile.mkdtemp(prefix="tlreg-storage-bench-", dir=args.dir))
        try:
            print(f"\n### Local disk ({root}), raw = open/write/fsync/rename/fsync dir\n")
            print(header)
            for size, count in plan:
                print(_row(size, count, bench_local(root, size, count, args.repeat, args.threads)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"load average: {os.getloadavg()[0]:.2f}")
    if args.only in (None, "s3"):
        with seaweed_server() as server:
            for var, value in (
                ("AWS_ACCESS_KEY_ID", server.access_key),
                ("AWS_SECRET_ACCESS_KEY", server.secret_key),
                ("AWS_ENDPOINT_URL", server.endpoint_url),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ):
                os.environ[var] = value
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            server.fs.mkdir(bucket)
            print("\n### S3 (SeaweedFS on loopback), raw = boto3 transfer manager\n")
            print(header)
            for size, count in plan:
                rates = bench_s3(server, bucket, size, count, args.repeat, args.threads)
                print(_row(size, count, rates))
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
