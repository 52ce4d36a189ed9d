"""INT8 calibration once per build: one pass over the samples gives every method's
ranges, the same as ONNX Runtime's own calibrator for that method computes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from engines.calibration import iter_batches
from engines.int8_calibration import CALIBRATION_PASS_SAMPLES, Int8Calibration
from engines.types import CalibrationMethod
from tests.precision_models import CNN_INPUT, small_cnn

ORT_SETTINGS = {
    CalibrationMethod.MINMAX: ("MinMax", {}),
    CalibrationMethod.ENTROPY: ("Entropy", {}),
    CalibrationMethod.PERCENTILE: ("Percentile", {"symmetric": True}),
}


def _bound(value: object) -> float:
    value = value["data"] if isinstance(value, dict) else value  # type: ignore[index]
    return float(np.asarray(value).ravel()[0])


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_one_pass_gives_each_method_the_ranges_of_its_own_calibrator(
    method: CalibrationMethod, tmp_path: Path
) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    model = small_cnn(tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    # Three chunks, so the histograms merge across chunks as ORT's do.
    samples = {CNN_INPUT: rng.random((2 * CALIBRATION_PASS_SAMPLES + 8, 1, 8, 8)).astype(np.float32)}
    calibration = Int8Calibration(model, samples, None, tmp_path / "calibration")
    path, unusable = calibration.ranges(method)
    ours = json.loads(path.read_text())["data"]

    name, extra = ORT_SETTINGS[method]
    theirs = create_calibrator(
        calibration.prepared(),
        list(calibration.op_types),
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=OrtMethod[name],
        extra_options=extra,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        for chunk in iter_batches(samples, CALIBRATION_PASS_SAMPLES):
            theirs.collect_data(_Reader(chunk))
        expected = theirs.compute_data()
    assert unusable == [] and set(ours) == set(expected.data)
    for tensor, data in expected.data.items():
        low, high = (float(np.asarray(bound).ravel()[0]) for bound in data.range_value)
        assert _bound(ours[tensor]["lowest"]) == pytest.approx(low, rel=1e-6), tensor
        assert _bound(ours[tensor]["highest"]) == pytest.approx(high, rel=1e-6), tensor


def test_every_method_comes_from_a_single_pass(tmp_path: Path) -> None:
    model = small_cnn(tmp_path / "cnn.onnx")
    samples = {CNN_INPUT: np.random.default_rng(1).random((40, 1, 8, 8)).astype(np.float32)}
    calibration = Int8Calibration(model, samples, None, tmp_path / "calibration")
    for method in CalibrationMethod:
        calibration.ranges(method)
    report = calibration.report()
    assert report["passes"] == 1
    assert report["methods_derived"] == ["entropy", "minmax", "percentile"]
    assert {"pre_process", "collect", "ranges_minmax", "ranges_entropy"} <= set(report["timings_s"])


class _Reader:
    def __init__(self, chunk: dict[str, np.ndarray]) -> None:
        self._batches = iter([{k: np.ascontiguousarray(v) for k, v in chunk.items()}])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)
