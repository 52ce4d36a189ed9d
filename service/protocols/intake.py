"""Limits on decoded request bodies: nesting depth and element count.

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
