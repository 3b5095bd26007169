"""A store in an S3 bucket (AWS or any S3-compatible server), on s3fs.

Credentials come only from the environment or the AWS config files (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ...); the endpoint may come
from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` as botocore reads them. None of this is
kept in the state that pickles: a store shipped to a Ray worker resolves it again there.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import botocore.session
import s3fs
import urllib3.exceptions
from aiobotocore.session import AioSession
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.loaders import Loader, create_loader

from tlreg.storage_backends.base import Data, Store, as_parts, check_key, check_prefix
from tlreg.storage_backends.credentials import secret_options, without_password
from tlreg.storage_backends.errors import ObjectNotFound, StoreError, StoreUnavailable
from tlreg.storage_backends.s3_transfer import (
    BODY_ERRORS,
    Parts,
    in_threads,
    read_body,
    single_body,
)

MAX_ATTEMPTS_ENV = "TLREG_S3_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 5
"""Attempts per S3 request (the first one included) before a transient error is raised."""

#: S3's smallest allowed part (except the last) and its largest number of parts per upload
MIN_PART_SIZE = 5 * 2**20
MAX_PARTS = 10_000

THREADED_MIN = 4 * 2**20
"""Puts from this size up are sent from the calling thread by botocore's own (synchronous)
client; smaller ones stay on s3fs's event loop (see docs/performance.md, "S3 puts: the
threaded path's threshold")."""

# S3 error codes (botocore's ClientError) of a missing key or bucket, and of refused access
_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_REFUSED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "403",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)


@functools.cache
def _botocore_loader() -> Loader:
    """botocore's loader of the (read-only) S3 service model, parsed once per process."""
    return create_loader()


