"""The web page at ``/``, its static files, its JSON views, and an offline ``/docs``.

Security: every answer carries a strict Content-Security-Policy (scripts, styles and
connections from this server only, no inline code). The HTML and static files hold
no data; the JSON views need the management API key whenever keys are configured,
the same key that uploads and deletes need.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import FileResponse, Response

from service.auth import require_management_key
from service.errors import NotFound
from service.protocols.responses import dumps
from service.state import AppState, get_state
from service.ui import views
from service.ui.cache import PerSecondCache
from service.ui.sampler import TrafficSampler

STATIC = Path(__file__).parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

# Static files by their path under /ui/static/: a fixed list, so no request path reaches the disk.
_FILES = {
    path.relative_to(STATIC).as_posix(): path
    for path in sorted(STATIC.rglob("*"))
    if path.is_file() and path.suffix in {".js", ".css", ".html", ".svg", ".png"}
}
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@dataclass
class UiState:
    sampler: TrafficSampler
    cache: PerSecondCache


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the app's lifespan, after the engines are restored."""
    state: AppState = app.state.kiln
    sampler = TrafficSampler(state.metrics, state.registry.names)
    app.state.kiln_ui = UiState(sampler, PerSecondCache())
    task = asyncio.create_task(sampler.run(), name="kiln-ui-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(lifespan=lifespan)


def _file(path: Path, cache_control: str = "no-cache") -> FileResponse:
    media_type = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(
        path, media_type=media_type, headers={**SECURITY_HEADERS, "Cache-Control": cache_control}
    )


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The page's HTML shell (no data: that comes from the JSON views)."""
    return _file(STATIC / "index.html")


@router.get("/docs", include_in_schema=False)
async def docs() -> FileResponse:
    """Swagger UI from this server's own copy, so the API reference works offline."""
    return _file(STATIC / "docs.html")


@router.get("/ui/static/{path:path}", include_in_schema=False)
async def static(path: str) -> FileResponse:
    found = _FILES.get(path)
    if found is None:
        raise NotFound(f"no static file '{path}'")
    # Vendored libraries change only with their versioned folder name.
    return _file(found, "public, max-age=86400" if path.startswith("vendor/") else "no-cache")


def _ui(request: Request) -> UiState:
    ui: UiState = request.app.state.kiln_ui
    return ui


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/ui/api/overview", tags=["ui"], dependencies=[Depends(require_management_key)])
async def overview_view(request: Request, state: AppState = Depends(get_state)) -> Response:
    """The page's overview: engines with their traffic now, builds in progress (cached 1 s)."""
    ui = _ui(request)

    async def build() -> bytes:
        return dumps(await views.overview(state, ui.sampler))

    return _json(await ui.cache.get("overview", build))


@router.get("/ui/api/engines/{name}", tags=["ui"], dependencies=[Depends(require_management_key)])
async def engine_view(name: str, request: Request, state: AppState = Depends(get_state)) -> Response:
    """The page's engine view: every version's status and report, live series (cached 1 s)."""
    ui = _ui(request)

    async def build() -> bytes:
        return dumps(await views.engine(state, ui.sampler, name))  # 404 for an unknown name

    return _json(await ui.cache.get(("engine", name), build))
