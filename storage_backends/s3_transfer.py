"""How a large S3 object travels in parts: the bodies of a multipart upload cut from the
caller's buffers, the fan-out of parts and ranges over threads, and reading a response body
whole (a body that breaks mid-way raises one of :data:`BODY_ERRORS`, and the range is
requested again by :class:`~tlreg.storage_backends.s3.S3Store`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import urllib3.exceptions
from botocore.exceptions import IncompleteReadError, ResponseStreamingError
from botocore.exceptions import ReadTimeoutError as BotoReadTimeoutError


def single_body(parts: list[memoryview]) -> bytes | bytearray:
    """The body of a one-request upload; the caller's own bytes object when possible."""
    if len(parts) == 1:
        view = parts[0]
        if isinstance(view.obj, bytes | bytearray) and view.nbytes == len(view.obj):
            return view.obj
    return b"".join(parts)


# What reading a response body raises when the connection breaks after the headers.
BODY_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    BotoReadTimeoutError,
    urllib3.exceptions.HTTPError,
    OSError,  # a reset socket; a short body (read_body)
)


def read_body(body: Any, length: int, s3key: str) -> bytes:
    """A whole response body of ``length`` bytes; one that ends early is an error."""
    data: bytes = body.read()  # botocore checks the Content-Length too
    if len(data) != length:
        raise OSError(f"short read of {s3key}: {len(data)} of {length} bytes")
    return data


def in_threads(
    workers: int, jobs: list[Callable[[], Any]], *, last_here: bool = False
) -> list[Any]:
    """Run ``jobs`` on up to ``workers`` threads (the last one in the calling thread with
    ``last_here``) and return their results in order. On the first failure the jobs not
    started are dropped, the running ones are waited for, and that failure is raised."""
    here = jobs.pop() if last_here else None
    if not jobs:
        return [here()] if here else []
    pool = ThreadPoolExecutor(min(workers, len(jobs)), thread_name_prefix="tlreg-s3")
    try:
        futures = [pool.submit(job) for job in jobs]
        mine = [here()] if here else []
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [f.result() for f in futures] + mine


class Parts:
    """Byte ranges of several buffers laid end to end, without joining them all."""

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = [p for p in parts if p.nbytes]
        self.starts: list[int] = []
        offset = 0
        for p in self.parts:
            self.starts.append(offset)
            offset += p.nbytes
        self.total = offset

    def slice(self, start: int, length: int) -> bytes:
        # botocore accepts bytes or seekable files, not memoryviews, and s3fs retries a failed
        # request with the same body: a fresh bytes copy of one part is the retry-safe choice.
        i = bisect.bisect_right(self.starts, start) - 1
        chunks = []
        while length > 0:
            view = self.parts[i]
            lo = start - self.starts[i]
            piece = view[lo : lo + length]
            chunks.append(piece)
            start += piece.nbytes
            length -= piece.nbytes
            i += 1
        return b"".join(chunks)
