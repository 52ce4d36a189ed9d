"""The accuracy gate: compare a reduced-precision engine with the FP32 model.

``compare`` runs the reference and the candidate on the same validation samples at
each batch size the batcher will form, and measures every output. ``check`` turns the
measurements and a tolerance into the list of violated rules. A tolerance maps metric
names to thresholds; ``parse_tolerance`` reads a user's JSON over the defaults.

Metrics, per output and batch size (a "sample" is one row along the batch axis, or a
whole output for engines served unbatched):

- ``cosine_similarity``: the mean over samples of the cosine similarity between the
  candidate's and the reference's flattened sample (1.0 when both are all zeros, 0.0
  when only one is). Must be >= its threshold. The mean is the rule because a single
  odd sample should not sink an engine that is right everywhere else; the minimum is
  reported beside it as ``cosine_similarity_min`` (information, not a rule).
- ``top1_agreement``: the fraction of argmaxes over the last axis that agree, for
  floating-point outputs of rank 2 or more whose last axis has more than one element:
  one per row of a [batch, classes] output, one per position of a [batch, seq, vocab]
  output (only when the model declares that last axis fixed: a vocabulary or class
  axis, not one that grows with the input, like a detector's anchors). A flip between
  two values that the reference puts within TOP1_TIE of that row's range counts as
  agreement: it is a near-tie, not a changed decision. Must be >= its threshold.
- ``exact_match``: the fraction of samples that are identical, for integer and bool
  outputs (class labels, indices). Must be >= its threshold.
- ``max_abs_error``: the largest |candidate - reference| over all elements. Must be
  <= its threshold.
- ``max_rel_error``: the largest |candidate - reference| / max(|reference|, floor),
  where floor is REL_ERROR_FLOOR times the output's largest |reference| value, so
  elements near zero do not blow the ratio up. Must be <= its threshold.

A metric that does not apply to an output (top-1 on a regression output) is not
reported for it and its rule is skipped. Each output's summary names the metric that
decides for it (``decided_by``): top-1 where it applies, exact match for integer
outputs, cosine similarity otherwise; the gate applies every rule that applies.
Values where the candidate is NaN or inf while the reference is finite are counted as
``nonfinite`` and always violate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.calibration import iter_batches, sample_count
from engines.types import DYNAMIC, Precision

HIGHER_IS_BETTER = {
    "cosine_similarity": (-1.0, 1.0),
    "top1_agreement": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
}
"""Metrics whose value must be >= the threshold, with the thresholds' allowed range."""

LOWER_IS_BETTER = ("max_abs_error", "max_rel_error")
"""Metrics whose value must be <= the threshold (any threshold >= 0)."""

METRICS = (*HIGHER_IS_BETTER, *LOWER_IS_BETTER)

TOP1_TIE = 0.01
"""Argmax flips between values closer than this fraction of the row's range are ties."""

REL_ERROR_FLOOR = 1e-3
"""Relative errors are taken against at least this fraction of the output's largest
magnitude."""

_INT8_TOLERANCE = {"cosine_similarity": 0.99, "top1_agreement": 0.98, "exact_match": 0.98}

DEFAULT_TOLERANCE: dict[Precision, dict[str, float]] = {
    # TensorRT's FP32 engines may use TF32 math: close, not bit-exact.
    Precision.FP32: {"cosine_similarity": 0.9999, "top1_agreement": 0.999, "exact_match": 0.999},
    # FP16 keeps about 3 significant digits: outputs nearly collinear, argmax flips
    # only on near-ties.
    Precision.FP16: {"cosine_similarity": 0.999, "top1_agreement": 0.99, "exact_match": 0.99},
    # INT8 loses more, yet a calibrated classifier keeps its decisions.
    Precision.INT8: dict(_INT8_TOLERANCE),
    # auto judges every candidate by one tolerance: the loosest candidate's (int8).
    Precision.AUTO: dict(_INT8_TOLERANCE),
}
"""Thresholds used when the user gives none. Absolute and relative errors are not
checked by default: their scale depends on the model's outputs."""


def parse_tolerance(text: str | None, precision: Precision) -> dict[str, float]:
    """The tolerance for ``precision``: the user's JSON object merged over the defaults.

    ``text`` is a JSON object of metric name to number, e.g. ``{"top1_agreement": 0.97,
    "max_abs_error": 0.05}``; None or blank gives the defaults. Raises ``ValueError``
    with a message for the user on bad JSON, an unknown metric, a non-number or a
    threshold out of range.
    """
    merged = dict(DEFAULT_TOLERANCE[Precision(precision)])
    merged.update(parse_tolerance_overrides(text))
    return merged


