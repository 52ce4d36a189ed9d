"""POST/GET/DELETE /engines: upload models, watch builds, remove versions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service import tracing
from service.auth import require_management_key
from service.errors import Unavailable
from service.lifecycle import cluster_view
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
    if state.cluster is not None:
        return JSONResponse({"engines": await cluster_view.list_engines(state, state.cluster)})
    engines = []
    for name in state.registry.names():
        versions = state.registry.versions(name)
        latest = versions[-1]
        engines.append(
            {
                **latest.summary(),
                "versions": [v.version for v in versions],
                "phase": latest.phase,
                "progress": round(latest.progress, 4),
            }
        )
    return JSONResponse({"engines": engines})


@router.get("/engines/{name}")
async def get_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """The newest version's status and the list of versions."""
    if state.cluster is not None:
        return JSONResponse(await cluster_view.engine(state, state.cluster, name))
    versions = state.registry.versions(name)
    return JSONResponse({**versions[-1].status(), "versions": [v.summary() for v in versions]})


@router.get("/engines/{name}/versions/{version}")
async def get_engine_version(name: str, version: int, state: AppState = Depends(get_state)) -> JSONResponse:
    if state.cluster is not None:
        return JSONResponse(await cluster_view.engine_version(state, state.cluster, name, version))
    return JSONResponse(state.registry.get(name, version).status())


@router.delete("/engines/{name}", dependencies=[Depends(require_management_key)])
async def delete_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """Unload and remove every version of an engine."""
    if state.cluster is not None:
        return JSONResponse(await cluster_view.delete(state.cluster, name, None))
    versions = state.registry.versions(name)
    for version in versions:
        await state.manager.delete(version)
    return JSONResponse({"name": name, "deleted_versions": [v.version for v in versions]})


@router.delete("/engines/{name}/versions/{version}", dependencies=[Depends(require_management_key)])
async def delete_engine_version(
    name: str, version: int, state: AppState = Depends(get_state)
) -> JSONResponse:
    if state.cluster is not None:
        return JSONResponse(await cluster_view.delete(state.cluster, name, version))
    found = state.registry.get(name, version)
    await state.manager.delete(found)
    return JSONResponse({"name": name, "deleted_versions": [version]})
