"""The build pipeline: validate → precision → build → accuracy → profile → commit.

``run_build`` runs in a build child process (see ``service/jobs.py``); it reports
progress through a callback and returns the committed engine's metadata. Every
reduced-precision candidate is checked against the FP32 model before it may be
committed; ``auto`` builds each candidate the inputs allow and keeps the fastest
one within tolerance.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends import backend_class
from engines.backends.base import Backend, ProgressCallback, Runner, no_progress
from engines.calibration import opt_dims
from engines.errors import AccuracyRejected, CalibrationError, EngineError, InvalidModel
from engines.onnx_model import load_model, read_signature
from engines.store import EngineStore
from engines.types import BuildOptions, CalibrationMethod, Precision, ShapeRange, Signature

SYNTHETIC_CALIBRATION_SAMPLES = 64
SYNTHETIC_VALIDATION_SAMPLES = 32
PROFILE_MIN_SECONDS = 0.2
PROFILE_MAX_RUNS = 50


# How much of a whole build each phase accounts for ("load" happens in the server).
PHASE_WEIGHTS = {
    "validate": 0.05,
    "precision": 0.2,
    "build": 0.45,
    "accuracy": 0.1,
    "profile": 0.1,
    "commit": 0.05,
    "load": 0.05,
}


def overall_progress(phase: str, fraction: float, default: float = 0.0) -> float:
    """The whole build's progress in [0, 1] when ``phase`` is ``fraction`` done."""
    if phase not in PHASE_WEIGHTS:
        return default
    start = 0.0
    for name, weight in PHASE_WEIGHTS.items():
        if name == phase:
            return min(1.0, start + weight * max(0.0, min(1.0, fraction)))
        start += weight
    return default


@dataclass(frozen=True)
class BuildJob:
    """Everything a build child needs; plain values so it pickles across processes."""

    store_root: str
    model_sha256: str
    options: dict[str, Any]
    backend: str
    cache_key: str
    batch_sizes: tuple[int, ...] = (1,)
    backend_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Candidate:
    precision: Precision
    onnx_path: Path
    artifact_path: Path
    report: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    accepted: bool = True
    rejection: list[str] = field(default_factory=list)


def make_backend(name: str, kwargs: dict[str, Any]) -> Backend:
    return backend_class(name)(**kwargs)


