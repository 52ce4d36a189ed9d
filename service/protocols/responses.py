"""JSON responses serialised with orjson (numpy arrays included, no copies to lists)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_OPTIONS, default=_fallback)


def _fallback(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray):  # non-contiguous or a dtype orjson does not take
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
