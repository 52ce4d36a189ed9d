"""Big request bodies are decoded away from the event loop that answers every request.

Moving work to a thread is not enough for JSON: orjson (like every JSON parser
that builds Python objects) holds the GIL for a whole parse, so a 50 MB body
stalls the event loop for tens of milliseconds even from another thread. Bodies
past ``BIG_BODY_BYTES`` are therefore parsed, checked against the nesting and
element limits and turned into arrays in a worker process (spawned on first use,
one per server). Neither the body nor the arrays are pickled (copying tens of
megabytes holds the GIL too): the body goes to the worker as a temporary file
written from a thread, and each array comes back as a ``.npy`` file that is
memory-mapped, then removed. Decompression runs in a thread, a megabyte at a
time, so the GIL is handed back between pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from engines.errors import InvalidInput
from service.errors import BadRequest, PayloadTooLarge, Unavailable
from service.protocols.intake import check_json_shape

BIG_BODY_BYTES = 1 << 20
"""Bodies (or JSON headers) larger than this are decoded off the event loop."""

INFLATE_STEP = 1 << 20
DECODER_NICE = 10

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Spilled:
    """An array the worker process wrote to a ``.npy`` file (what comes back instead of it)."""

    path: str


def spill(value: Any, directory: str) -> Any:
    """``value`` with every array in it (in dicts, lists and tuples) written to a file."""
    if isinstance(value, np.ndarray):
        handle, path = tempfile.mkstemp(suffix=".npy", prefix="kiln-decoded-", dir=directory)
        with os.fdopen(handle, "wb") as file:
            np.save(file, value, allow_pickle=False)
        return Spilled(path)
    if isinstance(value, dict):
        return {key: spill(item, directory) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(spill(item, directory) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: spill(getattr(value, f.name), directory) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    return value


def unspill(value: Any) -> Any:
    """The arrays back, memory-mapped from their files (which are removed at once)."""
    if isinstance(value, Spilled):
        try:
            return np.load(value.path, mmap_mode="r", allow_pickle=False)
        finally:
            os.unlink(value.path)
    if isinstance(value, dict):
        return {key: unspill(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(unspill(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: unspill(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


def _in_worker(function: Callable[..., Any], path: str, args: tuple[Any, ...]) -> Any:
    """Runs in the worker: read the body from its file, decode it, spill the arrays."""
    body = Path(path).read_bytes()
    return spill(function(body, *args), os.path.dirname(path))


class Offload:
    """The worker process big JSON bodies are decoded in (and a thread for the rest)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def in_process(self, function: Callable[..., T], body: bytes | bytearray, *args: Any) -> T:
        """``function(body, *args)`` in the worker process; what it returns must be
        picklable, and the arrays in it come back memory-mapped."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_yield_to_the_server
            )
        handle, path = tempfile.mkstemp(suffix=".body", prefix="kiln-body-")
        try:
            await asyncio.to_thread(_write_all, handle, body)
            spilled = await asyncio.wrap_future(self._pool.submit(_in_worker, function, path, args))
            return await asyncio.to_thread(unspill, spilled)
        except BrokenProcessPool:
            self._pool = None  # the worker died (killed for memory?): a new one next time
            raise Unavailable(
                "the request decoder stopped while decoding this body; retry", headers={"Retry-After": "1"}
            ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(function, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _yield_to_the_server() -> None:
    """The decoder process runs at a lower priority than the server's event loop."""
    with contextlib.suppress(OSError):
        os.nice(DECODER_NICE)


def _write_all(handle: int, body: bytes | bytearray) -> None:
    with os.fdopen(handle, "wb") as file:
        file.write(body)


def decode_json(body: bytes | bytearray | memoryview, max_depth: int, max_elements: int) -> Any:
    """``orjson.loads`` with the nesting and element limits; ``BadRequest`` when invalid."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    check_json_shape(payload, max_depth, max_elements)
    return payload


def decode_native_body(body: bytes | bytearray, max_depth: int, max_elements: int) -> Any:
    """A native /predict body with its ``inputs`` already arrays (for a worker process)."""
    payload = decode_json(body, max_depth, max_elements)
    if isinstance(payload, dict) and "inputs" in payload:
        inputs = payload["inputs"]
        if isinstance(inputs, dict):
            payload["inputs"] = {name: _array(value, f"input '{name}'") for name, value in inputs.items()}
        elif isinstance(inputs, list):
            payload["inputs"] = _array(inputs, "'inputs'")
    return payload


def _array(value: Any, what: str) -> Any:
    if not isinstance(value, list):
        return value
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not a rectangular nested list: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"{what} must hold only numbers in a rectangular nested list")
    return array


def inflate(body: bytes | bytearray, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, a megabyte of input at a time (the GIL is free between
    pieces). ``PayloadTooLarge`` past ``limit`` bytes, ``BadRequest`` if corrupt."""
    window_bits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    decompressor = zlib.decompressobj(window_bits)
    pieces: list[bytes] = []
    size = 0
    view = memoryview(body)
    try:
        for start in range(0, len(view), INFLATE_STEP):
            piece = decompressor.decompress(view[start : start + INFLATE_STEP], limit + 1 - size)
            size += len(piece)
            pieces.append(piece)
            if size > limit or decompressor.unconsumed_tail:
                raise PayloadTooLarge(
                    f"the decompressed request body is larger than the limit of {limit} bytes"
                )
        pieces.append(decompressor.flush())
    except zlib.error as exc:
        raise BadRequest(f"the {encoding} request body cannot be decompressed: {exc}") from None
    if not decompressor.eof:
        raise BadRequest(f"the {encoding} request body is truncated")
    if decompressor.unused_data:
        raise BadRequest(f"the {encoding} request body has data after the end of its stream")
    return b"".join(pieces)
