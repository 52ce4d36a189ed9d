"""INT8 calibration, done once per build: prepare the model once, run the calibration
samples through it once, and derive every method's ranges from that one pass.

A build may quantize a model several times: the requested calibration method, then a
repair's other methods and its rounds with nodes kept in FP32. Node exclusions do not
change any tensor's range, and min-max, percentile and entropy ranges all come from
the same activations, so ``Int8Calibration`` holds what every such attempt shares:

- the prepared model (opset raised to 13 for per-channel weights, unnamed nodes named,
  ``quant_pre_process``), made on first use;
- one pass of the samples through the prepared model with every tensor the quantizer
  calibrates exposed as an output (in chunks of CALIBRATION_PASS_SAMPLES, so memory
  stays bounded), feeding a min/max tracker and the two histograms ONNX Runtime's
  entropy and percentile calibrators build, with their settings;
- each method's ranges, written as a calibration cache ``quantize_static`` reads.

``report()`` says how many passes ran (one) and how long each phase took.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.calibration import iter_batches
from engines.errors import BuildFailed
from engines.types import CalibrationMethod, Signature

PER_CHANNEL_MIN_OPSET = 13
"""DequantizeLinear has an ``axis`` (per-channel scales) from opset 13 on. Below it, ORT
quantizes per-channel without complaint and the result fails to load."""

CALIBRATION_PASS_SAMPLES = 32
"""Samples per chunk of the calibration pass: the histograms bin each chunk's
activations before the next runs, so chunks bound memory. A model with a dynamic batch
axis runs each chunk as one batch; others run it one sample at a time."""

HISTOGRAMS: dict[CalibrationMethod, dict[str, Any]] = {
    # ONNX Runtime's create_calibrator defaults for each method.
    CalibrationMethod.ENTROPY: {
        "method": "entropy",
        "symmetric": False,
        "num_bins": 128,
        "num_quantized_bins": 128,
        "percentile": 99.999,
        "scenario": "same",
    },
    CalibrationMethod.PERCENTILE: {
        "method": "percentile",
        "symmetric": True,
        "num_bins": 2048,
        "num_quantized_bins": 2048,
        "percentile": 99.999,
        "scenario": "same",
    },
}


class Int8Calibration:
    """The calibration of one model on one set of samples (module doc). Not thread-safe;
    its files live in ``workdir``, which the caller removes."""

    def __init__(
        self,
        model_path: Path,
        samples: Mapping[str, np.ndarray],
        signature: Signature | None,
        workdir: Path,
        *,
        per_channel: bool = True,
        op_types: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul"),
    ) -> None:
        # Absolute: ORT's tools run with the working directory moved (_scratch_in).
        self.model_path = model_path.absolute()
        self.samples = samples
        self.signature = signature
        self.workdir = workdir.absolute()
        self.per_channel = per_channel
        self.op_types = op_types
        self.passes = 0
        self.timings: dict[str, float] = {}
        self._prepared: Path | None = None
        self._pre_process = ""
        self._ranges: dict[CalibrationMethod, tuple[Path, list[str]]] = {}
        self._collected: dict[str, Any] | None = None

    def prepared(self) -> Path:
        """The model ready for the quantizer (made on first use)."""
        if self._prepared is None:
            from engines.precision import _load, _name_nodes, _opset, _save, _scratch_in

            started = time.perf_counter()
            self.workdir.mkdir(parents=True, exist_ok=True)
            model = _load(self.model_path, "int8")
            source = self.model_path
            if self.per_channel and _opset(model) < PER_CHANNEL_MIN_OPSET:
                source = self.workdir / "upgraded.onnx"
                model = _upgrade_opset(model, PER_CHANNEL_MIN_OPSET)
                _name_nodes(model.graph)
                _save(model, source, "int8")
            elif _name_nodes(model.graph):
                source = self.workdir / "named.onnx"
                _save(model, source, "int8")
            del model  # the pre-processing reads from disk
            prepared = self.workdir / "prepared.onnx"
            with _scratch_in(self.workdir):
                self._pre_process = _pre_process(source, prepared)
            self._prepared = prepared
            self.timings["pre_process"] = time.perf_counter() - started
        return self._prepared

    def ranges(self, method: CalibrationMethod) -> tuple[Path, list[str]]:
        """``method``'s ranges as a calibration cache file, and the tensors left out
        because their range is not finite (an attention mask's -inf)."""
        method = CalibrationMethod(method)
        if method not in self._ranges:
            collected = self._collect()
            started = time.perf_counter()
            try:
                self._ranges[method] = self._derive(method, collected)
            except Exception as exc:  # the histogram maths can fail on odd activations
                from engines.precision import _short

                raise BuildFailed(f"int8: calibration ({method}) failed: {_short(exc)}") from exc
            self.timings[f"ranges_{method}"] = time.perf_counter() - started
        return self._ranges[method]

    def report(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "pre_process": self._pre_process,
            "methods_derived": sorted(str(method) for method in self._ranges),
            "timings_s": {name: round(seconds, 4) for name, seconds in self.timings.items()},
        }

    def _collect(self) -> dict[str, Any]:
        """The one pass: min/max and both histograms of every calibrated tensor."""
        if self._collected is not None:
            return self._collected
        from onnxruntime.quantization.calibrate import HistogramCollector

        from engines.precision import _quiet_logger, _scratch_in, _short

        prepared = self.prepared()
        started = time.perf_counter()
        histograms = {
            CalibrationMethod.ENTROPY: HistogramCollector(**HISTOGRAMS[CalibrationMethod.ENTROPY]),
            CalibrationMethod.PERCENTILE: _absolute_histogram(**HISTOGRAMS[CalibrationMethod.PERCENTILE]),
        }
        try:
            with _scratch_in(self.workdir), _quiet_logger("root"):
                session, tensors = self._session(prepared)
                batch = _calibration_batch_size(onnx.load(prepared, load_external_data=False))
                names = [output.name for output in session.get_outputs()]
                inputs = {value.name for value in session.get_inputs()}
                for chunk in iter_batches(self.samples, CALIBRATION_PASS_SAMPLES):
                    activations: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
                    for feeds in iter_batches(chunk, batch, self.signature):
                        contiguous = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
                        for name, value in zip(names, session.run(None, contiguous), strict=True):
                            if name in activations:
                                # A graph input returned as an output may share its
                                # buffer (onnxruntime#21922): keep a copy of those.
                                activations[name].append(value.copy() if name in inputs else value)
                    # ORT's collectors print progress to stdout; keep the build's output clean.
                    with contextlib.redirect_stdout(io.StringIO()):
                        for histogram in histograms.values():
                            histogram.collect(activations)
                    del activations
        except BuildFailed:
            raise
        except Exception as exc:  # calibration runs the model: any runtime error can come out
            raise BuildFailed(f"int8: calibration failed: {_short(exc)}") from exc
        self.passes += 1
        self.timings["collect"] = time.perf_counter() - started
        self._collected = {"histograms": histograms}
        return self._collected

    def _session(self, prepared: Path) -> tuple[Any, set[str]]:
        """An ONNX Runtime session of the prepared model with the calibrated tensors as
        outputs (ORT's own augmentation), and those tensors' names."""
        from onnxruntime.quantization.calibrate import HistogramCalibrater

        calibrator = HistogramCalibrater(
            prepared, self.op_types, augmented_model_path=str(self.workdir / "augmented.onnx")
        )
        calibrator.augment_graph()
        calibrator.create_inference_session()
        return calibrator.infer_session, set(calibrator.tensors_to_calibrate or ())

    def _derive(self, method: CalibrationMethod, collected: dict[str, Any]) -> tuple[Path, list[str]]:
        from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod
        from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

        if method == CalibrationMethod.MINMAX:
            # The entropy histograms track each tensor's min and max over the pass.
            entropy = collected["histograms"][CalibrationMethod.ENTROPY].histogram_dict
            data = {
                name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                for name, (_, _, low, high, _) in entropy.items()
            }
            ranges = TensorsData(OrtMethod.MinMax, data)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                result = collected["histograms"][method].compute_collection_result()
            ort_method = OrtMethod.Entropy if method == CalibrationMethod.ENTROPY else OrtMethod.Percentile
            ranges = TensorsData(ort_method, result)
        unusable = sorted(name for name in ranges if not _finite_range(ranges[name].range_value))
        for name in unusable:
            del ranges.data[name]
        path = self.workdir / f"ranges-{method}.json"
        save_tensors_data(ranges, path)
        return path, unusable


def _absolute_histogram(**settings: Any) -> Any:
    """ONNX Runtime's percentile collector, binning every chunk after the first with
    numpy's fast path for uniform bins. ORT passes the grown edges as an array, which
    numpy bins by binary search: about ten times slower on a detector's activations,
    for the same uniform edges."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    class AbsoluteHistogram(HistogramCollector):
        def collect_absolute_value(self, name_to_arr: dict[str, list[np.ndarray]]) -> None:
            for tensor, arrays in name_to_arr.items():
                values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0, np.float32)
                low = np.nanmin(values) if values.size else np.array(0, values.dtype)
                high = np.nanmax(values) if values.size else np.array(0, values.dtype)
                values = np.absolute(values)
                if tensor not in self.histogram_dict:
                    hist, edges = np.histogram(values, bins=self.num_bins)
                    self.histogram_dict[tensor] = (hist, edges.astype(values.dtype), low, high)
                    continue
                old_hist, edges, old_low, old_high = self.histogram_dict[tensor]
                width = edges[1] - edges[0]
                top = np.nanmax(values) if values.size else edges[-1]
                if top > edges[-1]:  # grow by whole bins of the same width, as ORT does
                    edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width)))
                hist, _ = np.histogram(values, bins=len(edges) - 1, range=(float(edges[0]), float(edges[-1])))
                hist[: len(old_hist)] += old_hist
                self.histogram_dict[tensor] = (
                    hist,
                    edges.astype(values.dtype),
                    min(old_low, low),
                    max(old_high, high),
                )

    return AbsoluteHistogram(**settings)


def _calibration_batch_size(model: onnx.ModelProto) -> int:
    """Batch calibration runs only along a real batch axis: every input and output with a
    dynamic first dim. Otherwise feed one sample at a time, which keeps a fixed leading
    dim of 1 (see engines.calibration for the sample layout)."""
    initializers = {init.name for init in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    values += list(model.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return 1
    return CALIBRATION_PASS_SAMPLES


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    from engines.precision import _opset, _short

    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises RuntimeError and C++ errors
        raise BuildFailed(
            f"int8: per-channel quantization needs opset {target}, and upgrading the model "
            f"from opset {_opset(model)} failed: {_short(exc)}"
        ) from exc
    # The converter leaves shapes of the old opset behind; quant_pre_process re-infers them.
    del upgraded.graph.value_info[:]
    return upgraded


def _pre_process(source: Path, prepared: Path) -> str:
    """Shape inference and basic graph optimization before quantization (ORT's advice).

    Symbolic shape inference fails on some real graphs (and needs sympy); ONNX shape
    inference alone is then enough for what the quantizer needs to know.
    """
    import logging

    from onnxruntime.quantization.shape_inference import quant_pre_process

    from engines.precision import _short

    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        return "symbolic shape inference"
    except Exception as first:
        logging.getLogger(__name__).info(
            "int8: symbolic shape inference failed (%s); retrying without it", first
        )
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:
            raise BuildFailed(
                f"int8: preparing the model for quantization failed: {_short(exc)} "
                f"(after symbolic shape inference failed: {_short(first)})"
            ) from exc
        return f"onnx shape inference only (symbolic shape inference failed: {_short(first)})"


def _finite_range(range_value: Any) -> bool:
    low, high = (np.asarray(bound, dtype=np.float64) for bound in range_value)
    return bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(high - low < 1e30))
