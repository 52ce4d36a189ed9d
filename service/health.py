"""Liveness and readiness (native and KServe v2 paths share the same rules)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.protocols.responses import JSONResponse
from service.state import get_state

router = APIRouter(tags=["health"])


@router.get("/health/live")
async def live() -> Response:
    """The process is up and its event loop answers."""
    return JSONResponse({"status": "live"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """200 once start-up finished (stored engines restored), 503 before that and
    while draining, so load balancers stop sending traffic."""
    state = get_state(request)
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "starting"
    return JSONResponse({"status": reason}, status_code=503)
