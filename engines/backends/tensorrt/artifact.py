"""The artifact format: a small kiln header, then the serialized TensorRT plan.

The header is JSON (the device signature, TensorRT version and profile the plan
was built with) after a magic tag and a length. A bare plan (no header, e.g.
from trtexec) also loads, trusting the caller's cache key.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engines.errors import StoreCorrupted
from engines.store import atomic_output

ARTIFACT_MAGIC = b"KILN-TRT"
_HEADER_LENGTH = struct.Struct("<I")
PLAN_ALIGNMENT = 4096


def write_atomically(path: Path, chunks: Sequence[bytes | memoryview]) -> int:
    """Write ``chunks`` to ``path`` atomically (``engines.store.atomic_output``); returns the size."""
    with atomic_output(path) as temp, temp.open("wb") as handle:
        return sum(handle.write(chunk) for chunk in chunks)


def pack_artifact_header(metadata: Mapping[str, Any]) -> bytes:
    """The bytes that precede the TensorRT plan in a kiln artifact.

    The JSON is padded with spaces (still valid JSON, so older readers parse it) to
    end on a ``PLAN_ALIGNMENT`` boundary: the plan then starts page-aligned, which
    TensorRT does not require but costs nothing.
    """
    payload = json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()
    unpadded = len(ARTIFACT_MAGIC) + _HEADER_LENGTH.size + len(payload)
    payload += b" " * (-unpadded % PLAN_ALIGNMENT)
    return ARTIFACT_MAGIC + _HEADER_LENGTH.pack(len(payload)) + payload


def split_artifact(data: bytes) -> tuple[dict[str, Any] | None, memoryview]:
    """(recorded metadata or None for a bare plan, the plan bytes). Raises ``StoreCorrupted``."""
    view = memoryview(data)
    if not data.startswith(ARTIFACT_MAGIC):
        return None, view
    start = len(ARTIFACT_MAGIC) + _HEADER_LENGTH.size
    if len(data) < start:
        raise StoreCorrupted("the TensorRT artifact's header is truncated")
    (length,) = _HEADER_LENGTH.unpack_from(data, len(ARTIFACT_MAGIC))
    if start + length > len(data):
        raise StoreCorrupted("the TensorRT artifact's header is truncated")
    try:
        metadata = json.loads(bytes(view[start : start + length]))
    except ValueError as exc:
        raise StoreCorrupted(f"the TensorRT artifact's header is not JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise StoreCorrupted("the TensorRT artifact's header is not a JSON object")
    return metadata, view[start + length :]


def describe_signature(data: Any) -> str:
    if not isinstance(data, Mapping):
        return "an unknown device"
    device = data.get("device") or {}
    return (
        f"TensorRT {data.get('backend_version', '?')} ({device.get('tensorrt_cuda', 'CUDA unrecorded')}) "
        f"on {device.get('name', '?')} (compute {device.get('compute_capability', '?')}, "
        f"{device.get('os', '?')}/{device.get('arch', '?')})"
    )
