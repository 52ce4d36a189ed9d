"""Models built to fail reduced precision, for the repair tests and benchmark.

Each is a scikit-learn MLP (64-64-64 on the bundled digits, trained briefly) exported
by skl2onnx, then edited in a way FP32 does not notice and FP16 or INT8 does:

- ``fp16_overflow_mlp``: the second hidden layer's weights and bias are scaled up by
  OVERFLOW_SCALE and the next layer's weights down by the same factor. ReLU commutes
  with a positive scale, so the FP32 outputs are unchanged, but the second layer's
  activations exceed float16's 65504 and become inf.
- ``int8_outlier_mlp``: the OUTLIER_UNITS most active units of the second hidden layer
  are scaled up by OUTLIER_SCALE (the next layer's weights for them down): a few outlier
  channels that stretch that layer's per-tensor activation range until the other
  units round to zero in int8.
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tests.precision_models import digits_data

INPUT = "X"
PROBABILITIES = "probabilities"
OVERFLOW_SCALE = 1e6
OUTLIER_SCALE = 300.0
OUTLIER_UNITS = 3

# skl2onnx names the second hidden layer's nodes like this (MatMul, Add, Relu per layer).
SECOND_LAYER = ("MatMul1", "Add1", "Relu1")
THIRD_LAYER_MATMUL = "MatMul2"


def _trained() -> Any:
    """A fresh copy of the trained classifier (trained once per process)."""
    return copy.deepcopy(_train())


@functools.cache
def _train() -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, _, y_train, _ = digits_data()
    classifier = MLPClassifier(hidden_layer_sizes=(64, 64, 64), max_iter=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train[:600], y_train[:600])
    return classifier


def _export(classifier: Any, path: Path) -> Path:
    from skl2onnx import to_onnx

    x_train = digits_data()[0]
    model = to_onnx(classifier, x_train[:1], options={id(classifier): {"zipmap": False}}, target_opset=17)
    onnx.save(model, str(path))
    return path


def fp16_overflow_mlp(directory: Path) -> Path:
    path = directory / "fp16_overflow_mlp.onnx"
    if not path.exists():
        classifier = _trained()
        classifier.coefs_[1] *= OVERFLOW_SCALE
        classifier.intercepts_[1] *= OVERFLOW_SCALE
        classifier.coefs_[2] /= OVERFLOW_SCALE
        _export(classifier, path)
    return path


def int8_outlier_mlp(directory: Path) -> Path:
    path = directory / "int8_outlier_mlp.onnx"
    if not path.exists():
        classifier = _trained()
        x_train = digits_data()[0]
        hidden = np.maximum(x_train @ classifier.coefs_[0] + classifier.intercepts_[0], 0)
        second = np.maximum(hidden @ classifier.coefs_[1] + classifier.intercepts_[1], 0)
        units = np.argsort(second.mean(axis=0))[-OUTLIER_UNITS:]
        classifier.coefs_[1][:, units] *= OUTLIER_SCALE
        classifier.intercepts_[1][units] *= OUTLIER_SCALE
        classifier.coefs_[2][units, :] /= OUTLIER_SCALE
        _export(classifier, path)
    return path


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Calibration (train) and validation (test) pixels for these models."""
    x_train, x_test, _, _ = digits_data()
    return x_train[:200], x_test[:100]
