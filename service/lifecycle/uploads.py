"""Streaming multipart parsing for uploads.

Files are written straight into the store's ``tmp/`` while their sha256 is
computed, and cut off (413) as soon as they pass their size limit: an upload is
never held whole in memory. The multipart parser runs on the event loop (it
only finds boundaries); hashing and writing run in a worker thread, a megabyte at
a time, so a big upload never holds the loop. Text fields are small and capped. A field may appear
once, except the repeated file fields the caller names (a model's data files),
whose limit holds for all their parts together.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from engines.store import EngineStore
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64
WRITE_BATCH_BYTES = 1 << 20  # file data handed to the writer thread at a time


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int = 0
    sha256: str = ""


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)
    repeated: dict[str, list[UploadedFile]] = field(default_factory=dict)
    """The parts of each repeated file field, in the order they came."""

    def all_files(self) -> list[UploadedFile]:
        return [*self.files.values(), *(u for parts in self.repeated.values() for u in parts)]

    def discard(self) -> None:
        """Remove every temp file this form wrote (on error, or once published)."""
        for upload in self.all_files():
            upload.path.unlink(missing_ok=True)


class _Part:
    def __init__(self) -> None:
        self.disposition = b""
        self.name = ""
        self.data = bytearray()
        self.upload: UploadedFile | None = None
        self.handle: IO[bytes] | None = None
        self.hasher = hashlib.sha256()
        self.limit = 0


class _FormBuilder:
    def __init__(self, store: EngineStore, file_limits: dict[str, int], repeated: Collection[str]) -> None:
        self.store = store
        self.file_limits = file_limits
        self.repeated = repeated
        self.field_bytes: dict[str, int] = {}
        self.form = ParsedForm()
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.parts = 0
        # File data (or None: the part ended) waiting for the writer thread, in order.
        self.pending: list[tuple[_Part, bytes | None]] = []
        self.pending_bytes = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"the form has more than {MAX_PARTS} parts")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.part.disposition = self.header_value
        self.header_name = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise BadRequest("a form part has no name in its Content-Disposition header")
        name = options[b"name"].decode("utf-8", "replace")
        self.part.name = name
        if (
            name in self.form.fields
            or name in self.form.files
            or (name in self.form.repeated and name not in self.repeated)
        ):
            raise BadRequest(f"the form field '{name}' appears twice")
        if b"filename" in options:
            if name not in self.file_limits:
                raise BadRequest(
                    f"unexpected file field '{name}'; files go in: {', '.join(self.file_limits)}"
                )
            path = self.store.temp_path(suffix=".upload")
            upload = UploadedFile(name, options[b"filename"].decode("utf-8", "replace"), path)
            if name in self.repeated:
                self.form.repeated.setdefault(name, []).append(upload)
            else:
                self.form.files[name] = upload
            self.part.upload = upload
            self.part.handle = path.open("wb")
            self.part.limit = self.file_limits[name]

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        part = self.part
        if part.upload is None:
            if len(part.data) + len(chunk) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"form field '{part.name}' is larger than {MAX_FIELD_BYTES} bytes")
            part.data.extend(chunk)
            return
        part.upload.size += len(chunk)
        total = self.field_bytes[part.name] = self.field_bytes.get(part.name, 0) + len(chunk)
        if total > part.limit:
            raise PayloadTooLarge(f"'{part.name}' is larger than its limit of {part.limit} bytes")
        self.pending.append((part, chunk))
        self.pending_bytes += len(chunk)

    def on_part_end(self) -> None:
        part = self.part
        if part.upload is None:
            try:
                self.form.fields[part.name] = part.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"form field '{part.name}' is not UTF-8 text") from exc
            return
        self.pending.append((part, None))

    async def flush(self, *, force: bool = False) -> None:
        """Hash and write what the parser has passed on, in the writer thread, once a
        megabyte has gathered or a part has ended (or ``force``)."""
        if not self.pending or not (
            force or self.pending_bytes >= WRITE_BATCH_BYTES or self.pending[-1][1] is None
        ):
            return
        work, self.pending, self.pending_bytes = self.pending, [], 0
        await asyncio.to_thread(_write, work)

    def close_open_file(self) -> None:
        for part in {id(p): p for p, _ in self.pending}.values():
            if part.handle is not None:
                part.handle.close()
        if self.part.handle is not None:
            self.part.handle.close()


def _write(work: list[tuple[_Part, bytes | None]]) -> None:
    for part, data in work:
        assert part.handle is not None and part.upload is not None
        if data is None:
            part.handle.close()
            part.upload.sha256 = part.hasher.hexdigest()
        else:
            part.hasher.update(data)
            part.handle.write(data)


async def parse_multipart(
    content_type: str,
    stream: AsyncIterator[bytes],
    store: EngineStore,
    file_limits: dict[str, int],
    repeated: Collection[str] = (),
) -> ParsedForm:
    """Parse a multipart/form-data body. ``file_limits`` names the accepted file
    fields and their byte limits; the fields in ``repeated`` may come several times
    (in ``ParsedForm.repeated``). Raises ``BadRequest``, ``PayloadTooLarge`` or
    ``UnsupportedMediaType``; on any error the temp files are removed."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise UnsupportedMediaType("send the upload as multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart Content-Type has no boundary")
    builder = _FormBuilder(store, file_limits, repeated)
    try:
        parser = MultipartParser(boundary, builder.callbacks())  # type: ignore[arg-type]
        async for chunk in stream:
            parser.write(chunk)
            await builder.flush()
        parser.finalize()
        await builder.flush(force=True)
    except FormParserError as exc:
        builder.close_open_file()
        builder.form.discard()
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    except BaseException:
        builder.close_open_file()
        builder.form.discard()
        raise
    for upload in builder.form.all_files():
        if not upload.sha256:
            builder.form.discard()
            raise BadRequest(f"the multipart body ended inside the file '{upload.field}'")
    return builder.form
