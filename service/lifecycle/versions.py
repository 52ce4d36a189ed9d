"""The one way in for a new engine version: validate everything, then register.

``POST /engines`` and ``kiln build`` both call ``register_version`` with the text
fields of an upload and its files already written to the store's ``tmp/``.
Everything that can be checked before a build is checked here (name, engine
limit, the model and its signature, calibration and validation data against the
signature, shapes, batching limits, tolerance, metrics, the INT8 data rule) and answers a
4xx ``ServiceError`` or an ``EngineError`` before anything is registered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from engines.calibration import load_samples
from engines.model_package import StagedModel, stage_path, stage_upload
from engines.output_rules import check_metrics
from engines.shapes import validate_shapes
from engines.types import Precision
from service.errors import BadRequest
from service.lifecycle.manager import EngineManager
from service.lifecycle.options import UploadFields, parse_upload_fields, progressive_of, to_options
from service.lifecycle.registry import EngineVersion, check_name
from service.lifecycle.uploads import UploadedFile

DATA_FILES = ("calibration", "validation")


def _check_int8_data(fields: UploadFields, files: dict[str, UploadedFile]) -> None:
    if fields.precision == Precision.INT8 and "calibration" not in files and fields.calibration is None:
        raise BadRequest(
            "precision=int8 needs calibration data: attach a 'calibration' .npz file "
            "(arrays keyed by input name, samples on axis 0), or send calibration=synthetic "
            "to calibrate on random data"
        )


async def register_version(
    manager: EngineManager,
    fields: dict[str, str],
    files: dict[str, UploadedFile],
    *,
    model_data: Sequence[tuple[str, Path]] = (),
    model_on_disk: Path | None = None,
) -> EngineVersion:
    """Validate an upload and register its next version (building in the background).

    ``files`` maps ``model`` (required unless ``model_on_disk``), ``calibration`` and
    ``validation`` to files under the store's ``tmp/``; ``model_data`` names the
    model's external data files as ``(location, path)``. ``model_on_disk`` is a
    graph with its data beside it, or an archive (``kiln build``). Everything is
    published into the store on success (the caller removes what is left)."""
    settings = manager.settings
    if "model" not in files and model_on_disk is None:
        raise BadRequest("the upload needs a 'model' file field holding the .onnx model, or a 'source' URI")
    if "name" not in fields:
        raise BadRequest("the upload needs a 'name' field")
    upload = parse_upload_fields(fields)
    name = check_name(upload.name)
    manager.check_limits(name)
    _check_int8_data(upload, files)
    calibration, validation = files.get("calibration"), files.get("validation")
    options, batching = to_options(
        upload,
        settings,
        calibration_sha256=calibration.sha256 if calibration else None,
        validation_sha256=validation.sha256 if validation else None,
    )
    staged: StagedModel
    if model_on_disk is not None:
        filename = model_on_disk.name
        staged = await asyncio.to_thread(stage_path, manager.store, model_on_disk, settings.max_upload_bytes)
    else:
        filename = files["model"].filename
        staged = await asyncio.to_thread(
            stage_upload, manager.store, files["model"].path, list(model_data), settings.max_upload_bytes
        )
    try:
        signature = staged.signature
        try:
            validate_shapes(signature, options.shapes)
            check_metrics(dict(options.metrics), signature)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        for purpose in DATA_FILES:
            if purpose in files:
                await asyncio.to_thread(
                    load_samples,
                    files[purpose].path,
                    signature,
                    purpose=purpose,
                    max_bytes=settings.max_data_bytes,
                )
        manager.check_limits(name)  # the checks above yield to other uploads
        await asyncio.to_thread(staged.publish, manager.store)  # fsyncs up to a GiB
    finally:
        await asyncio.to_thread(staged.discard)
    for purpose in DATA_FILES:
        if purpose in files:
            await asyncio.to_thread(manager.store.add_data, files[purpose].path, files[purpose].sha256)
    return await manager.register(
        name,
        staged.sha256,
        filename,
        options,
        batching,
        progressive=progressive_of(upload, settings),
    )
