"""Tensors in and out of kiln's native JSON API.

JSON numbers become arrays of the engine's input dtypes: floats for float inputs;
integers for integer inputs, where a non-integral or out-of-range value is refused.
Every problem is an ``InvalidInput`` naming the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engines.errors import InvalidInput
from engines.types import Signature, TensorSpec


def to_array(value: Any, spec: TensorSpec, *, max_elements: int) -> np.ndarray:
    """Convert a nested list (or a scalar) to an array of ``spec``'s dtype."""
    dtype = np.dtype(spec.dtype)
    try:
        raw = np.asarray(value)
    except ValueError as exc:
        raise InvalidInput(f"input '{spec.name}' is not a rectangular nested list: {exc}") from exc
    if raw.dtype.kind in "OUSV" or raw.dtype.kind == "M":
        raise InvalidInput(f"input '{spec.name}' must hold only numbers in a rectangular nested list")
    if raw.size > max_elements:
        raise InvalidInput(f"input '{spec.name}' has {raw.size} elements; the limit is {max_elements}")
    return cast_checked(raw, dtype, spec.name)


def cast_checked(raw: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Cast numbers to ``dtype``, refusing values the cast would change."""
    if raw.dtype == dtype:
        return raw
    if dtype.kind == "b":
        if raw.dtype.kind == "b":
            return raw.astype(dtype)
        if raw.size and not np.isin(raw, (0, 1)).all():
            raise InvalidInput(f"input '{name}' takes booleans (true/false or 0/1)")
        return raw.astype(dtype)
    if dtype.kind in "iu":
        if raw.dtype.kind == "f":
            if raw.size and not (np.isfinite(raw).all() and (raw == np.floor(raw)).all()):
                raise InvalidInput(f"input '{name}' takes integers ({dtype}); got non-integral values")
        elif raw.dtype.kind not in "iub":
            raise InvalidInput(f"input '{name}' takes integers ({dtype})")
        if raw.size:
            info = np.iinfo(dtype)
            low, high = raw.min(), raw.max()
            if low < info.min or high > info.max:
                raise InvalidInput(
                    f"input '{name}' has values outside the range of {dtype} ({info.min}..{info.max})"
                )
        return raw.astype(dtype)
    if dtype.kind == "f":
        if raw.dtype.kind not in "fiub":
            raise InvalidInput(f"input '{name}' takes numbers ({dtype})")
        # Check the range before casting: a cast that overflows warns, and a
        # warnings context costs more than this check on small requests.
        if raw.size and raw.dtype.kind in "fiu" and dtype.itemsize < raw.dtype.itemsize:
            largest = np.abs(raw).max()
            if largest > np.finfo(dtype).max:
                raise InvalidInput(f"input '{name}' has values too large for {dtype}")
        return raw.astype(dtype)
    raise InvalidInput(f"input '{name}' has dtype {dtype}, which the JSON API cannot fill")


def decode_native_inputs(inputs: Any, signature: Signature, *, max_elements: int) -> dict[str, np.ndarray]:
    """``{"name": nested list, ...}`` (or the nested list itself for one-input engines)."""
    if not isinstance(inputs, Mapping):
        if len(signature.inputs) != 1:
            names = ", ".join(spec.name for spec in signature.inputs)
            raise InvalidInput(f"'inputs' must be an object keyed by input name ({names})")
        inputs = {signature.inputs[0].name: inputs}
    known = {spec.name: spec for spec in signature.inputs}
    unknown = [name for name in inputs if name not in known]
    if unknown:
        raise InvalidInput(
            f"unknown input(s): {', '.join(map(str, unknown))}; this engine takes {', '.join(known)}"
        )
    # Missing inputs, shapes and the batch range: Runner.check_feeds, once for every protocol.
    total = 0
    feeds = {}
    for name, value in inputs.items():
        array = to_array(value, known[name], max_elements=max_elements)
        total += array.size
        if total > max_elements:
            raise InvalidInput(f"the request has more than {max_elements} elements in all")
        feeds[name] = array
    return feeds
