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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engines import shapes
from engines.backends import backend_class
from engines.backends.base import Backend, ProgressCallback, Runner, no_progress
from engines.errors import AccuracyRejected, CalibrationError, EngineError, InvalidInput, InvalidModel
from engines.onnx_model import load_model, read_signature
from engines.output_rules import OutputRule
from engines.store import EngineStore
from engines.types import BuildOptions, CalibrationMethod, Precision, Signature

if TYPE_CHECKING:
    from engines.int8_calibration import Int8Calibration

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
    # In a cluster: the replica's own temp directory, and the catalog (not meta.json)
    # is the commit point, so that a builder that lost its lease commits nothing.
    temp_owner: str | None = None
    write_commit_point: bool = True


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


def _symmetric_activations(backend: Backend) -> bool:
    """Asymmetric activations let ONNX Runtime keep Conv+Relu chains in int8;
    TensorRT only takes symmetric (zero-point 0) quantization."""
    return backend.name == "tensorrt"


def run_build(job: BuildJob, progress: ProgressCallback = no_progress) -> dict[str, Any]:
    """Build, check and commit one engine. Returns its metadata (see ``EngineStore``).

    Raises ``EngineError`` subclasses with user-facing messages. Blocking: call it
    in a child process or a worker thread, never on an event loop.
    """
    store = EngineStore(Path(job.store_root), temp_owner=job.temp_owner)
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
        names = shapes.dim_names(model)
        from engines.output_rules import check_metrics, rules_for
        from engines.precision import already_quantized

        quantized_ops = already_quantized(model)
        try:
            check_metrics(dict(options.metrics), signature)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        output_rules = rules_for(signature, model, dict(options.metrics))
        del model
    batch_sizes = job.batch_sizes if signature.batchable else (1,)

    workdir = Path(tempfile.mkdtemp(dir=store.temp_dir, prefix="build-"))
    try:
        with phase_timer("precision"):
            plan = _precision_plan(options, signature, store, model_path, names, batch_sizes, quantized_ops)
            if plan.calibration is not None and Precision.INT8 in plan.precisions:
                from engines.int8_calibration import Int8Calibration

                # One calibration pass per build, shared by every INT8 attempt.
                plan.int8 = Int8Calibration(
                    model_path, plan.calibration, signature, workdir / "int8-calibration"
                )
            candidates, dropped = _transform(
                plan,
                model_path,
                workdir,
                progress,
                auto=options.precision == Precision.AUTO,
                symmetric_activations=_symmetric_activations(backend),
                method=options.calibration_method,
                signature=signature,
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
            _check_accuracy(
                candidates,
                _AccuracySetup(
                    backend,
                    signature,
                    options,
                    model_path,
                    plan,
                    batch_sizes,
                    workdir,
                    timing_cache,
                    lambda fraction: progress("accuracy", fraction),
                    output_rules,
                ),
            )
        with phase_timer("profile"):
            for candidate in candidates:
                if not candidate.accepted or plan.synthetic_rejected:
                    continue  # not served, or no inputs the model is known to accept
                runner = backend.load(candidate.artifact_path, signature, options)
                try:
                    candidate.latency_ms = profile_latency(runner, signature, batch_sizes, plan.shapes)
                finally:
                    runner.close()
                if "repair" in candidate.report:
                    from engines.repair import add_latency_costs

                    add_latency_costs(candidate.report["repair"], candidate.latency_ms)
        try:
            chosen, choice_reason = _choose(candidates, options.precision)
        except AccuracyRejected as exc:
            # How long the failure took, and that calibration ran once, with the numbers.
            timings["total"] = time.perf_counter() - started
            exc.details["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            if plan.int8 is not None:
                exc.details["calibration"] = plan.int8.report()
            raise
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
                    "choice": plan.fallback or choice_reason,
                    **({"fallback": plan.fallback} if plan.fallback else {}),
                    "calibration": {
                        **plan.calibration_report,
                        **(plan.int8.report() if plan.int8 is not None else {}),
                    },
                    "validation": plan.validation_report,
                    "shapes": shapes.report(plan.shapes),
                    "skipped": _skipped_phases(plan),
                    **({"note": plan.note} if plan.note else {}),
                    "candidates": [_candidate_summary(c) for c in candidates] + dropped,
                    **chosen.report,
                    "latency_ms": {str(k): v for k, v in chosen.latency_ms.items()},
                    "artifact_bytes": chosen.artifact_path.stat().st_size,
                },
            }
            timings["total"] = time.perf_counter() - started
            meta["report"]["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            committed = store.commit_engine(
                job.cache_key,
                chosen.artifact_path,
                backend.artifact_suffix,
                meta,
                write_commit_point=job.write_commit_point,
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
    shapes: dict[str, shapes.ResolvedShape]
    synthetic_rejected: str | None = None
    """Why the model refused kiln's synthetic inputs (None when it took them)."""
    note: str | None = None
    int8: Int8Calibration | None = None
    """The build's INT8 calibration (prepared once, one pass over the samples)."""
    fallback: str | None = None
    """Why the engine is not the requested precision, when it is not."""


def _skipped_phases(plan: _PrecisionPlan) -> dict[str, str]:
    if not plan.synthetic_rejected:
        return {}
    reason = (
        f"the model rejected kiln's synthetic inputs ({plan.synthetic_rejected}); "
        f"to enable it, {shapes.HOW_TO_GIVE_SHAPES}"
    )
    return {"profile": reason, "warmup": reason}


def _precision_plan(
    options: BuildOptions,
    signature: Signature,
    store: EngineStore,
    model_path: Path,
    names: dict[str, tuple[str | None, ...]],
    batch_sizes: tuple[int, ...],
    quantized_ops: list[str],
) -> _PrecisionPlan:
    """Which precisions to build, the calibration and validation samples for them, and
    the shapes of dynamic dims (from that data first, see ``engines.shapes``)."""
    from engines import calibration as calib

    requested = options.precision
    calibration = validation = None
    calibration_report: dict[str, Any] = {}
    validation_report: dict[str, Any] = {}
    if requested != Precision.FP32 and options.calibration_sha256:
        calibration = calib.load_samples(store.data_path(options.calibration_sha256), signature)
        calibration_report = {
            "source": "uploaded",
            "sha256": options.calibration_sha256,
            "method": str(options.calibration_method),
        }
    if requested != Precision.FP32 and options.validation_sha256:
        validation = calib.load_samples(
            store.data_path(options.validation_sha256), signature, purpose="validation"
        )
        validation_report = {"source": "uploaded", "sha256": options.validation_sha256}
    resolved = shapes.resolve_shapes(
        signature,
        options.shapes,
        [data for data in (calibration, validation) if data is not None],
        names=names,
        batch=(1, options.opt_batch_size or max(1, max(batch_sizes) // 2), max(batch_sizes)),
    )
    rejected = _synthetic_rejected(model_path, signature, resolved)

    def plan(precisions: list[Precision], note: str | None = None) -> _PrecisionPlan:
        if calibration is not None:
            calibration_report["samples"] = calib.sample_count(calibration)
        if validation is not None:
            validation_report["samples"] = calib.sample_count(validation)
        return _PrecisionPlan(
            precisions,
            calibration,
            validation,
            calibration_report,
            validation_report,
            resolved,
            rejected,
            note,
        )

    if requested == Precision.FP32:
        return plan([Precision.FP32])
    if quantized_ops:
        quantized = plan(
            [Precision.FP32],
            f"the model is already quantized ({', '.join(quantized_ops)}): served as uploaded, "
            f"not converted to {requested}",
        )
        if requested == Precision.FP16:
            quantized.fallback = f"fp16 was requested; {quantized.note}"
        return quantized

    how = f"{shapes.HOW_TO_GIVE_SHAPES}"
    if calibration is None and options.synthetic_calibration:
        if rejected:
            raise CalibrationError(
                f"calibration=synthetic: the model rejects kiln's synthetic inputs ({rejected}); "
                "upload a 'calibration' .npz of real inputs instead"
            )
        calibration = calib.synthetic_samples(signature, SYNTHETIC_CALIBRATION_SAMPLES, resolved)
        calibration_report = {
            "source": "synthetic",
            "method": str(options.calibration_method),
            "warning": "INT8 scales come from random data, not from real inputs",
        }

    precisions: list[Precision]
    if requested == Precision.AUTO:
        precisions = [Precision.FP32, Precision.FP16]
        if calibration is not None:
            precisions.append(Precision.INT8)
        else:
            calibration_report = {"int8": "skipped: no calibration data was given"}
    else:
        precisions = [requested]
    if Precision.INT8 in precisions and calibration is None:
        raise CalibrationError(
            "int8 needs calibration data: upload a 'calibration' .npz with samples of each "
            "input, or pass calibration=synthetic to calibrate on random data"
        )

    if validation is None and calibration is not None and options.calibration_sha256:
        if calib.sample_count(calibration) >= 2:
            calibration, validation = calib.split_holdout(calibration)
            validation_report = {"source": "held out from the calibration data"}
        else:
            validation = calibration
            validation_report = {"source": "the calibration data (a single sample)"}
    if validation is None:
        if rejected:
            message = (
                f"checking the {requested} engine needs inputs the model accepts, and it rejects "
                f"kiln's synthetic ones ({rejected}): {how}"
            )
            if requested != Precision.AUTO:
                raise CalibrationError(message)
            # Nothing to check a candidate against: auto serves FP32.
            validation_report = {"source": "none", "note": f"reduced precision skipped: {message}"}
            return plan([Precision.FP32])
        try:
            validation = calib.synthetic_samples(signature, SYNTHETIC_VALIDATION_SAMPLES, resolved, seed=1)
        except CalibrationError as exc:
            if requested != Precision.AUTO:
                raise CalibrationError(
                    f"cannot make validation inputs for this model ({exc.message}); "
                    "upload a 'validation' .npz to check the reduced-precision engine"
                ) from exc
            validation_report = {"source": "none", "note": f"reduced precision skipped: {exc.message}"}
            return plan([Precision.FP32])
        validation_report = {"source": "synthetic"}
    return plan(precisions)


def _synthetic_rejected(model_path: Path, signature: Signature, resolved: dict[str, Any]) -> str | None:
    """Run the original model once on kiln's synthetic inputs at the ``opt`` shapes;
    return the model's complaint, or None when it took them."""
    from engines.backends.onnxruntime import OnnxRuntimeBackend

    try:
        feeds = shapes.synthetic_inputs(signature, resolved, 1)
    except ValueError as exc:
        return str(exc)
    runner = OnnxRuntimeBackend(intra_op_threads=1).load(model_path, signature, BuildOptions())
    try:
        runner.infer(feeds)
    except EngineError as exc:
        return exc.message
    finally:
        runner.close()
    return None


def _transform(
    plan: _PrecisionPlan,
    model_path: Path,
    workdir: Path,
    progress: ProgressCallback,
    *,
    auto: bool,
    symmetric_activations: bool,
    method: CalibrationMethod,
    signature: Signature,
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
                report["transform"] = _convert(
                    precision,
                    model_path,
                    onnx_path,
                    plan,
                    signature,
                    method=method,
                    symmetric_activations=symmetric_activations,
                )
        except EngineError as exc:
            if not auto or precision == Precision.FP32:
                raise
            dropped.append({"precision": str(precision), "accepted": False, "dropped": exc.message})
            continue
        if report.get("transform", {}).get("converted_nothing"):
            kept = ", ".join(report["transform"]["fp32_op_types"]) or "none"
            unchanged = (
                f"{precision} was requested, and the float16 conversion changed nothing: every op "
                f"stays FP32 (op types kept in FP32: {kept}), so the engine is FP32"
            )
            if auto:
                dropped.append({"precision": str(precision), "accepted": False, "dropped": unchanged})
                continue
            # The FP32 engine is what this request gives; say so instead of calling it fp16.
            plan.fallback = unchanged
            precision, onnx_path, report = Precision.FP32, model_path, {"transform": report["transform"]}
        candidates.append(_Candidate(precision, onnx_path, workdir / f"{precision}.engine", report=report))
        progress("precision", (index + 1) / len(plan.precisions))
    return candidates, dropped


def _convert(
    precision: Precision,
    model_path: Path,
    onnx_path: Path,
    plan: _PrecisionPlan,
    signature: Signature,
    *,
    method: CalibrationMethod | None,
    symmetric_activations: bool,
    keep_fp32: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Write the FP16 or INT8 transform of the model to ``onnx_path``, with the nodes in
    ``keep_fp32`` left in FP32; returns the transform's report."""
    from engines import precision as transforms
    from engines.calibration import iter_batches

    assert plan.validation is not None
    if precision == Precision.FP16:
        first = next(iter_batches(plan.validation, 1, signature))
        return transforms.convert_fp16(model_path, onnx_path, feeds=first, keep_fp32=keep_fp32)
    assert plan.calibration is not None and method is not None
    return transforms.quantize_int8(
        model_path,
        onnx_path,
        plan.calibration,
        method=method,
        symmetric_activations=symmetric_activations,
        exclude_nodes=keep_fp32,
        signature=signature,
        calibration=plan.int8,
    )


@dataclass(frozen=True)
class _AccuracySetup:
    """What the accuracy phase, and a repair within it, work with."""

    backend: Backend
    signature: Signature
    options: BuildOptions
    model_path: Path
    plan: _PrecisionPlan
    batch_sizes: tuple[int, ...]
    workdir: Path
    timing_cache: Path
    progress: Callable[[float], None]
    """The accuracy phase's progress while a repair runs (share of its time budget)."""
    rules: dict[str, OutputRule]
    """How each output is judged (``engines.output_rules``)."""


def _check_accuracy(candidates: list[_Candidate], setup: _AccuracySetup) -> None:
    backend, signature, options, plan = setup.backend, setup.signature, setup.options, setup.plan
    reference: Runner | None = None
    # The FP32 reference's outputs on the validation samples, computed once for every
    # candidate and repair rebuild.
    reference_outputs: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    try:
        for candidate in candidates:
            if candidate.precision == Precision.FP32:
                continue  # the reference itself
            from engines import accuracy

            if reference is None:
                from engines.backends.onnxruntime import OnnxRuntimeBackend

                reference = OnnxRuntimeBackend().load(setup.model_path, signature, options)
            assert plan.validation is not None
            tolerance = accuracy.parse_tolerance(None, candidate.precision)
            tolerance.update(dict(options.tolerance))

            def gate(
                artifact: Path, tolerance: dict[str, float] = tolerance, reference: Runner = reference
            ) -> tuple[dict[str, Any], list[str]]:
                assert plan.validation is not None
                runner = backend.load(artifact, signature, options)
                try:
                    comparison = accuracy.compare(
                        reference,
                        runner,
                        plan.validation,
                        list(setup.batch_sizes),
                        setup.rules,
                        reference_outputs,
                    )
                finally:
                    runner.close()
                return comparison, accuracy.check(comparison, tolerance)

            comparison, candidate.rejection = gate(candidate.artifact_path)
            candidate.report["accuracy"] = comparison
            candidate.report["tolerance"] = tolerance
            if candidate.rejection and options.repair:
                _repair(candidate, candidates, gate, setup)
            candidate.accepted = not candidate.rejection
    finally:
        if reference is not None:
            reference.close()


def _repair(
    candidate: _Candidate,
    candidates: list[_Candidate],
    gate: Callable[[Path], tuple[dict[str, Any], list[str]]],
    setup: _AccuracySetup,
) -> None:
    """Repair a candidate that failed the gate (see ``engines.repair``); on success it
    takes the repaired files and reports, and the repair report goes in either way."""
    from engines import repair

    backend, signature, options, plan = setup.backend, setup.signature, setup.options, setup.plan
    model_path = setup.model_path
    assert plan.validation is not None
    validation = plan.validation
    method = options.calibration_method if candidate.precision == Precision.INT8 else None

    def convert(onnx_path: Path, kept: frozenset[str], method: CalibrationMethod | None) -> dict[str, Any]:
        return _convert(
            candidate.precision,
            model_path,
            onnx_path,
            plan,
            signature,
            method=method,
            symmetric_activations=_symmetric_activations(backend),
            keep_fp32=kept,
        )

    def build(onnx_path: Path, artifact: Path) -> dict[str, Any]:
        return backend.build(onnx_path, signature, options, artifact, timing_cache_path=setup.timing_cache)

    def convert_dynamic(onnx_path: Path, kept: frozenset[str]) -> dict[str, Any]:
        from engines.calibration import iter_batches
        from engines.precision import quantize_int8_dynamic

        first = next(iter_batches(validation, 1, signature))
        return quantize_int8_dynamic(model_path, onnx_path, exclude_nodes=kept, feeds=first)

    def profile(artifact: Path) -> dict[int, float]:
        runner = backend.load(artifact, signature, options)
        try:
            return profile_latency(runner, signature, setup.batch_sizes, plan.shapes)
        finally:
            runner.close()

    def fp32_artifact() -> Path:
        fp32 = next((c for c in candidates if c.precision == Precision.FP32), None)
        if fp32 is not None:
            return fp32.artifact_path
        artifact = setup.workdir / "fp32-reference.engine"
        if not artifact.exists():
            build(model_path, artifact)
        return artifact

    failed = repair.Attempt(
        candidate.onnx_path,
        candidate.artifact_path,
        candidate.report.get("transform", {}),
        {},
        candidate.report["accuracy"],
        candidate.rejection,
        method,
    )
    budget = repair.Budget(
        options.repair_max_nodes or repair.default_node_budget(repair.weighted_node_count(model_path)),
        options.repair_seconds,
    )
    # Dynamic INT8 (MatMulInteger, DynamicQuantizeLinear) runs on ONNX Runtime only.
    dynamic = candidate.precision == Precision.INT8 and backend.name == "onnxruntime"
    tools = repair.RepairTools(
        convert,
        build,
        gate,
        None if plan.synthetic_rejected else profile,
        fp32_artifact,
        setup.progress,
        convert_dynamic if dynamic else None,
    )
    result, report = repair.repair(
        candidate.precision, model_path, validation, signature, failed, tools, budget, setup.workdir
    )
    candidate.report["repair"] = report
    if result.passed:
        candidate.onnx_path, candidate.artifact_path = result.onnx_path, result.artifact_path
        candidate.report.update(result.build)
        candidate.report["transform"] = result.transform
        candidate.report["accuracy"] = result.comparison
        candidate.rejection = []


def profile_latency(
    runner: Runner,
    signature: Signature,
    batch_sizes: tuple[int, ...],
    resolved: dict[str, shapes.ResolvedShape] | None = None,
) -> dict[int, float]:
    """Median milliseconds per run at each batch size, on synthetic inputs at the
    ``opt`` shapes."""
    result = {}
    for batch in batch_sizes:
        feeds = shapes.synthetic_inputs(signature, resolved, batch)
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


def warm_up(
    runner: Runner,
    signature: Signature,
    batch_sizes: set[int],
    resolved: dict[str, shapes.ResolvedShape] | None = None,
) -> str | None:
    """Run a freshly loaded engine once per batch size on synthetic inputs at the
    ``opt`` shapes (``resolved``; None: the graph's and the defaults). Returns why it
    stopped when the model rejects those inputs, else None: a warm-up never fails a load."""
    try:
        for batch in sorted(batch_sizes):
            runner.infer(shapes.synthetic_inputs(signature, resolved, batch))
    except InvalidInput as exc:
        return f"the model rejected kiln's synthetic inputs ({exc.message})"
    return None


def warm_up_engine(runner: Runner, meta: dict[str, Any], batch_sizes: set[int]) -> str | None:
    """``warm_up`` for a built engine, at the shapes its build resolved; skipped (with
    the build's reason) when the build found that the model rejects synthetic inputs."""
    report = meta.get("report", {})
    skipped = report.get("skipped", {}).get("warmup")
    if skipped:
        return str(skipped)
    resolved = {
        name: shapes.ResolvedShape(tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]), s["source"])
        for name, s in report.get("shapes", {}).items()
    }
    return warm_up(runner, Signature.from_dict(meta["signature"]), batch_sizes, resolved or None)


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
                    **({"repair": candidate.report["repair"]} if "repair" in candidate.report else {}),
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
    if "repair" in candidate.report:
        repair = candidate.report["repair"]
        summary["repaired"] = repair["passed"]
        summary["kept_fp32"] = [node["name"] for node in repair["kept_fp32"]]
        if "chosen" in repair:
            summary["chosen"] = repair["chosen"]
    return summary
