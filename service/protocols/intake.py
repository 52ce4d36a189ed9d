"""Checks every protocol applies to decoded requests: nesting depth and element
count of JSON bodies, and the ``priority`` field.

orjson parses deeply nested input without recursion limits of its own, and a
body of a few MB can hold millions of numbers; both are checked before any
array is built.
"""

from __future__ import annotations

from typing import Any

from service.errors import BadRequest


def check_json_shape(value: Any, max_depth: int, max_elements: int) -> None:
    """Raise ``BadRequest`` if ``value`` nests deeper than ``max_depth`` or holds
    more than ``max_elements`` scalars in lists."""
    elements = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise BadRequest(f"the JSON body nests deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            if item and not isinstance(item[0], list | dict):
                # A leaf row: count it without visiting each number. A row that mixes
                # numbers and lists is refused later when it becomes an array.
                elements += len(item)
                if elements > max_elements:
                    raise BadRequest(f"the JSON body holds more than {max_elements} numbers")
            else:
                stack.extend((child, depth + 1) for child in item)


def parse_priority(value: Any) -> int | None:
    """Triton's ``priority``: a non-negative integer, 1 the highest; 0 (or a value
    past the engine's levels) means the engine's default level."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest("'priority' must be a non-negative integer (1 is the highest; 0 the default)")
    return value
