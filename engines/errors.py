"""Errors raised by the engines package.

Every error carries a short machine-readable ``kind`` and a message meant for the
user. The service maps each class to an HTTP status in one table
(``service/errors.py``); nothing here knows about HTTP.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base class of every error the engines package raises on purpose."""

    kind = "engine_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidModel(EngineError):
    """The uploaded bytes are not a valid ONNX model (parse, checker, external data)."""

    kind = "invalid_model"


class UnsupportedModel(EngineError):
    """A valid ONNX model that this backend or runtime cannot serve (opset, ops, dtypes)."""

    kind = "unsupported_model"


class CalibrationError(EngineError):
    """Calibration or validation data does not fit the model's signature."""

    kind = "invalid_calibration"


class BuildFailed(EngineError):
    """The backend could not build an engine; the message says why."""

    kind = "build_failed"


class AccuracyRejected(EngineError):
    """A reduced-precision candidate fell outside tolerance against the FP32 model."""

    kind = "accuracy_rejected"


class InvalidInput(EngineError):
    """Inference inputs do not match the engine's signature (name, dtype, shape, values)."""

    kind = "invalid_input"


class InferenceFailed(EngineError):
    """The engine failed while running inputs that passed every check, for a reason
    that is not the input's (out of memory, a runtime fault): a server error."""

    kind = "inference_failed"


class BackendUnavailable(EngineError):
    """The requested backend cannot run on this machine (library or device missing)."""

    kind = "backend_unavailable"


class StoreCorrupted(EngineError):
    """A stored artifact failed its checksum or its metadata cannot be read."""

    kind = "store_corrupted"


class DeviceLost(EngineError):
    """The GPU is unusable for the rest of this process's life (a sticky CUDA error:
    illegal address, launch failure, uncorrectable ECC). Only a new process recovers."""

    kind = "device_lost"


class StoreInUse(EngineError):
    """Another server holds the store (single node: one server per store)."""

    kind = "store_in_use"


class InvalidSource(EngineError):
    """A model or data set named by a URI kiln cannot fetch as written: a malformed
    ``s3://`` or ``https://`` URI, an unsupported scheme, or a key that names a prefix."""

    kind = "invalid_source"


class ObjectNotFound(EngineError):
    """The object (or its bucket) named by a URI does not exist."""

    kind = "source_not_found"


class ObjectAccessDenied(EngineError):
    """The object store refused kiln's credentials, or kiln has none."""

    kind = "source_access_denied"


class ObjectStoreUnavailable(EngineError):
    """The object store or web server cannot be reached or failed (5xx, timeout):
    retry later."""

    kind = "source_unavailable"


class ChecksumMismatch(EngineError):
    """Fetched bytes do not have the sha256 the request named."""

    kind = "checksum_mismatch"


class TooLarge(EngineError):
    """A fetched object is larger than its limit."""

    kind = "payload_too_large"
