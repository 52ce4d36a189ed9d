"""A cache of encoded view answers, fresh for one second.

However many pages poll, each view's JSON is built at most once a second, so the
page's requests cost the serving path next to nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable


class PerSecondCache:
    def __init__(self, ttl_s: float = 1.0, max_entries: int = 256) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, bytes]] = {}

    async def get(self, key: Hashable, build: Callable[[], Awaitable[bytes]]) -> bytes:
        now = time.monotonic()
        found = self._entries.get(key)
        if found is not None and now - found[0] < self._ttl_s:
            return found[1]
        body = await build()
        if len(self._entries) >= self._max_entries:
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self._ttl_s}
        self._entries[key] = (now, body)
        return body
