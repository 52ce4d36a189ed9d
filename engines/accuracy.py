"""The accuracy gate: compare a reduced-precision engine with the FP32 model.

``compare`` runs the reference and the candidate on the same validation samples at
each batch size the batcher will form, and measures every output with
``engines.comparison`` under the output's rule (``engines.output_rules``: top-1 over
the class axis for class scores, cosine and error bounds otherwise, exact match for
integer outputs). ``check`` turns the measurements and a tolerance into the list of
violated rules. A tolerance maps metric names to thresholds; ``parse_tolerance`` reads
a user's JSON over the defaults. The metrics are defined in ``engines.comparison``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engines.backends.base import Runner
from engines.calibration import iter_batches, sample_count
from engines.comparison import HIGHER_IS_BETTER, METRICS, OutputComparison, violations
from engines.output_rules import OutputRule, rules_for
from engines.types import Precision

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
    rules: Mapping[str, OutputRule] | None = None,
    reference_cache: dict[tuple[int, int], dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Run both engines on ``samples`` at each batch size and measure every output.

    Samples are fed in consecutive chunks of the batch size (the last one partial), as
    the batcher would form them. Engines that are not batchable are fed one sample at a
    time, so their comparison has the single batch size 1. ``rules`` says how each
    output is judged (``engines.output_rules.rules_for``; by default from the signature
    alone). ``reference_cache``, kept by the caller across comparisons on the same
    samples (a repair's rebuilds), holds the reference's outputs so that it runs once
    per chunk. Returns a JSON-serialisable dict::

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
    rules = {**rules_for(reference.signature), **(rules or {})}

    results = []
    for size in sizes:
        stats = {name: OutputComparison(rules[name]) for name in output_names}
        for index, feeds in enumerate(iter_batches(samples, size, reference.signature)):
            if reference_cache is None:
                expected = reference.infer(feeds)
            elif (size, index) in reference_cache:
                expected = reference_cache[(size, index)]
            else:
                # Copies: a runner may hand out views of buffers it reuses.
                expected = {name: np.array(value) for name, value in reference.infer(feeds).items()}
                reference_cache[(size, index)] = expected
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

    Each violation names the output, the batch size, the metric, its value and the
    threshold: "output 'probs' at batch 8: top1_agreement 0.93 < 0.99 (...)". Raises
    ``ValueError`` for an unknown metric in ``tolerance``.
    """
    unknown = sorted(set(tolerance) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown tolerance metric(s) {unknown}; known: {', '.join(METRICS)}")
    broken = []
    for result in comparison["results"]:
        for output, metrics in result["outputs"].items():
            broken += violations(metrics, tolerance, f"output '{output}' at batch {result['batch_size']}")
    return broken
