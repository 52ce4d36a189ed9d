"""Liveness and readiness. The native and KServe v2 endpoints share ``not_ready_reason``.

Ready means servable: start-up finished, every version restored from the store
has loaded and warmed up (or failed), every engine named in
``KILN_REQUIRE_READY`` has a servable version, and the server is not draining.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.errors import NotFound, NotReady
from service.protocols.responses import JSONResponse
from service.state import AppState, get_state

router = APIRouter(tags=["health"])


def not_ready_reason(state: AppState) -> str | None:
    """Why the server must not receive traffic now, or None when it is ready."""
    if state.draining:
        return "draining"
    if not state.manager.restored:
        return "starting"
    pending = state.manager.pending_restores()
    if pending:
        names = ", ".join(f"{v.name} v{v.version}" for v in pending[:5])
        return f"loading {len(pending)} restored engine version(s): {names}"
    for name in state.settings.require_ready:
        try:
            state.registry.servable(name)
        except NotFound:
            return f"engine '{name}' (KILN_REQUIRE_READY) does not exist"
        except NotReady:
            return f"engine '{name}' (KILN_REQUIRE_READY) has no ready version"
    return None


@router.get("/health/live")
async def live() -> Response:
    """The process is up and its event loop answers."""
    return JSONResponse({"status": "live"})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    """200 when every restored engine can serve; 503 with the reason before that and
    while draining, so load balancers send no traffic the server cannot answer."""
    reason = not_ready_reason(get_state(request))
    if reason is None:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"status": "draining" if reason == "draining" else "starting", "reason": reason}, status_code=503
    )
