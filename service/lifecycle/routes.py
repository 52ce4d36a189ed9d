"""POST/GET/DELETE /engines: upload models, watch builds, remove versions."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from engines.onnx_model import load_model, read_signature
from engines.types import Precision, Signature
from service.auth import require_management_key
from service.errors import BadRequest, Unavailable
from service.lifecycle.options import parse_upload_fields, to_options
from service.lifecycle.registry import check_name
from service.lifecycle.uploads import ParsedForm, parse_multipart
from service.protocols.responses import JSONResponse
from service.state import AppState, get_state

router = APIRouter(tags=["engines"])


def _validate_model(path: Any, max_bytes: int) -> Signature:
    model = load_model(path, max_bytes=max_bytes)
    return read_signature(model)


def _validate_data(path: Any, signature: Signature, purpose: str, max_bytes: int) -> None:
    from engines.calibration import load_samples

    load_samples(path, signature, purpose=purpose, max_bytes=max_bytes)


@router.post("/engines", status_code=202, dependencies=[Depends(require_management_key)])
async def upload_engine(request: Request) -> JSONResponse:
    """Upload an ONNX model (multipart ``model`` file and ``name``) and start its build."""
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
            "calibration": settings.max_data_bytes,
            "validation": settings.max_data_bytes,
        },
    )
    try:
        if "model" not in form.files:
            raise BadRequest("the upload needs a 'model' file field holding the .onnx model")
        if "name" not in form.fields:
            raise BadRequest("the upload needs a 'name' field")
        fields = parse_upload_fields(form.fields)
        name = check_name(fields.name)
        state.manager.check_limits(name)
        model = form.files["model"]
        signature = await asyncio.to_thread(_validate_model, model.path, settings.max_upload_bytes)
        for purpose in ("calibration", "validation"):
            if purpose in form.files:
                await asyncio.to_thread(
                    _validate_data, form.files[purpose].path, signature, purpose, settings.max_data_bytes
                )
        if (
            fields.precision == Precision.INT8
            and "calibration" not in form.files
            and fields.calibration is None
        ):
            raise BadRequest(
                "precision=int8 needs calibration data: attach a 'calibration' .npz file "
                "(arrays keyed by input name, samples on axis 0), or send calibration=synthetic "
                "to calibrate on random data"
            )
        calibration = form.files.get("calibration")
        validation = form.files.get("validation")
        options, batching = to_options(
            fields,
            settings,
            calibration_sha256=calibration.sha256 if calibration else None,
            validation_sha256=validation.sha256 if validation else None,
            signature=signature,
        )
        state.store.add_model(model.path, model.sha256)
        if calibration:
            state.store.add_data(calibration.path, calibration.sha256)
        if validation:
            state.store.add_data(validation.path, validation.sha256)
        version = state.manager.create(name, model.sha256, model.filename, options, batching)
    finally:
        form.discard()
    return JSONResponse(
        {"name": version.name, "version": version.version, "state": str(version.state), "url": version.url},
        status_code=202,
        headers={"Location": version.url},
    )


@router.get("/engines")
async def list_engines(state: AppState = Depends(get_state)) -> JSONResponse:
    """Every engine with its newest version."""
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
    versions = state.registry.versions(name)
    return JSONResponse({**versions[-1].status(), "versions": [v.summary() for v in versions]})


@router.get("/engines/{name}/versions/{version}")
async def get_engine_version(name: str, version: int, state: AppState = Depends(get_state)) -> JSONResponse:
    return JSONResponse(state.registry.get(name, version).status())


@router.delete("/engines/{name}", dependencies=[Depends(require_management_key)])
async def delete_engine(name: str, state: AppState = Depends(get_state)) -> JSONResponse:
    """Unload and remove every version of an engine."""
    versions = state.registry.versions(name)
    for version in versions:
        await state.manager.delete(version)
    return JSONResponse({"name": name, "deleted_versions": [v.version for v in versions]})


@router.delete("/engines/{name}/versions/{version}", dependencies=[Depends(require_management_key)])
async def delete_engine_version(
    name: str, version: int, state: AppState = Depends(get_state)
) -> JSONResponse:
    found = state.registry.get(name, version)
    await state.manager.delete(found)
    return JSONResponse({"name": name, "deleted_versions": [version]})