def _error_code(error: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps the ClientError as cause)."""
    for e in (error, error.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code else None
    return None


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``.

    A put of up to ``part_size`` bytes is one PUT; a larger one is a multipart upload with up
    to ``max_concurrency`` parts in flight. Either way the object appears only when the
    request completes, so puts are atomic (a failed multipart upload is aborted). A get is a
    ranged GET of ``part_size`` bytes and, for a larger object, the rest in ranged GETs of
    ``part_size``, up to ``max_concurrency`` in flight; ``get_range`` (and so ``get_into``)
    reads its range the same way. Listings are never cached, so
    ``exists`` and ``list`` see what other processes wrote. ``options`` go to
    ``s3fs.S3FileSystem`` (e.g. ``anon=True``, ``config_kwargs``, ``profile``); credentials
    are refused there.

    Small puts, listings, HEADs and deletes go through s3fs's event loop. Gets, ranged
    reads, and puts of ``THREADED_MIN`` (4 MiB) or more, use a synchronous botocore client
    from the calling thread, with the parts and ranges of large objects on a pool of
    ``max_concurrency`` threads, as boto3's transfer manager does: the per-request CPU work
    (SHA-256 payload signing over plain HTTP, body copies) then runs in parallel instead of
    on s3fs's one loop thread. Both clients resolve credentials and endpoint the same way and
    share the settings below. Transport checksums (CRC32) are computed and checked only where
    S3 requires them (``request_checksum_calculation`` / ``response_checksum_validation`` =
    ``"when_required"``, overridable in ``config_kwargs``): tlreg checks the BLAKE3 hash of
    everything it reads.

    Transient errors (5xx, throttling, connections refused or reset, timeouts) are retried up
    to ``max_attempts`` requests in all (default ``$TLREG_S3_MAX_ATTEMPTS``, else 5) with
    exponential backoff and full jitter; permanent ones (refused credentials, a missing
    bucket) fail at once. Either way the error is one line naming the bucket and endpoint.
    A read whose response body breaks after the headers (a reset connection, a read timeout,
    a short body) requests that range again, of the same object version (``If-Match``).
    """

    #: a PUT (or a completed multipart upload) is durable when S3 acknowledges it
    supports_fsync = True

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 8,
        part_size: int = 16 * 2**20,
        max_attempts: int | None = None,
        **options: Any,
    ) -> None:
        split = urlsplit(url)
        if split.scheme not in ("s3", "s3a") or not split.netloc:
            raise ValueError(f"not an S3 URL: {without_password(url)!r}; use s3://bucket/prefix")
        if "@" in split.netloc:
            # s3fs reads no login from a URL: "AK:SECRET@bucket" would be the bucket's name
            bucket = split.netloc.rpartition("@")[2]
            raise StoreUnavailable(
                f"store {without_password(url)}: S3 credentials cannot be part of the URL; "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE and use "
                f"{split.scheme}://{bucket}{split.path}"
            )
        secrets = secret_options(options, s3=True)
        if secrets:
            raise ValueError(
                f"S3 credentials cannot be store options ({', '.join(secrets)}): "
                "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the environment"
            )
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_attempts is None:
            raw = os.environ.get(MAX_ATTEMPTS_ENV) or str(DEFAULT_MAX_ATTEMPTS)
            try:
                max_attempts = int(raw)
            except ValueError:
                raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r} is not a whole number") from None
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (got {max_attempts})")
        super().__init__(url)
        self.bucket = split.netloc
        self.prefix = split.path.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_concurrency = max_concurrency
        self.part_size = part_size
        self.max_attempts = max_attempts
        self.options = options
        self._bucket_checked = False
        self._fs = self._connect()
        self._client_lock = threading.Lock()
        self._sync_client: Any = None  # see _client
        self._extra: dict[str, Any] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "max_concurrency": self.max_concurrency,
            "part_size": self.part_size,
            "max_attempts": self.max_attempts,
            **self.options,
        }
        return (_reopen, (self.url, kwargs))

    def _settings(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The s3fs options left, the client's keyword arguments and its ``Config`` ones,
        shared by the s3fs (asyncio) client and the thread pool's botocore client."""
        options = dict(self.options)
        client_kwargs = dict(options.pop("client_kwargs", None) or {})
        if self.region:
            client_kwargs.setdefault("region_name", self.region)
        config_kwargs = dict(options.pop("config_kwargs", None) or {})
        config_kwargs.setdefault("max_pool_connections", max(10, 2 * self.max_concurrency))
        # One retry policy, botocore's "standard" mode: transient errors (5xx, throttling,
        # connection refused/reset, timeouts) are retried up to max_attempts in all, after
        # min(2**attempt, 20) s * random() (exponential backoff, full jitter); permanent ones
        # (403, NoSuchBucket, ...) fail at once. s3fs's own retry loop is off (one round,
        # set in _connect), or the two would multiply: 5 rounds of max_attempts each.
        config_kwargs.setdefault(
            "retries", {"mode": "standard", "total_max_attempts": self.max_attempts}
        )
        config_kwargs.setdefault("connect_timeout", 10)
        config_kwargs.setdefault("read_timeout", 120)
        # Transport checksums (CRC32 of every body sent, checked on every body read) only
        # where S3 requires them: tlreg checks the BLAKE3 hash of everything it reads, and
        # computing them costs CPU on every request.
        config_kwargs.setdefault("request_checksum_calculation", "when_required")
        config_kwargs.setdefault("response_checksum_validation", "when_required")
        return options, client_kwargs, config_kwargs

    def _connect(self) -> s3fs.S3FileSystem:
        options, client_kwargs, config_kwargs = self._settings()
        # A session of our own (it resolves and caches credentials: never shared between
        # stores), but with the process-wide model loader: that halves client creation time.
        session = AioSession(profile=options.pop("profile", None))
        session.register_component("data_loader", _botocore_loader())
        retries = options.pop("retries", 1)
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            max_concurrency=self.max_concurrency,
            session=session,
            # an instance of our own (no fsspec instance cache shared between stores) and no
            # listing cache, so writes by other processes are seen at once
            skip_instance_cache=True,
            use_listings_cache=False,
            **options,
        )
        # (a class attribute: S3FileSystem(retries=...) is stored as an option and ignored)
        fs.retries = retries
        return fs

    def _client(self) -> Any:
        """The synchronous botocore client of the large transfers, made on first use.

        Large objects are sent and fetched from threads (as boto3's transfer manager does),
        not on s3fs's one event-loop thread: request signing (SHA-256 of every body over
        plain HTTP) and body copies then run in parallel. botocore clients are thread-safe;
        one serves every thread of this store. Credentials, endpoint, region, retries and
        timeouts are resolved exactly as for the s3fs client.
        """
        client = self._sync_client
        if client is None:
            with self._client_lock:
                if self._sync_client is None:
                    self._sync_client = self._make_client()
                client = self._sync_client
        return client

    # docstring inherited
    def close(self) -> None:
        """Close both clients' connection pools (s3fs's aiohttp one and the synchronous
        botocore one). A later call opens new connections, as the first one did."""
        with self._client_lock:
            client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()
        fs, self._fs = self._fs, self._connect()
        creator = getattr(fs, "_s3creator", None)
        if creator is not None:
            s3fs.S3FileSystem.close_session(fs.loop, creator)

    def _make_client(self) -> Any:
        options, client_kwargs, config_kwargs = self._settings()
        session = botocore.session.Session(profile=options.get("profile"))
        session.register_component("data_loader", _botocore_loader())
        if options.get("anon"):
            config_kwargs["signature_version"] = UNSIGNED
        if "use_ssl" in options:
            client_kwargs.setdefault("use_ssl", options["use_ssl"])
        if self.endpoint_url:
            client_kwargs.setdefault("endpoint_url", self.endpoint_url)
        # Several objects may be in flight at once, each with max_concurrency requests:
        # room for a few of them in the connection pool (urllib3 discards, with a warning,
        # a connection that does not fit back into a full pool).
        if "max_pool_connections" not in (self.options.get("config_kwargs") or {}):
            config_kwargs["max_pool_connections"] = max(10, 4 * self.max_concurrency)
        # s3fs's request-wide extras apply to these requests too
        extra = dict(options.get("s3_additional_kwargs") or {})
        if options.get("requester_pays"):
            extra.setdefault("RequestPayer", "requester")
        self._extra = extra
        return session.create_client("s3", config=Config(**config_kwargs), **client_kwargs)

    def _sync_call(self, method: str, **kwargs: Any) -> Any:
        """One request of the synchronous client (from any thread), about this bucket."""
        client = self._client()
        if self._extra:
            operation = client.meta.method_to_api_mapping[method]
            members = client.meta.service_model.operation_model(operation).input_shape.members
            kwargs = {**{k: v for k, v in self._extra.items() if k in members}, **kwargs}
        return getattr(client, method)(Bucket=self.bucket, **kwargs)

    # -- naming and errors ----------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def _endpoint(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        if self._sync_client is not None:
            return str(self._sync_client.meta.endpoint_url)
        with suppress(Exception):
            return str(self._fs.s3.meta.endpoint_url)
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return env or "the default AWS endpoint"

    def _no_bucket(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"bucket {self.bucket!r} does not exist at {self._endpoint()}: "
            "create it or fix TLREG_STORE_URL"
        )

    def _refused(self, error: BaseException) -> StoreUnavailable:
        code = _error_code(error) or "AccessDenied"
        return StoreUnavailable(
            f"S3 at {self._endpoint()} refused access to bucket {self.bucket!r} ({code}): "
            "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the "
            "bucket's permissions"
        )

    def _not_found(self, key: str) -> StoreError:
        # A HEAD answers a bare 404 for a missing key and for a missing bucket alike; ask once
        # per instance which it is, so a wrong bucket name is reported as such.
        if not self._bucket_checked:
            try:
                self._call("head_bucket")
            except FileNotFoundError:
                return self._no_bucket()
            except Exception:
                pass  # e.g. no s3:ListBucket permission: we cannot tell, assume the key
            else:
                self._bucket_checked = True
        return ObjectNotFound(f"no object {key!r} in {self.url}")

    @contextmanager
    def _errors(self, key: str | None) -> Iterator[None]:
        """Translate s3fs/botocore errors about ``key`` (None: the bucket) into store errors."""
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as e:
            if key is None or _error_code(e) == "NoSuchBucket":
                raise self._no_bucket() from None
            raise self._not_found(key) from None
        except PermissionError as e:
            raise self._refused(e) from None
        except ClientError as e:  # from the synchronous client, untranslated by s3fs
            code = _error_code(e)
            if code == "NoSuchBucket" or (key is None and code in _MISSING):
                raise self._no_bucket() from None
            if code in _MISSING:
                raise self._not_found(key) from None  # type: ignore[arg-type]
            if code in _REFUSED:
                raise self._refused(e) from None
            raise self._unavailable(key, e) from e
        except NoCredentialsError:
            raise StoreUnavailable(
                f"no AWS credentials found for bucket {self.bucket!r}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except (OSError, BotoCoreError, asyncio.TimeoutError, urllib3.exceptions.HTTPError) as e:
            raise self._unavailable(key, e) from e

    def _unavailable(self, key: str | None, error: BaseException) -> StoreUnavailable:
        what = f"object {key!r}" if key is not None else "a listing"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return StoreUnavailable(
            f"S3 request for {what} in bucket {self.bucket!r} at {self._endpoint()} failed "
            f"({first}) after up to {self.max_attempts} attempts: check that the endpoint "
            f"is reachable, or raise {MAX_ATTEMPTS_ENV}"
        )

    # -- primitives -----------------------------------------------------------------------

    # docstring inherited
    def put(self, key: str, data: Data) -> None:
        s3key = self._key(key)
        parts = as_parts(data)
        total = sum(p.nbytes for p in parts)
        with self._errors(key):
            if total > self.part_size:
                self._multipart(s3key, Parts(parts))
            elif total >= THREADED_MIN:
                # in this thread: several puts in flight sign and send in parallel
                self._sync_call("put_object", Key=s3key, Body=single_body(parts))
            else:
                self._call("put_object", Key=s3key, Body=single_body(parts))

    def _multipart(self, s3key: str, parts: Parts) -> None:
        size = max(self.part_size, -(-parts.total // MAX_PARTS))
        upload = self._sync_call("create_multipart_upload", Key=s3key)
        upload_id = upload["UploadId"]

        def send(number: int, start: int) -> dict[str, Any]:
            body = parts.slice(start, min(size, parts.total - start))  # one copy per worker
            out = self._sync_call(
                "upload_part", Key=s3key, UploadId=upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            starts = range(0, parts.total, size)
            sent = in_threads(
                self.max_concurrency,
                [functools.partial(send, n, start) for n, start in enumerate(starts, 1)],
            )
            self._sync_call(
                "complete_multipart_upload",
                Key=s3key,
                UploadId=upload_id,
                MultipartUpload={"Parts": sent},
            )
        except BaseException:
            # nothing became visible; do not leave the parts billed in the bucket (every
            # part request has ended by now: none can land after the abort)
            with suppress(Exception):
                self._sync_call("abort_multipart_upload", Key=s3key, UploadId=upload_id)
            raise

    # docstring inherited
    def sweep_abandoned(self, before: datetime, *, dry_run: bool = False) -> int:
        # A multipart upload whose process died stays open (and billed) until aborted.
        swept = 0
        page_args: dict[str, str] = {"Prefix": f"{self.prefix}/" if self.prefix else ""}
        with self._errors(None):
            while True:
                page = self._call("list_multipart_uploads", **page_args)
                for upload in page.get("Uploads") or []:
                    if upload["Initiated"] >= before:
                        continue  # possibly an upload still running
                    if not dry_run:
                        self._call(
                            "abort_multipart_upload", Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                    swept += 1
                if not page.get("IsTruncated"):
                    return swept
                page_args["KeyMarker"] = page["NextKeyMarker"]
                page_args["UploadIdMarker"] = page["NextUploadIdMarker"]

    # docstring inherited
    def get(self, key: str) -> bytes:
        s3key = self._key(key)
        with self._errors(key):
            return self._get(s3key)

    def _get(self, s3key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes ``[start, stop)`` of the object (to its end if ``stop`` is None or past it;
        ``b""`` if ``start`` is at or past the end): the first ``part_size`` of them in one
        ranged GET and, when that shows more to read, the rest in ranged GETs of ``part_size``
        from ``max_concurrency`` threads (as boto3's transfer manager downloads) while the
        first range is read. Every range goes through ``_range``, so a body that breaks
        mid-way is requested again.

        Each range is read as one bytes object and the result is their join: two copies of
        every byte (socket to range, range to result). Ranges read into one preallocated
        bytearray would be as many, since ``get`` returns bytes (``bytes(whole)``), and
        urllib3's ``readinto`` reads into a temporary anyway.
        """
        size = self.part_size
        first_stop = start + size if stop is None else min(start + size, stop)
        try:
            out = self._sync_call("get_object", Key=s3key, Range=f"bytes={start}-{first_stop - 1}")
        except ClientError as e:
            if _error_code(e) != "InvalidRange":
                raise
            return b""  # start at or past the end (an empty object has no byte 0)
        length = int(out["ContentLength"])  # fewer than asked at the end of the object
        content_range = str(out.get("ContentRange") or "")
        total = int(content_range.rpartition("/")[2]) if "/" in content_range else start + length
        end = total if stop is None else min(stop, total)
        etag = str(out.get("ETag") or "")
        jobs: list[Callable[[], bytes]] = [
            functools.partial(self._range, s3key, lo, min(lo + size, end), etag)
            for lo in range(start + length, end, size)
        ]
        jobs.append(functools.partial(self._range, s3key, start, start + length, etag, out))
        ranges = in_threads(self.max_concurrency, jobs, last_here=True)
        return b"".join([ranges[-1], *ranges[:-1]])

    def _range(
        self, s3key: str, start: int, end: int, etag: str, response: dict[str, Any] | None = None
    ) -> bytes:
        """Bytes ``[start, end)`` of the object whose first response had ``etag``, read from
        ``response`` if given. botocore retries a request that fails before its response
        arrives; a body that breaks after it (a reset connection, a read timeout, a short
        body) is requested again here, up to ``max_attempts`` GETs in all, of the same
        version of the object (``If-Match``: a replaced object fails instead of mixing)."""
        for attempt in range(1, self.max_attempts + 1):
            if response is None:
                match = {"IfMatch": etag} if etag else {}
                response = self._sync_call(
                    "get_object", Key=s3key, Range=f"bytes={start}-{end - 1}", **match
                )
            try:
                with response["Body"] as body:
                    return read_body(body, end - start, s3key)
            except BODY_ERRORS:
                if attempt == self.max_attempts:
                    raise
                response = None
        raise AssertionError("unreachable")

    # docstring inherited
    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length} of {key!r}")
        if length == 0:
            self.size(key)  # a missing key still raises
            return b""
        s3key = self._key(key)
        with self._errors(key):
            return self._get(s3key, start, start + length)

    def _head(self, key: str) -> dict[str, Any]:
        s3key = self._key(key)
        with self._errors(key):
            head: dict[str, Any] = self._call("head_object", Key=s3key)
        return head

    # docstring inherited
    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    # docstring inherited
    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    # docstring inherited
    def list(self, prefix: str = "") -> Iterator[str]:
        folder = "/".join(p for p in (self.prefix, check_prefix(prefix)) if p)
        s3prefix = f"{folder}/" if folder else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        kwargs: dict[str, Any] = {"Prefix": s3prefix}
        while True:
            with self._errors(None):
                page = self._call("list_objects_v2", **kwargs)
            for item in page.get("Contents", ()):
                name: str = item["Key"]
                if not name.endswith("/"):  # skip folder markers other tools create
                    yield name[strip:]
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    # docstring inherited
    def delete(self, key: str) -> None:
        s3key = self._key(key)
        with suppress(ObjectNotFound), self._errors(key):
            self._call("delete_object", Key=s3key)


def _reopen(url: str, kwargs: dict[str, Any]) -> S3Store:
    return S3Store(url, **kwargs)
