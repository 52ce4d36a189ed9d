"""Plain data types shared by the engines package and its callers.

All of them are frozen: a build is described once and never mutated, so the same
object can key a cache, travel to a build process and be written to the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    AUTO = "auto"


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


DYNAMIC = -1
"""Marks a dimension whose size is only known at run time."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dtype`` is a numpy dtype name ("float32", "int64")."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, and whether requests can be batched along axis 0.

    ``batchable`` is true only when every input and output has a dynamic first
    dimension that the model treats as the batch; ``unbatched_reason`` says why not.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batchable: bool
    unbatched_reason: str = ""

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "batchable": self.batchable,
            "unbatched_reason": self.unbatched_reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(d) for d in data["outputs"]),
            batchable=bool(data["batchable"]),
            unbatched_reason=data.get("unbatched_reason", ""),
        )


@dataclass(frozen=True)
class ShapeRange:
    """A user-given range for one input's dynamic non-batch dims (TensorRT profiles)."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """How to build one engine. Every field that changes the artifact is in the cache key."""

    precision: Precision = Precision.FP32
    max_batch_size: int = 8
    opt_batch_size: int | None = None
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    calibration_sha256: str | None = None
    validation_sha256: str | None = None
    synthetic_calibration: bool = False
    tolerance: tuple[tuple[str, float], ...] = ()
    metrics: tuple[tuple[str, str], ...] = ()
    """Output name → how it is judged (``engines.output_rules``), the upload's overrides."""
    shapes: tuple[ShapeRange, ...] = ()
    workspace_bytes: int | None = None
    optimization_level: int | None = None
    repair: bool = True
    repair_max_nodes: int | None = None
    """Most nodes a repair may keep in FP32; None = ``engines.repair.default_node_budget``."""
    repair_seconds: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["precision"] = str(self.precision)
        data["calibration_method"] = str(self.calibration_method)
        data["tolerance"] = dict(self.tolerance)
        # Left out when empty, so that engines built before it keep their cache keys.
        data["metrics"] = dict(self.metrics)
        if not self.metrics:
            del data["metrics"]
        data["shapes"] = [
            {"input": s.input_name, "min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
            for s in self.shapes
        ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildOptions:
        return cls(
            precision=Precision(data.get("precision", "fp32")),
            max_batch_size=int(data.get("max_batch_size", 8)),
            opt_batch_size=data.get("opt_batch_size"),
            calibration_method=CalibrationMethod(data.get("calibration_method", "minmax")),
            calibration_sha256=data.get("calibration_sha256"),
            validation_sha256=data.get("validation_sha256"),
            synthetic_calibration=bool(data.get("synthetic_calibration", False)),
            tolerance=tuple(sorted((k, float(v)) for k, v in data.get("tolerance", {}).items())),
            metrics=tuple(sorted((k, str(v)) for k, v in data.get("metrics", {}).items())),
            shapes=tuple(
                ShapeRange(s["input"], tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                for s in data.get("shapes", [])
            ),
            workspace_bytes=data.get("workspace_bytes"),
            optimization_level=data.get("optimization_level"),
            repair=bool(data.get("repair", True)),
            repair_max_nodes=data.get("repair_max_nodes"),
            repair_seconds=float(data.get("repair_seconds", 600.0)),
        )


@dataclass(frozen=True)
class DeviceSignature:
    """What an engine is tied to: the backend, its version and the device it was built on."""

    backend: str
    backend_version: str
    device: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "backend_version": self.backend_version, "device": self.device}

    def key(self) -> str:
        return digest(self.to_dict())[:16]


def digest(data: Any) -> str:
    """sha256 of a JSON-serialisable value, stable across runs (sorted keys)."""
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def engine_cache_key(model_sha256: str, options: BuildOptions, device: DeviceSignature) -> str:
    """The store key of an engine: same model bytes, options and device give the same key."""
    return digest({"model": model_sha256, "options": options.to_dict(), "device": device.to_dict()})
