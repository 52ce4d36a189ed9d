"""Build one zoo model at one precision the way kiln does, and judge the result.

Shared by the zoo tests and ``benchmarks/models_table.py`` (which writes the table in
docs/MODELS.md), so the page shows exactly what the tests check.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines import accuracy
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.calibration import iter_batches, load_samples
from engines.errors import EngineError
from engines.output_rules import rules_for
from engines.store import EngineStore, sha256_file
from engines.types import BuildOptions, Precision, ShapeRange, Signature, engine_cache_key
from tests.zoo.models import ZooModel

CALIBRATION_SAMPLES = 24
VALIDATION_SAMPLES = 8
BATCH_SIZES = (1, 4)
FP32_RELATIVE = 1e-4
"""FP32 engines match ONNX Runtime on the original within this fraction of the output's scale."""


@dataclass
class Cell:
    model: str
    precision: str
    state: str  # "ready" or "refused"
    served: str = ""
    message: str = ""
    agreement: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    signature: Signature | None = None
    report: dict[str, Any] = field(default_factory=dict)


def npz_bytes(samples: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **samples)
    return buffer.getvalue()


def put_bytes(store: EngineStore, data: bytes, *, model: bool = False) -> str:
    """Store ``data`` as a model or a data set under its sha256, which it returns."""
    temp = store.temp_path()
    temp.write_bytes(data)
    sha = sha256_file(temp)
    (store.add_model if model else store.add_data)(temp, sha)
    return sha


def data_for(model: ZooModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return model.samples(rng, CALIBRATION_SAMPLES), model.samples(rng, VALIDATION_SAMPLES)


def build_cell(model: ZooModel, model_path: Path, precision: str, store_root: Path, **overrides: Any) -> Cell:
    """Build ``model`` at ``precision`` (int8 and auto with calibration data, fp16 and
    auto with validation data) and compare the engine with ONNX Runtime on the original."""
    store = EngineStore(store_root)
    model_sha = put_bytes(store, model_path.read_bytes(), model=True)
    calibration, validation = data_for(model)
    calibration_sha = validation_sha = None
    if precision in ("int8", "auto"):
        calibration_sha = put_bytes(store, npz_bytes(calibration))
    if precision in ("fp16", "auto"):
        validation_sha = put_bytes(store, npz_bytes(validation))
    options = BuildOptions(
        precision=Precision(precision),
        max_batch_size=max(BATCH_SIZES),
        opt_batch_size=1,
        calibration_sha256=calibration_sha,
        validation_sha256=validation_sha,
        shapes=tuple(
            ShapeRange(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
            for name, r in (model.shapes or {}).items()
        ),
        # The table shows each conversion as it is; repairing the failed ones takes
        # minutes per cell and is measured by benchmarks/repair.py instead.
        repair=False,
    )
    options = replace(options, **overrides)
    backend = OnnxRuntimeBackend()
    key = engine_cache_key(model_sha, options, backend.device_signature())
    try:
        meta = run_build(
            BuildJob(str(store.root), model_sha, options.to_dict(), backend.name, key, BATCH_SIZES)
        )
    except EngineError as exc:
        return Cell(
            model.name, precision, "refused", message=f"{exc.kind}: {exc.message}", report=exc.details or {}
        )
    signature = Signature.from_dict(meta["signature"])
    report = meta["report"]
    latency = report.get("latency_ms", {}).get("1")
    cell = Cell(
        model.name,
        precision,
        "ready",
        served=meta["precision"],
        latency_ms=latency,
        signature=signature,
        report=report,
    )
    cell.message = report.get("note", "") or "; ".join(report.get("skipped", {}).values())
    # Judge on held-out inputs kiln never saw, against ONNX Runtime on the original model.
    samples_path = store_root / "judge.npz"
    samples_path.write_bytes(npz_bytes(model.samples(np.random.default_rng(7), VALIDATION_SAMPLES)))
    samples = load_samples(samples_path, signature)
    reference = backend.load(model_path, signature, options)
    engine = backend.load(store.artifact_path(meta["cache_key"], meta), signature, options)
    try:
        if meta["precision"] == "fp32" and not report.get("note"):
            cell.agreement = _fp32_agreement(reference, engine, samples, signature)
        else:
            rules = rules_for(signature, onnx.load(model_path, load_external_data=False))
            comparison = accuracy.compare(reference, engine, samples, [1], rules)
            cell.agreement = {
                name: {k: v for k, v in metrics.items() if k in _SHOWN}
                for name, metrics in comparison["results"][0]["outputs"].items()
            }
    finally:
        reference.close()
        engine.close()
    return cell


_SHOWN = ("cosine_similarity", "top1_agreement", "exact_match", "decided_by", "rule")


def _fp32_agreement(
    reference: Any, engine: Any, samples: dict[str, np.ndarray], signature: Signature
) -> dict:
    worst: dict[str, float] = {}
    for feeds in iter_batches(samples, 1, signature):
        want = reference.infer(feeds)
        got = engine.infer(feeds)
        for name, expected in want.items():
            expected = np.asarray(expected, dtype=np.float64)
            scale = max(float(np.abs(expected).max()), 1e-12) if expected.size else 1.0
            error = (
                float(np.abs(np.asarray(got[name], dtype=np.float64) - expected).max()) / scale
                if expected.size
                else 0.0
            )
            worst[name] = max(worst.get(name, 0.0), error)
    return {name: {"max_error_relative_to_scale": error} for name, error in worst.items()}


def passes(cell: Cell) -> list[str]:
    """The agreement rules a ready cell breaks (see docs/MODELS.md)."""
    problems = []
    for output, metrics in cell.agreement.items():
        if "max_error_relative_to_scale" in metrics:
            if metrics["max_error_relative_to_scale"] > FP32_RELATIVE:
                problems.append(f"{output}: fp32 error {metrics['max_error_relative_to_scale']:.2e} of scale")
            continue
        rule = metrics.get("decided_by", "")
        if rule.startswith("top1") and metrics["top1_agreement"] < 0.98:
            problems.append(f"{output}: top-1 {metrics['top1_agreement']:.3f} < 0.98")
        elif rule == "exact_match" and metrics["exact_match"] < 0.98:
            problems.append(f"{output}: exact match {metrics['exact_match']:.3f} < 0.98")
        elif rule == "cosine_similarity" and (metrics["cosine_similarity"] or 0) < 0.99:
            problems.append(f"{output}: cosine {metrics['cosine_similarity']} < 0.99")
    return problems


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