def run_build(job: BuildJob, progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Build, check and commit one engine. Returns its metadata (see ``EngineStore``).

    Raises ``EngineError`` subclasses with user-facing messages. Blocking: call it
    in a child process or a worker thread, never on an event loop.
    """
    store = EngineStore(Path(job.store_root))
    options = BuildOptions.from_dict(job.options)
    backend = make_backend(job.backend, job.backend_kwargs)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def phase_timer(name: str) -> _PhaseTimer:
        return _PhaseTimer(name, timings, progress)

    with phase_timer("validate"):
        model_path = store.model_path(job.model_sha256)
        if store.stored_model_sha256(job.model_sha256) != job.model_sha256:
            raise InvalidModel(
                "the stored model is missing or its bytes changed (checksum mismatch); upload it again"
            )
        model = load_model(model_path, external_data=store.is_package(job.model_sha256))
        signature = read_signature(model)
        del model
    batch_sizes = job.batch_sizes if signature.batchable else (1,)

    workdir = Path(tempfile.mkdtemp(dir=store.root / "tmp", prefix="build-"))
    try:
        with phase_timer("precision"):
            plan = _precision_plan(options, signature, store)
            candidates, dropped = _transform(
                plan,
                model_path,
                workdir,
                progress,
                auto=options.precision == Precision.AUTO,
                # Asymmetric activations let ONNX Runtime keep Conv+Relu chains in int8;
                # TensorRT only takes symmetric (zero-point 0) quantization.
                symmetric_activations=backend.name == "tensorrt",
                method=options.calibration_method,
            )
        with phase_timer("build"):
            timing_cache = store.timing_cache_path(backend.device_signature().key())
            for index, candidate in enumerate(candidates):

                def build_progress(phase: str, fraction: float, done: int = index) -> None:
                    progress("build", (done + fraction) / len(candidates))

                candidate.report.update(
                    backend.build(
                        candidate.onnx_path,
                        signature,
                        options,
                        candidate.artifact_path,
                        timing_cache_path=timing_cache,
                        progress=build_progress,
                    )
                )
        with phase_timer("accuracy"):
            _check_accuracy(candidates, backend, signature, options, model_path, plan, batch_sizes)
        with phase_timer("profile"):
            for candidate in candidates:
                if not candidate.accepted:
                    continue  # it will not be served, so its speed does not matter
                runner = backend.load(candidate.artifact_path, signature, options)
                try:
                    candidate.latency_ms = profile_latency(runner, signature, batch_sizes, options.shapes)
                finally:
                    runner.close()
        chosen, choice_reason = _choose(candidates, options.precision)
        with phase_timer("commit"):
            meta: dict[str, Any] = {
                "backend": backend.name,
                "device": backend.device_signature().to_dict(),
                "precision": str(chosen.precision),
                "signature": signature.to_dict(),
                "max_batch_size": options.max_batch_size if signature.batchable else 1,
                "options": options.to_dict(),
                "report": {
                    "precision": str(chosen.precision),
                    "requested_precision": str(options.precision),
                    "choice": choice_reason,
                    "calibration": plan.calibration_report,
                    "validation": plan.validation_report,
                    "candidates": [_candidate_summary(c) for c in candidates] + dropped,
                    **chosen.report,
                    "latency_ms": {str(k): v for k, v in chosen.latency_ms.items()},
                    "artifact_bytes": chosen.artifact_path.stat().st_size,
                },
            }
            timings["total"] = time.perf_counter() - started
            meta["report"]["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            committed = store.commit_engine(
                job.cache_key, chosen.artifact_path, backend.artifact_suffix, meta
            )
        return committed
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _PhaseTimer:
    def __init__(self, name: str, timings: dict[str, float], progress: ProgressCallback) -> None:
        self.name = name
        self.timings = timings
        self.progress = progress

    def __enter__(self) -> _PhaseTimer:
        self.start = time.perf_counter()
        self.progress(self.name, 0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start
        if exc[0] is None:
            self.progress(self.name, 1.0)


@dataclass
class _PrecisionPlan:
    precisions: list[Precision]
    calibration: dict[str, np.ndarray] | None
    validation: dict[str, np.ndarray] | None
    calibration_report: dict[str, Any]
    validation_report: dict[str, Any]


def _precision_plan(options: BuildOptions, signature: Signature, store: EngineStore) -> _PrecisionPlan:
    """Which precisions to build, and the calibration and validation samples for them."""
    requested = options.precision
    if requested == Precision.FP32:
        return _PrecisionPlan([Precision.FP32], None, None, {}, {})

    from engines import calibration as calib

    samples = None
    calibration_report: dict[str, Any] = {}
    if options.calibration_sha256:
        samples = calib.load_samples(store.data_path(options.calibration_sha256), signature)
        calibration_report = {
            "source": "uploaded",
            "sha256": options.calibration_sha256,
            "method": str(options.calibration_method),
        }
    elif options.synthetic_calibration:
        samples = calib.synthetic_samples(signature, SYNTHETIC_CALIBRATION_SAMPLES, shapes=options.shapes)
        calibration_report = {
            "source": "synthetic",
            "method": str(options.calibration_method),
            "warning": "INT8 scales come from random data, not from real inputs",
        }

    precisions: list[Precision]
    if requested == Precision.AUTO:
        precisions = [Precision.FP32, Precision.FP16]
        if samples is not None:
            precisions.append(Precision.INT8)
        else:
            calibration_report = {"int8": "skipped: no calibration data was given"}
    else:
        precisions = [requested]
    if Precision.INT8 in precisions and samples is None:
        raise CalibrationError(
            "int8 needs calibration data: upload a 'calibration' .npz with samples of each "
            "input, or pass calibration=synthetic to calibrate on random data"
        )

    validation = None
    validation_report: dict[str, Any]
    if options.validation_sha256:
        validation = calib.load_samples(
            store.data_path(options.validation_sha256), signature, purpose="validation"
        )
        validation_report = {"source": "uploaded", "sha256": options.validation_sha256}
    elif samples is not None and options.calibration_sha256 and calib.sample_count(samples) >= 2:
        samples, validation = calib.split_holdout(samples)
        validation_report = {"source": "held out from the calibration data"}
    else:
        try:
            validation = calib.synthetic_samples(
                signature, SYNTHETIC_VALIDATION_SAMPLES, seed=1, shapes=options.shapes
            )
        except CalibrationError as exc:
            if requested != Precision.AUTO:
                raise CalibrationError(
                    f"cannot make validation inputs for this model ({exc.message}); "
                    "upload a 'validation' .npz to check the reduced-precision engine"
                ) from exc
            # Nothing to check a candidate against: auto serves FP32.
            return _PrecisionPlan(
                [Precision.FP32],
                None,
                None,
                calibration_report,
                {
                    "source": "none",
                    "note": f"reduced precision skipped: {exc.message}",
                },
            )
        validation_report = {"source": "synthetic"}
    if samples is not None:
        calibration_report["samples"] = calib.sample_count(samples)
    validation_report["samples"] = calib.sample_count(validation)
    return _PrecisionPlan(precisions, samples, validation, calibration_report, validation_report)


def _transform(
    plan: _PrecisionPlan,
    model_path: Path,
    workdir: Path,
    progress: ProgressCallback,
    *,
    auto: bool,
    symmetric_activations: bool,
    method: CalibrationMethod,
) -> tuple[list[_Candidate], list[dict[str, Any]]]:
    """The candidates' ONNX files, and (for auto) the candidates whose transform
    failed, with the reason: a model with nothing to quantize still serves FP32."""
    candidates = []
    dropped: list[dict[str, Any]] = []
    for index, precision in enumerate(plan.precisions):
        # FP32 builds from the stored model itself, whose external data lies beside it.
        onnx_path = model_path if precision == Precision.FP32 else workdir / f"{precision}.onnx"
        report: dict[str, Any] = {}
        try:
            if precision != Precision.FP32:
                from engines import precision as transforms

                if precision == Precision.FP16:
                    report["transform"] = transforms.convert_fp16(model_path, onnx_path)
                else:
                    assert plan.calibration is not None
                    report["transform"] = transforms.quantize_int8(
                        model_path,
                        onnx_path,
                        plan.calibration,
                        method=method,
                        symmetric_activations=symmetric_activations,
                    )
        except EngineError as exc:
            if not auto or precision == Precision.FP32:
                raise
            dropped.append({"precision": str(precision), "accepted": False, "dropped": exc.message})
            continue
        candidates.append(_Candidate(precision, onnx_path, workdir / f"{precision}.engine", report=report))
        progress("precision", (index + 1) / len(plan.precisions))
    return candidates, dropped


def _check_accuracy(
    candidates: list[_Candidate],
    backend: Backend,
    signature: Signature,
    options: BuildOptions,
    model_path: Path,
    plan: _PrecisionPlan,
    batch_sizes: tuple[int, ...],
) -> None:
    reference: Runner | None = None
    try:
        for candidate in candidates:
            if candidate.precision == Precision.FP32:
                continue  # the reference itself
            from engines import accuracy

            if reference is None:
                from engines.backends.onnxruntime import OnnxRuntimeBackend

                reference = OnnxRuntimeBackend().load(model_path, signature, options)
            runner = backend.load(candidate.artifact_path, signature, options)
            try:
                assert plan.validation is not None
                tolerance = accuracy.parse_tolerance(None, candidate.precision)
                tolerance.update(dict(options.tolerance))
                comparison = accuracy.compare(reference, runner, plan.validation, list(batch_sizes))
                candidate.report["accuracy"] = comparison
                candidate.report["tolerance"] = tolerance
                candidate.rejection = accuracy.check(comparison, tolerance)
                candidate.accepted = not candidate.rejection
            finally:
                runner.close()
    finally:
        if reference is not None:
            reference.close()


def profile_latency(
    runner: Runner, signature: Signature, batch_sizes: tuple[int, ...], shapes: Sequence[ShapeRange] = ()
) -> dict[int, float]:
    """Median milliseconds per run at each batch size, on random inputs at the profile's opt."""
    result = {}
    for batch in batch_sizes:
        feeds = synthetic_feeds(signature, batch, shapes=shapes)
        for _ in range(2):
            runner.infer(feeds)
        samples: list[float] = []
        deadline = time.perf_counter() + PROFILE_MIN_SECONDS
        while len(samples) < PROFILE_MAX_RUNS and (len(samples) < 5 or time.perf_counter() < deadline):
            start = time.perf_counter()
            runner.infer(feeds)
            samples.append((time.perf_counter() - start) * 1000)
        result[batch] = round(statistics.median(samples), 4)
    return result


def synthetic_feeds(
    signature: Signature, batch: int, *, shapes: Sequence[ShapeRange] = (), seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of ``batch`` rows (zeros for integer inputs, which are often indices);
    other dynamic dims at the opt of their ``shapes`` range (``opt_dims``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature.inputs:
        shape = opt_dims(spec, shapes)
        if signature.batchable:
            shape[0] = batch
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _choose(candidates: list[_Candidate], requested: Precision) -> tuple[_Candidate, str]:
    accepted = [c for c in candidates if c.accepted]
    if requested != Precision.AUTO:
        candidate = candidates[0]
        if not candidate.accepted:
            raise AccuracyRejected(
                f"the {candidate.precision} engine is outside tolerance: " + "; ".join(candidate.rejection),
                details={
                    "accuracy": candidate.report.get("accuracy"),
                    "tolerance": candidate.report.get("tolerance"),
                },
            )
        return candidate, f"{requested} was requested"
    # auto: FP32 is always accepted, so there is a choice. Rank by the geometric
    # mean of per-batch-size latency relative to FP32, so batch 1 and max both count.
    fp32 = next(c for c in candidates if c.precision == Precision.FP32)

    def relative_cost(c: _Candidate) -> float:
        ratios = [c.latency_ms[b] / max(fp32.latency_ms[b], 1e-9) for b in fp32.latency_ms]
        return float(np.exp(np.mean(np.log(ratios)))) if ratios else 1.0

    best = min(accepted, key=relative_cost)
    rejected = [
        f"{c.precision} (outside tolerance: {'; '.join(c.rejection)})" for c in candidates if not c.accepted
    ]
    reason = (
        f"{best.precision} is the fastest candidate within tolerance "
        f"({relative_cost(best):.2f}x FP32's latency, geometric mean over batch sizes "
        f"{', '.join(str(b) for b in fp32.latency_ms)})"
    )
    if rejected:
        reason += "; rejected: " + ", ".join(rejected)
    return best, reason


def _candidate_summary(candidate: _Candidate) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "precision": str(candidate.precision),
        "accepted": candidate.accepted,
        "latency_ms": {str(k): v for k, v in candidate.latency_ms.items()},
        "artifact_bytes": candidate.artifact_path.stat().st_size
        if candidate.artifact_path.exists()
        else None,
    }
    if candidate.rejection:
        summary["rejection"] = candidate.rejection
    return summary