def parse_tolerance_overrides(text: str | None) -> dict[str, float]:
    """Only the thresholds the user gave, validated as in ``parse_tolerance``.

    This is what belongs in ``BuildOptions.tolerance``: each candidate precision then
    merges it over its own defaults (``parse_tolerance(None, p) | overrides``).
    """
    if text is None or not text.strip():
        return {}
    example = '{"top1_agreement": 0.98, "max_abs_error": 0.05}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tolerance is not valid JSON ({exc.msg}); expected e.g. {example}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"tolerance must be a JSON object of metric to number, e.g. {example}")
    overrides: dict[str, float] = {}
    for name, value in data.items():
        if name not in METRICS:
            raise ValueError(f"unknown tolerance metric '{name}'; known metrics: {', '.join(METRICS)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"tolerance '{name}' must be a number, got {json.dumps(value)}")
        threshold = float(value)
        if not math.isfinite(threshold):
            raise ValueError(f"tolerance '{name}' must be a finite number")
        if name in HIGHER_IS_BETTER:
            low, high = HIGHER_IS_BETTER[name]
            if not low <= threshold <= high:
                raise ValueError(
                    f"tolerance '{name}' must be between {low:g} and {high:g}, got {threshold:g}"
                )
        elif threshold < 0:
            raise ValueError(f"tolerance '{name}' must be >= 0, got {threshold:g}")
        overrides[name] = threshold
    return overrides


def compare(
    reference: Runner,
    candidate: Runner,
    samples: Mapping[str, np.ndarray],
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """Run both engines on ``samples`` at each batch size and measure every output.

    Samples are fed in consecutive chunks of the batch size (the last one partial), as
    the batcher would form them. Engines that are not batchable are fed one sample at a
    time, so their comparison has the single batch size 1. Returns a JSON-serialisable
    dict::

        {"sample_count": 200, "batched": true, "batch_sizes": [1, 8],
         "results": [{"batch_size": 1, "outputs": {"probs": {"cosine_similarity": ...}}}]}

    Errors from the runners propagate (``InvalidInput`` and backend errors). Raises
    ``ValueError`` for a batch size outside 1..max_batch_size of either engine.
    """
    count = sample_count(samples)
    batched = reference.signature.batchable and candidate.signature.batchable
    sizes = sorted(set(batch_sizes)) if batched else [1]
    if not sizes:
        raise ValueError("compare needs at least one batch size")
    limit = min(reference.max_batch_size, candidate.max_batch_size)
    for size in sizes:
        if batched and not 1 <= size <= limit:
            raise ValueError(f"batch size {size} is outside the engines' range 1..{limit}")
    output_names = [spec.name for spec in reference.signature.outputs]
    # Top-1 over the last axis of a rank-3+ output only where that axis has a fixed size.
    class_axis = {
        spec.name: spec.rank <= 2 or (spec.shape[-1] != DYNAMIC) for spec in reference.signature.outputs
    }

    results = []
    for size in sizes:
        stats = {name: _OutputStats(top1_applies=class_axis[name]) for name in output_names}
        for feeds in iter_batches(samples, size, reference.signature):
            expected = reference.infer(feeds)
            got = candidate.infer(feeds)
            for name in output_names:
                stats[name].add(expected[name], got.get(name), batched=batched)
        results.append(
            {
                "batch_size": size,
                "outputs": {name: stats[name].summary() for name in output_names},
            }
        )
    return {"sample_count": count, "batched": batched, "batch_sizes": sizes, "results": results}


def check(comparison: Mapping[str, Any], tolerance: Mapping[str, float]) -> list[str]:
    """The rules ``comparison`` breaks under ``tolerance``, as sentences; empty = pass.

    Every applicable rule applies, the cosine rule beside top-1 too: a few validation
    samples can agree on top-1 by luck while the scores have drifted. Each violation
    names the output, the batch size, the metric, its value and the threshold:
    "output 'probs' at batch 8: top1_agreement 0.93 < 0.99". Raises ``ValueError`` for
    an unknown metric in ``tolerance``.
    """
    unknown = sorted(set(tolerance) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown tolerance metric(s) {unknown}; known: {', '.join(METRICS)}")
    violations = []
    for result in comparison["results"]:
        for output, metrics in result["outputs"].items():
            where = f"output '{output}' at batch {result['batch_size']}"
            if "error" in metrics:
                violations.append(f"{where}: {metrics['error']}")
                continue
            if metrics.get("nonfinite", 0):
                violations.append(
                    f"{where}: {metrics['nonfinite']} NaN or inf value(s) where the reference is finite"
                )
            for metric, threshold in tolerance.items():
                if metric not in metrics:
                    continue  # not applicable to this output
                value = metrics[metric]
                if value is None:
                    violations.append(f"{where}: {metric} is not a finite number")
                elif metric in HIGHER_IS_BETTER and value < threshold:
                    shown, limit = _distinct(value, threshold)
                    violations.append(f"{where}: {metric} {shown} < {limit}")
                elif metric in LOWER_IS_BETTER and value > threshold:
                    shown, limit = _distinct(value, threshold)
                    violations.append(f"{where}: {metric} {shown} > {limit}")
    return violations


@dataclass
class _OutputStats:
    """Running measurements of one output over the chunks of one batch size."""

    cosines: list[float] = field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0
    top1_rows: int = 0
    top1_agreeing: int = 0
    top1_rank: int = 0
    top1_applies: bool = True
    exact_samples: int = 0
    exact_matching: int = 0
    nonfinite: int = 0
    floating: bool = True
    error: str | None = None

    def add(self, expected: np.ndarray, got: np.ndarray | None, *, batched: bool) -> None:
        if self.error is not None:
            return
        if got is None:
            self.error = "the candidate did not return this output"
            return
        expected, got = np.asarray(expected), np.asarray(got)
        if expected.shape != got.shape:
            self.error = f"shape {list(got.shape)} differs from the reference's {list(expected.shape)}"
            return
        # One row per sample: along the batch axis, or the whole output when unbatched.
        rows = expected.shape[0] if batched and expected.ndim else 1
        reference = expected.reshape(rows, -1)
        candidate = got.reshape(rows, -1)
        self.floating = expected.dtype.kind in "fc"
        if not self.floating:
            equal = np.all(reference == candidate, axis=1)
            self.exact_samples += rows
            self.exact_matching += int(np.count_nonzero(equal))
            if reference.size:
                difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
                self.max_abs = max(self.max_abs, float(difference.max()))
            return
        self._add_floating(reference.astype(np.float64), candidate.astype(np.float64))
        if self.top1_applies and expected.ndim >= 2 and expected.shape[-1] > 1:
            self.top1_rank = expected.ndim
            self._add_top1(expected.reshape(-1, expected.shape[-1]), got.reshape(-1, got.shape[-1]))

    def _add_top1(self, expected: np.ndarray, got: np.ndarray) -> None:
        expected = np.nan_to_num(expected.astype(np.float64))
        chosen = np.argmax(got, axis=1)
        best = expected.max(axis=1)
        spread = best - expected.min(axis=1)
        # The reference's own value at the candidate's choice: close to its best = a tie.
        at_choice = np.take_along_axis(expected, chosen[:, np.newaxis], axis=1)[:, 0]
        agree = (np.argmax(expected, axis=1) == chosen) | (best - at_choice <= TOP1_TIE * spread)
        self.top1_rows += expected.shape[0]
        self.top1_agreeing += int(np.count_nonzero(agree))

    def _add_floating(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference_finite = np.isfinite(reference)
        valid = reference_finite & np.isfinite(candidate)
        self.nonfinite += int(np.count_nonzero(reference_finite & ~valid))
        reference = np.where(valid, reference, 0.0)
        candidate = np.where(valid, candidate, 0.0)
        if reference.size == 0:
            return

        difference = np.abs(candidate - reference)
        magnitude = np.abs(reference)
        floor = max(REL_ERROR_FLOOR * float(magnitude.max()), np.finfo(np.float64).tiny)
        self.max_abs = max(self.max_abs, float(difference.max()))
        self.max_rel = max(self.max_rel, float((difference / np.maximum(magnitude, floor)).max()))

        dot = np.sum(reference * candidate, axis=1)
        norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
        both_zero = ~reference.any(axis=1) & ~candidate.any(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
        cosine = np.where(both_zero, 1.0, np.clip(cosine, -1.0, 1.0))
        self.cosines.extend(float(c) for c in cosine)

    def summary(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        if not self.floating:
            return {
                "exact_match": _ratio(self.exact_matching, self.exact_samples),
                "max_abs_error": _finite(self.max_abs),
                "samples": self.exact_samples,
                "decided_by": "exact_match",
            }
        summary: dict[str, Any] = {
            "cosine_similarity": _finite(float(np.mean(self.cosines))) if self.cosines else 1.0,
            "cosine_similarity_min": _finite(min(self.cosines)) if self.cosines else 1.0,
            "max_abs_error": _finite(self.max_abs),
            "max_rel_error": _finite(self.max_rel),
            "nonfinite": self.nonfinite,
            "samples": len(self.cosines),
        }
        summary["decided_by"] = "cosine_similarity"
        if self.top1_rows:
            summary["top1_agreement"] = _ratio(self.top1_agreeing, self.top1_rows)
            summary["decided_by"] = (
                "top1_agreement (per row)"
                if self.top1_rank == 2
                else "top1_agreement (per position over the last axis)"
            )
        return summary


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def _finite(value: float) -> float | None:
    """JSON has no NaN or inf: such a value becomes null (and fails any rule)."""
    return value if math.isfinite(value) else None


def _distinct(value: float, threshold: float) -> tuple[str, str]:
    """Format both numbers with just enough digits that they read differently."""
    for digits in range(4, 17):
        shown, limit = f"{value:.{digits}g}", f"{threshold:.{digits}g}"
        if shown != limit:
            return shown, limit
    return repr(value), repr(threshold)
