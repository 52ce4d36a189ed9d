"""Models and data sets named by URI: ``s3://bucket/key`` and ``https://…``.

A URI names exactly one object. A model is that object: a self-contained graph, an
archive of a graph with its data files (``.zip``, ``.tar``, ``.tar.gz``, recognised
by content), or a graph whose external data files lie beside it: each file the
graph names is fetched from the same folder (``s3://b/m/model.onnx`` naming
``model.onnx.data`` → ``s3://b/m/model.onnx.data``), and nothing else is listed or
fetched. The files land in a work directory (under the store's ``tmp/``) for
``engines.model_package.stage_upload``, so a model by URI goes through the same
gate, packaging and content addressing as an upload.

Every byte is hashed on the way (sha256) and counted against the caller's limit;
the expected sha256, when given, is compared before the caller builds anything.
S3 goes through ``engines.s3`` (credentials from the standard AWS chain), HTTPS
through httpx; plain ``http://`` only when the caller allows it. Failures are
``engines.errors``: ``InvalidSource``, ``ObjectNotFound``, ``ObjectAccessDenied``,
``ObjectStoreUnavailable``, ``ChecksumMismatch``, ``TooLarge``, ``InvalidModel``.
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from engines.errors import (
    ChecksumMismatch,
    InvalidSource,
    ObjectAccessDenied,
    ObjectNotFound,
    ObjectStoreUnavailable,
    TooLarge,
)
from engines.model_package import archive_kind, named_files
from engines.s3 import S3Client, S3Uri, parse_s3_uri

SCHEMES = ("s3://", "https://", "http://")
_HTTP_CHUNK = 1024 * 1024


def is_uri(text: str) -> bool:
    """Whether ``text`` names a remote object (``kiln build`` takes paths too)."""
    return text.startswith(SCHEMES)


def check_sha256(actual: str, expected: str, what: str) -> None:
    """``ChecksumMismatch`` unless ``actual`` is ``expected`` (hex, any case)."""
    if actual != expected.lower():
        raise ChecksumMismatch(
            f"{what} has sha256 {actual}, not the {expected.lower()} the request named; "
            "nothing was registered"
        )


@dataclass
class RemoteFile:
    path: Path
    size: int
    sha256: str


@dataclass
class FetchedModel:
    """A model fetched into a work directory: the object the URI names (a graph or an
    archive) and the data files its graph names, as ``(location, path)``."""

    model: RemoteFile
    filename: str
    data_files: list[tuple[str, Path]] = field(default_factory=list)


@dataclass(frozen=True)
class Fetcher:
    """Fetches by URI. ``allow_http``: accept plain ``http://`` URLs and redirects."""

    allow_http: bool = False
    http_timeout_s: float = 30.0

    async def fetch_model(
        self, uri: str, workdir: Path, *, max_bytes: int, sha256: str | None = None
    ) -> FetchedModel:
        """Fetch the model ``uri`` names into ``workdir``: the object itself (checked
        against ``sha256`` when given), then each data file its graph names, beside
        it. The object and its data files together stay within ``max_bytes``."""
        target = _Target(uri, self.allow_http)
        async with _s3_for(target) as s3:
            model = await self._fetch(target, workdir / "model", max_bytes, s3)
            if sha256 is not None:
                check_sha256(model.sha256, sha256, _shown(uri))
            fetched = FetchedModel(model, target.filename)
            if await asyncio.to_thread(archive_kind, model.path) is not None:
                return fetched
            used = model.size
            for index, location in enumerate(sorted(await asyncio.to_thread(named_files, model.path))):
                beside = _Target(target.sibling(location), self.allow_http)
                try:
                    data = await self._fetch(beside, workdir / f"data-{index}", max_bytes - used, s3)
                except ObjectNotFound:
                    raise ObjectNotFound(
                        f"the graph {_shown(uri)} names the data file '{location}', but "
                        f"{_shown(beside.uri)} does not exist: put each data file beside the graph under "
                        "the name the graph gives it, or send the model as one .zip or .tar.gz archive"
                    ) from None
                except TooLarge:
                    raise TooLarge(
                        f"the model {_shown(uri)} and its data files are more than {max_bytes} bytes, "
                        "the upload limit"
                    ) from None
                used += data.size
                fetched.data_files.append((location, data.path))
        return fetched

    async def fetch_file(self, uri: str, target: Path, *, max_bytes: int) -> RemoteFile:
        """Fetch one object into ``target``, hashed; ``TooLarge`` past ``max_bytes``."""
        source = _Target(uri, self.allow_http)
        async with _s3_for(source) as s3:
            return await self._fetch(source, target, max_bytes, s3)

    async def _fetch(self, source: _Target, target: Path, max_bytes: int, s3: S3Client | None) -> RemoteFile:
        if source.s3 is not None:
            assert s3 is not None
            fetched = await s3.download(source.s3.bucket, source.s3.key, target, max_bytes=max_bytes)
            return RemoteFile(target, fetched.size, fetched.sha256)
        return await self._fetch_http(source.uri, target, max_bytes)

    async def _fetch_http(self, url: str, target: Path, max_bytes: int) -> RemoteFile:
        import httpx

        async def refuse_plain_http(request: httpx.Request) -> None:
            """Runs before every request, redirects included: a redirect to plain
            http:// is refused before it is followed."""
            if request.url.scheme != "https" and not self.allow_http:
                raise InvalidSource(
                    f"{_shown(url)} redirects to the plain http:// URL {_shown(str(request.url))}; "
                    "kiln fetches https:// only (KILN_SOURCE_ALLOW_HTTP)"
                )

        hasher = hashlib.sha256()
        size = 0
        try:
            async with (
                httpx.AsyncClient(
                    follow_redirects=True,
                    max_redirects=5,
                    timeout=httpx.Timeout(self.http_timeout_s, connect=10.0),
                    event_hooks={"request": [refuse_plain_http]},
                ) as client,
                client.stream("GET", url) as response,
            ):
                _check_status(url, response.status_code)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise TooLarge(f"{_shown(url)} is {declared} bytes, more than the limit of {max_bytes}")
                with target.open("wb") as out:
                    async for chunk in response.aiter_bytes(_HTTP_CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            raise TooLarge(f"{_shown(url)} is more than the limit of {max_bytes} bytes")
                        await asyncio.to_thread(_write_and_hash, out, hasher, chunk)
        except httpx.TooManyRedirects:
            raise InvalidSource(f"{_shown(url)} redirects more than 5 times") from None
        except (httpx.TransportError, OSError) as exc:
            if _untrusted_certificate(exc):
                raise InvalidSource(
                    f"the TLS certificate of {_shown(url)} is not trusted ({_root(exc)}); a server with a "
                    "private CA needs it in SSL_CERT_FILE on the kiln server"
                ) from None
            reason = str(exc) or type(exc).__name__
            raise ObjectStoreUnavailable(f"{_shown(url)} cannot be fetched: {reason}") from None
        return RemoteFile(target, size, hasher.hexdigest())


def _root(exc: BaseException) -> BaseException:
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


def _untrusted_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@asynccontextmanager
async def _s3_for(target: _Target) -> AsyncIterator[S3Client | None]:
    """One S3 client for all of a model's files (none for HTTPS)."""
    if target.s3 is None:
        yield None
        return
    async with S3Client.connect() as s3:
        yield s3


def _write_and_hash(out: IO[bytes], hasher: Any, chunk: bytes) -> None:
    out.write(chunk)
    hasher.update(chunk)


def _check_status(url: str, status: int) -> None:
    if status < 300:
        return
    where = _shown(url)
    if status in (404, 410):
        raise ObjectNotFound(f"{where} does not exist (HTTP {status})")
    if status in (401, 403):
        raise ObjectAccessDenied(
            f"{where} answered HTTP {status}: kiln sends no credentials over HTTPS; use a public or "
            "presigned URL, or s3://"
        )
    if status == 429 or status >= 500:
        raise ObjectStoreUnavailable(f"{where} answered HTTP {status}; retry later")
    raise InvalidSource(f"{where} answered HTTP {status}")


class _Target:
    """A parsed URI: its scheme checked, its file name, and its siblings."""

    def __init__(self, uri: str, allow_http: bool) -> None:
        self.uri = uri
        self.s3: S3Uri | None = None
        if uri.startswith("s3://"):
            self.s3 = parse_s3_uri(uri)
            self.filename = posixpath.basename(self.s3.key)
            return
        parts = urlsplit(uri)
        if parts.scheme not in ("https", "http") or (parts.scheme == "http" and not allow_http):
            plain = "" if allow_http else "; plain http:// only with KILN_SOURCE_ALLOW_HTTP=true"
            raise InvalidSource(f"'{_shown(uri)}' is not a URI kiln fetches: use s3:// or https://{plain}")
        if not parts.hostname:
            raise InvalidSource(f"'{_shown(uri)}' names no host")
        self.filename = unquote(posixpath.basename(parts.path)) or "model.onnx"

    def sibling(self, location: str) -> str:
        """The URI of a data file the graph names beside it (query strings dropped:
        a presigned URL signs one object only)."""
        if self.s3 is not None:
            return str(self.s3.sibling(location))
        return urljoin(self.uri, quote(location))


def _shown(uri: str) -> str:
    """A URI for messages: without its query string (presigned URLs carry secrets)."""
    return uri.split("?", 1)[0][:300]
