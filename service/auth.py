"""API keys: management always needs one when keys are configured; prediction
only when ``KILN_PROTECT_PREDICT`` is on. Keys are compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from service.errors import Forbidden, Unauthorized
from service.state import get_state

HeaderLookup = Callable[[str], str | None]
"""Looks up a request header by lower-case name (``request.headers.get``)."""


def presented_key(headers: HeaderLookup) -> str | None:
    header = headers("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers("x-api-key")
    return key.strip() if key else None


def check_key(headers: HeaderLookup, keys: list[str]) -> None:
    """Raises ``Unauthorized`` without a key and ``Forbidden`` with a wrong one."""
    if not keys:
        return
    key = presented_key(headers)
    if key is None:
        raise Unauthorized(
            "this endpoint needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    matched = False
    for candidate in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(key.encode(), candidate.encode())
    if not matched:
        raise Forbidden("the API key is not valid")


async def require_management_key(request: Request) -> None:
    check_key(request.headers.get, get_state(request).api_keys)


async def require_predict_key(request: Request) -> None:
    state = get_state(request)
    if state.settings.protect_predict:
        check_key(request.headers.get, state.api_keys)
