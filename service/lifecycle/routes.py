"""POST/GET/DELETE /engines: upload models, watch builds, remove versions, retry failures."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service import tracing
from service.auth import require_management_key
from service.errors import Unavailable
from service.lifecycle import views
from service.lifecycle.sources import FetchedSources, fetch_sources
from service.lifecycle.uploads import ParsedForm, parse_multipart
from service.lifecycle.versions import DATA_FILES, register_version
from service.protocols.responses import JSONResponse
from service.state import AppState, get_state

router = APIRouter(tags=["engines"])


@router.post("/engines", status_code=202, dependencies=[Depends(require_management_key)])
async def upload_engine(request: Request) -> JSONResponse:
    """Upload an ONNX model (multipart ``model`` file and ``name``) and start its build.

    A model with external data comes as the graph plus one ``model_data`` part per
    data file, or as one archive in ``model`` (see ``engines.model_package``). A
    ``source`` URI (s3://, https://) replaces the ``model`` file (``sources.py``)."""
    state = get_state(request)
    if state.draining:
        raise Unavailable("the server is shutting down", headers={"Retry-After": "5"})
    settings = state.settings
    form: ParsedForm = await parse_multipart(
        request.headers.get("content-type", ""),
        request.stream(),
        state.store,
        {
            "model": settings.max_upload_bytes,
            "model_data": settings.max_upload_bytes,
            **{purpose: settings.max_data_bytes for purpose in DATA_FILES},
        },
        repeated={"model_data"},
    )
    fetched = FetchedSources()
    try:
        model_data = [(part.filename, part.path) for part in form.repeated.get("model_data", [])]
        # The build's spans (started in this context) join the upload's trace.
        with tracing.request_span("POST /engines", request.headers.get) as trace_headers:
            fetched = await fetch_sources(form.fields, form.files, bool(model_data), state.store, settings)
            version = await register_version(
                state.manager,
                form.fields,
                {**form.files, **fetched.files},
                model_data=model_data + fetched.model_data,
            )
    finally:
        form.discard()
        fetched.discard()
    return JSONResponse(
        {"name": version.name, "version": version.version, "state": str(version.state), "url": version.url},
        status_code=202,
        headers={"Location": version.url, **trace_headers},
    )


@router.get("/engines")
async def list_engines(state: AppState = Depends(get_state)) -> JSONResponse:
    """Every engine with its newest version."""
    return JSONResponse({"engines": await views.list_engines(state)})


@router.get("/engines/{name}")
async def get_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """The newest version's status and the list of versions."""
    return JSONResponse(await views.engine(state, name))


@router.get("/engines/{name}/versions/{version}")
async def get_engine_version(name: str, version: int, state: AppState = Depends(get_state)) -> JSONResponse:
    return JSONResponse(await views.engine_version(state, name, version))


@router.delete("/engines/{name}", dependencies=[Depends(require_management_key)])
async def delete_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """Unload and remove every version of an engine (on every replica)."""
    return JSONResponse(await views.delete(state, name, None))


@router.delete("/engines/{name}/versions/{version}", dependencies=[Depends(require_management_key)])
async def delete_engine_version(
    name: str, version: int, state: AppState = Depends(get_state)
) -> JSONResponse:
    return JSONResponse(await views.delete(state, name, version))


@router.post("/engines/{name}/retry", status_code=202, dependencies=[Depends(require_management_key)])
async def retry_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """Start every failed version of an engine again (its failed builds afresh)."""
    return JSONResponse(await views.retry(state, name, None), status_code=202)


@router.post(
    "/engines/{name}/versions/{version}/retry",
    status_code=202,
    dependencies=[Depends(require_management_key)],
)
async def retry_engine_version(name: str, version: int, state: AppState = Depends(get_state)) -> JSONResponse:
    """Start one failed version again (its failed build afresh, and its load on
    every replica where it failed)."""
    return JSONResponse(await views.retry(state, name, version), status_code=202)
