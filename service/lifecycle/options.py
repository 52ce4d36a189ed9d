"""The form fields of ``POST /engines``, validated into build and batching options."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engines.types import BuildOptions, CalibrationMethod, Precision, ShapeRange
from service.batching import BatchingConfig
from service.errors import BadRequest
from service.settings import Settings


class UploadFields(BaseModel):
    """Text fields of an upload. Unknown fields are refused, so typos don't pass silently."""

    model_config = ConfigDict(extra="forbid")

    name: str
    precision: Precision = Precision.FP32
    calibration: Literal["synthetic"] | None = None
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    tolerance: dict[str, float] | None = None
    metrics: dict[str, str] | None = None
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    opt_batch_size: int | None = Field(None, ge=1, le=4096)
    max_queue_delay_ms: float | None = Field(None, ge=0, le=10_000)
    preferred_batch_sizes: list[int] | None = None
    max_queue_size: int | None = Field(None, ge=1, le=1_000_000)
    timeout_ms: float | None = Field(None, gt=0, le=3_600_000)
    instances: int | None = Field(None, ge=1, le=64)
    latency_target_ms: float | None = Field(None, gt=0, le=600_000)
    priority_levels: int | None = Field(None, ge=1, le=16)
    default_priority_level: int | None = Field(None, ge=1, le=16)
    shapes: dict[str, dict[str, list[int]]] | None = None
    workspace_bytes: int | None = Field(None, ge=1)
    optimization_level: int | None = Field(None, ge=0, le=5)
    repair: bool = True
    repair_max_nodes: int | None = Field(None, ge=1, le=100_000)
    repair_seconds: float = Field(600.0, gt=0, le=86_400)
    progressive: bool | None = None

    @field_validator("tolerance", "shapes", "metrics", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"must be a JSON object ({exc})") from exc
        return value

    @field_validator("preferred_batch_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [int(item) for item in text.split(",") if item.strip()]
        return value


def parse_upload_fields(fields: dict[str, str]) -> UploadFields:
    try:
        return UploadFields.model_validate(fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()))
            message = error.get("msg", "invalid")
            if error.get("type") == "extra_forbidden":
                message = "unknown form field"
            problems.append(f"{where}: {message}" if where else message)
        raise BadRequest("invalid upload fields: " + "; ".join(problems)) from None
    except ValueError as exc:
        raise BadRequest(f"invalid upload fields: {exc}") from None


def progressive_of(fields: UploadFields, settings: Settings) -> bool:
    """Whether the version serves on a baseline engine while its optimized one builds."""
    return settings.progressive if fields.progressive is None else fields.progressive


def to_options(
    fields: UploadFields,
    settings: Settings,
    *,
    calibration_sha256: str | None,
    validation_sha256: str | None,
) -> tuple[BuildOptions, BatchingConfig]:
    max_batch = fields.max_batch_size or settings.max_batch_size
    preferred = tuple(sorted(set(fields.preferred_batch_sizes or settings.preferred_batch_sizes)))
    if any(size < 1 or size > max_batch for size in preferred):
        raise BadRequest(f"preferred_batch_sizes must lie between 1 and max_batch_size ({max_batch})")
    levels = fields.priority_levels or settings.priority_levels
    default_level = fields.default_priority_level or min(settings.default_priority_level, levels)
    if default_level > levels:
        raise BadRequest(f"default_priority_level must lie between 1 and priority_levels ({levels})")
    if fields.opt_batch_size is not None and fields.opt_batch_size > max_batch:
        raise BadRequest("opt_batch_size must not exceed max_batch_size")
    if fields.calibration == "synthetic" and calibration_sha256:
        raise BadRequest("send either a calibration file or calibration=synthetic, not both")
    if fields.tolerance is not None:
        from engines.accuracy import parse_tolerance

        try:
            parse_tolerance(
                json.dumps(fields.tolerance),
                fields.precision if fields.precision != Precision.AUTO else Precision.INT8,
            )
        except ValueError as exc:
            raise BadRequest(f"tolerance: {exc}") from None
    metrics: dict[str, str] = {}
    if fields.metrics is not None:
        from engines.output_rules import parse_metrics

        try:
            metrics = parse_metrics(json.dumps(fields.metrics))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    shapes = []
    for input_name, ranges in (fields.shapes or {}).items():
        try:
            shapes.append(
                ShapeRange(input_name, tuple(ranges["min"]), tuple(ranges["opt"]), tuple(ranges["max"]))
            )
        except KeyError as exc:
            raise BadRequest(f"shapes.{input_name} needs 'min', 'opt' and 'max' shapes") from exc
    options = BuildOptions(
        precision=fields.precision,
        max_batch_size=max_batch,
        opt_batch_size=fields.opt_batch_size or (preferred[0] if preferred else None),
        calibration_method=fields.calibration_method,
        calibration_sha256=calibration_sha256,
        validation_sha256=validation_sha256,
        synthetic_calibration=fields.calibration == "synthetic",
        tolerance=tuple(sorted((fields.tolerance or {}).items())),
        metrics=tuple(sorted(metrics.items())),
        shapes=tuple(shapes),
        workspace_bytes=fields.workspace_bytes,
        optimization_level=fields.optimization_level,
        repair=fields.repair,
        repair_max_nodes=fields.repair_max_nodes,
        repair_seconds=fields.repair_seconds,
    )
    batching = BatchingConfig(
        max_batch_size=max_batch,
        max_queue_delay_ms=(
            fields.max_queue_delay_ms
            if fields.max_queue_delay_ms is not None
            else settings.max_queue_delay_ms
        ),
        preferred_batch_sizes=preferred,
        max_queue_size=fields.max_queue_size or settings.max_queue_size,
        timeout_ms=fields.timeout_ms or settings.timeout_ms,
        instances=fields.instances or settings.instances,
        latency_target_ms=fields.latency_target_ms,
        priority_levels=levels,
        default_priority_level=default_level,
    )
    return options, batching
