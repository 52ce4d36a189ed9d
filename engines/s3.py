"""S3 access for everything kiln reads from or writes to object storage.

One small client over aiobotocore (botocore on the event loop, aiohttp underneath),
chosen by measurement (docs/BENCHMARKS.md, "S3 clients"): the fastest parallel
ranged download here, with the least CPU and memory, and botocore's complete S3 API,
conditional writes included.

Where the client connects and as whom is botocore's standard chain, never kiln's
own settings: ``AWS_ENDPOINT_URL`` (any S3-compatible service; unset: AWS),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``),
``AWS_REGION``, ``AWS_PROFILE`` and the shared config files, and a pod's or
machine's role (IRSA web identity, EKS Pod Identity and ECS container
credentials, EC2 instance metadata).

- ``download``: a HEAD for the size and ETag, then ``PART_BYTES`` ranged GETs,
  ``CONNECTIONS`` at a time, each pinned to that ETag (``If-Match``: an object
  replaced mid-download fails instead of mixing two versions), written into the
  target file at their offsets from worker threads as they arrive, and hashed
  (sha256) in order behind them from the page cache. Memory stays at a few MiB per
  connection whatever the object's size; nothing blocks the event loop.
- ``put_if_absent``: ``If-None-Match: *`` on a single PUT, or on the
  ``CompleteMultipartUpload`` of a parallel multipart upload for larger files, so
  two writers of one key never overwrite each other (the loser gets False).
- ``head`` and ``list_objects``.

Every botocore, aiohttp or socket error leaves as one of ``engines.errors``'
``ObjectNotFound``, ``ObjectAccessDenied`` (refused or missing credentials),
``ObjectStoreUnavailable`` (unreachable, timeouts, 5xx: retry later) or
``InvalidSource`` (a request the store refuses as malformed), naming the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.errors import (
    EngineError,
    InvalidSource,
    ObjectAccessDenied,
    ObjectNotFound,
    ObjectStoreUnavailable,
    TooLarge,
)

MIB = 1024 * 1024
PART_BYTES = 16 * MIB
"""Size of each ranged GET and multipart part (S3's minimum part is 5 MiB)."""
CONNECTIONS = 8
"""Requests in flight per transfer."""
_READ_CHUNK = MIB


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def sibling(self, relative: str) -> S3Uri:
        """The object at ``relative`` (a checked relative path) beside this one."""
        folder = self.key.rpartition("/")[0]
        return S3Uri(self.bucket, f"{folder}/{relative}" if folder else relative)


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/key``: the key names exactly one object (no prefix, no pattern)."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise InvalidSource(f"'{uri[:300]}' is not an s3://bucket/key URI")
    if key.endswith("/"):
        raise InvalidSource(f"'{uri[:300]}' names a folder; name the object itself (exact keys only)")
    return S3Uri(bucket, key)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class Fetched:
    """What a download wrote: its size and sha256, and the ETag it was pinned to."""

    size: int
    sha256: str
    etag: str


class S3Client:
    """An open client: ``async with S3Client.connect() as s3: ...``."""

    def __init__(self, client: Any, endpoint: str) -> None:
        self._client = client
        self.endpoint = endpoint

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, *, endpoint_url: str | None = None, connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0
    ) -> AsyncIterator[S3Client]:
        """A client on botocore's standard configuration chain (module docstring);
        ``endpoint_url`` overrides ``AWS_ENDPOINT_URL``."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=2 * CONNECTIONS,
        )
        async with get_session().create_client("s3", endpoint_url=endpoint_url, config=config) as client:
            yield cls(client, client.meta.endpoint_url)

    async def head(self, bucket: str, key: str) -> ObjectInfo:
        answer = await self._call(bucket, key, self._client.head_object(Bucket=bucket, Key=key))
        return ObjectInfo(key, int(answer["ContentLength"]), str(answer["ETag"]))

    async def list_objects(self, bucket: str, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix``, in key order (all pages)."""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        try:
            async for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], int(item["Size"]), str(item["ETag"]))
        except Exception as exc:
            raise self._translate(exc, bucket, prefix) from None

    async def download(self, bucket: str, key: str, target: Path, *, max_bytes: int | None = None) -> Fetched:
        """Write the object into ``target`` (created or truncated) with parallel ranged
        GETs; ``TooLarge`` before any byte is fetched when it exceeds ``max_bytes``."""
        info = await self.head(bucket, key)
        if max_bytes is not None and info.size > max_bytes:
            raise TooLarge(f"s3://{bucket}/{key} is {info.size} bytes, more than the limit of {max_bytes}")
        spans = [(start, min(start + PART_BYTES, info.size)) for start in range(0, info.size, PART_BYTES)]
        landed = [asyncio.Event() for _ in spans]
        gate = asyncio.Semaphore(CONNECTIONS)
        hasher = hashlib.sha256()
        sink = _Sink(target)
        try:

            async def fetch(index: int, start: int, end: int) -> None:
                async with gate:
                    await self._get_span(bucket, key, info.etag, sink, start, end)
                landed[index].set()

            async def digest() -> None:
                for index, (start, end) in enumerate(spans):
                    await landed[index].wait()
                    await sink.run(_hash_span, hasher, sink.fd, start, end)

            await _all([*(fetch(i, s, e) for i, (s, e) in enumerate(spans)), digest()])
        finally:
            await sink.close()
        return Fetched(info.size, hasher.hexdigest(), info.etag)

    async def _get_span(self, bucket: str, key: str, etag: str, sink: _Sink, start: int, end: int) -> None:
        for attempt in (1, 2):  # a body cut off mid-way is fetched again once
            offset = start
            try:
                answer = await self._client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
                )
                async with answer["Body"] as body:
                    while chunk := await body.read(_READ_CHUNK):
                        if offset + len(chunk) > end:
                            raise ObjectStoreUnavailable(
                                f"s3://{bucket}/{key}: more bytes than the range asked"
                            )
                        await sink.run(_write_at, sink.fd, chunk, offset)
                        offset += len(chunk)
            except EngineError:
                raise
            except Exception as exc:
                error = self._translate(exc, bucket, key)
                if _status(exc) == 412:
                    error = ObjectStoreUnavailable(
                        f"s3://{bucket}/{key} was replaced while being read; retry"
                    )
                if not isinstance(error, ObjectStoreUnavailable) or attempt == 2 or _status(exc) == 412:
                    raise error from None
                continue
            if offset == end:
                return
            if attempt == 2:
                raise ObjectStoreUnavailable(
                    f"s3://{bucket}/{key}: the answer ended after {offset - start} of {end - start} bytes"
                )

    async def put_if_absent(self, bucket: str, key: str, source: Path) -> bool:
        """Store ``source`` under ``key`` unless an object is there already (then False,
        the existing object untouched). Files above ``PART_BYTES`` go as a parallel
        multipart upload whose completion carries the condition."""
        size = source.stat().st_size
        if size <= PART_BYTES:
            body = await asyncio.to_thread(source.read_bytes)
            return await self._conditional(
                bucket, key, self._client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            )
        created = await self._call(bucket, key, self._client.create_multipart_upload(Bucket=bucket, Key=key))
        upload_id = created["UploadId"]
        gate = asyncio.Semaphore(CONNECTIONS)
        spans = [(start, min(start + PART_BYTES, size)) for start in range(0, size, PART_BYTES)]
        parts: list[dict[str, Any]] = [{} for _ in spans]

        async def send(number: int, start: int, end: int) -> None:
            async with gate:
                body = await asyncio.to_thread(_read_span, source, start, end)
                answer = await self._call(
                    bucket,
                    key,
                    self._client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                    ),
                )
                parts[number - 1] = {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            await _all([send(n, s, e) for n, (s, e) in enumerate(spans, 1)])
            done = await self._conditional(
                bucket,
                key,
                self._client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
            )
        except BaseException:
            await self._abort(bucket, key, upload_id)
            raise
        if not done:
            await self._abort(bucket, key, upload_id)
        return done

    async def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload's parts (best effort: a lifecycle rule
        on the bucket collects what an outage leaves)."""
        with contextlib.suppress(Exception):  # the upload's own error is the one to report
            await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    async def _conditional(self, bucket: str, key: str, request: Awaitable[Any]) -> bool:
        try:
            await request
        except Exception as exc:
            if _status(exc) == 412:
                return False
            if _status(exc) == 409:  # S3: a concurrent conditional write on the key
                raise ObjectStoreUnavailable(
                    f"s3://{bucket}/{key} is being written concurrently; retry"
                ) from None
            raise self._translate(exc, bucket, key) from None
        return True

    async def _call(self, bucket: str, key: str, request: Awaitable[Any]) -> Any:
        try:
            return await request
        except Exception as exc:
            raise self._translate(exc, bucket, key) from None

    def _translate(self, exc: BaseException, bucket: str, key: str) -> EngineError:
        """botocore's, aiohttp's and the socket's errors as kiln's domain errors."""
        import aiohttp
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            CredentialRetrievalError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"s3://{bucket}/{key}"
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return ObjectAccessDenied(
                f"kiln has no usable S3 credentials to read {where} ({exc}): set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, or give the server a role (see docs/OPERATIONS.md)"
            )
        if isinstance(exc, ClientError):
            status = _status(exc)
            error = exc.response.get("Error", {})
            code = str(error.get("Code", status))
            detail = f"{code}: {error.get('Message', '')}".rstrip(": ")
            if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                bucket_missing = " (no such bucket)" if code == "NoSuchBucket" else ""
                return ObjectNotFound(f"{where} does not exist on {self.endpoint}{bucket_missing}")
            if status in (401, 403):
                return ObjectAccessDenied(
                    f"the object store at {self.endpoint} refused access to {where} ({detail}); check "
                    "kiln's credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, the server's role) "
                    "and the bucket's policy"
                )
            if status == 429 or status >= 500:
                return ObjectStoreUnavailable(
                    f"the object store at {self.endpoint} failed on {where}: {detail}"
                )
            return InvalidSource(
                f"the object store at {self.endpoint} refused the request for {where}: {detail}"
            )
        if isinstance(exc, ConnectionError | HTTPClientError | aiohttp.ClientError | TimeoutError | OSError):
            return ObjectStoreUnavailable(f"the object store at {self.endpoint} cannot be reached: {exc}")
        from botocore.exceptions import BotoCoreError

        if isinstance(exc, BotoCoreError):  # parameter validation: an impossible bucket name...
            return InvalidSource(f"{where}: {exc}")
        return ObjectStoreUnavailable(f"the object store at {self.endpoint} failed on {where}: {exc!r}")


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


class _Sink:
    """The target file, written at offsets and read back for hashing by two worker
    threads; closed only once no thread uses it (a cancelled download never lets a
    late write reach a reused file descriptor)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="kiln-s3-io")

    async def run(self, work: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._threads, work, *args)

    async def close(self) -> None:
        await asyncio.shield(asyncio.to_thread(self._close))

    def _close(self) -> None:
        self._threads.shutdown(wait=True)
        os.close(self.fd)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _hash_span(hasher: Any, fd: int, start: int, end: int) -> None:
    while start < end:
        chunk = os.pread(fd, min(4 * MIB, end - start), start)
        if not chunk:
            raise ObjectStoreUnavailable("the downloaded file is shorter than the object")
        hasher.update(chunk)
        start += len(chunk)


def _read_span(path: Path, start: int, end: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


async def _all(jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run every job; on the first failure cancel the rest and raise that failure
    (kiln's own error first, not an ``ExceptionGroup``)."""
    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(job)
    except BaseExceptionGroup as failures:
        flat = list(_leaves(failures))
        raise next((e for e in flat if isinstance(e, EngineError)), flat[0]) from None


def _leaves(group: BaseExceptionGroup[Any]) -> Any:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
