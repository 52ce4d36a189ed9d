"""One output of a candidate engine against the FP32 reference: the numbers and a verdict.

``OutputComparison`` accumulates the measurements of one output over several runs
(the gate's chunks of validation samples, or live samples), judged by the output's
``OutputRule`` (``engines.output_rules``); ``compare_output`` is the one-shot form, and
``violations`` turns measurements and a tolerance into broken rules.

Metrics (a "sample" is one row along the batch axis, or a whole output for engines
served unbatched):

- ``cosine_similarity``: the mean over samples of the cosine similarity between the
  candidate's and the reference's flattened sample (1.0 when both are all zeros, 0.0
  when only one is). Must be >= its threshold. The mean is the rule because a single
  odd sample should not sink an engine that is right everywhere else; the minimum is
  reported beside it as ``cosine_similarity_min`` (information, not a rule).
- ``top1_agreement`` (``top1`` rules only): the fraction of positions whose argmax over
  the class axis is the same, strictly: one position per row of ``[N, C]``, per token of
  ``[N, T, C]``, per pixel of ``[N, C, H, W]``. Must be >= its threshold. Beside it,
  ``top1_flips`` counts the positions whose argmax changed and ``top1_near_tie_flips``
  those among them where the reference's two values lay within TOP1_TIE of the row's
  range: they say how fragile the output is, they do not excuse the flip.
- ``exact_match`` (``exact`` rules): the fraction of samples that are identical.
- ``max_abs_error``: the largest |candidate - reference| over all elements. Must be
  <= its threshold.
- ``max_rel_error``: the largest |candidate - reference| / max(|reference|, floor),
  where floor is REL_ERROR_FLOOR times the output's largest |reference| value, so
  elements near zero do not blow the ratio up. Must be <= its threshold.

A metric that does not apply to an output is not reported for it and its threshold is
skipped; the others all apply (cosine beside top-1 too: a few samples can agree on
top-1 by luck while the scores drift). Values where the candidate is NaN or inf while
the reference is finite are counted as ``nonfinite`` and always violate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.output_rules import EXACT, TOP1, OutputRule

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
"""A flip between reference values closer than this fraction of the row's range is a
near-tie flip (reported, still a flip)."""

REL_ERROR_FLOOR = 1e-3
"""Relative errors are taken against at least this fraction of the output's largest
magnitude."""


@dataclass
class OutputComparison:
    """Running measurements of one output, judged by ``rule``."""

    rule: OutputRule
    cosines: list[float] = field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0
    positions: int = 0
    flips: int = 0
    near_tie_flips: int = 0
    exact_samples: int = 0
    exact_matching: int = 0
    nonfinite: int = 0
    error: str | None = None

    def add(self, expected: np.ndarray, got: np.ndarray | None, *, batched: bool) -> None:
        """One run's output: ``expected`` from the reference, ``got`` from the candidate
        (None when it did not return the output)."""
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
        if self.rule.kind == EXACT or expected.dtype.kind not in "fc":
            equal = np.all(reference == candidate, axis=1)
            self.exact_samples += rows
            self.exact_matching += int(np.count_nonzero(equal))
            if reference.size:
                difference = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
                self.max_abs = max(self.max_abs, float(difference.max()))
            return
        self._add_floating(reference.astype(np.float64), candidate.astype(np.float64))
        axis = self.rule.axis
        if self.rule.kind == TOP1 and axis is not None and axis < expected.ndim and expected.shape[axis] > 1:
            self._add_top1(_rows_over(expected, axis), _rows_over(got, axis))

    def _add_top1(self, expected: np.ndarray, got: np.ndarray) -> None:
        expected = np.nan_to_num(expected.astype(np.float64))
        chosen = np.argmax(got, axis=1)
        flipped = np.argmax(expected, axis=1) != chosen
        best = expected.max(axis=1)
        spread = best - expected.min(axis=1)
        # The reference's own value at the candidate's choice: close to its best = a near tie.
        at_choice = np.take_along_axis(expected, chosen[:, np.newaxis], axis=1)[:, 0]
        near = flipped & (best - at_choice <= TOP1_TIE * spread)
        self.positions += expected.shape[0]
        self.flips += int(np.count_nonzero(flipped))
        self.near_tie_flips += int(np.count_nonzero(near))

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
        """The measurements as JSON, with the rule that judged them (``decided_by``: the
        deciding metric; ``rule``: ``top1:axis=K``, ``cosine`` or ``exact``; ``rule_reason``)."""
        judged = {
            "decided_by": self.rule.metric,
            "rule": self.rule.describe(),
            "rule_reason": self.rule.reason,
        }
        if self.error is not None:
            return {"error": self.error, **judged}
        if self.exact_samples:
            return {
                "exact_match": _ratio(self.exact_matching, self.exact_samples),
                "max_abs_error": _finite(self.max_abs),
                "samples": self.exact_samples,
                **judged,
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
        if self.positions:
            summary["top1_agreement"] = _ratio(self.positions - self.flips, self.positions)
            summary["top1_positions"] = self.positions
            summary["top1_flips"] = self.flips
            summary["top1_near_tie_flips"] = self.near_tie_flips
        elif self.rule.kind == TOP1:
            # A class axis of one element has nothing to flip: cosine decides.
            return {**summary, **judged, "decided_by": "cosine_similarity"}
        return {**summary, **judged}


def compare_output(
    reference: np.ndarray,
    candidate: np.ndarray | None,
    rule: OutputRule,
    tolerance: Mapping[str, float],
    *,
    batched: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Judge one output of one run: (the measurements, the broken rules as sentences)."""
    comparison = OutputComparison(rule)
    comparison.add(reference, candidate, batched=batched)
    metrics = comparison.summary()
    return metrics, violations(metrics, tolerance)


def violations(metrics: Mapping[str, Any], tolerance: Mapping[str, float], where: str = "") -> list[str]:
    """The rules ``metrics`` (one output's summary) breaks under ``tolerance``, each a
    sentence starting with ``where`` ("output 'probs' at batch 8: ")."""
    prefix = f"{where}: " if where else ""
    if "error" in metrics:
        return [f"{prefix}{metrics['error']}"]
    broken = []
    if metrics.get("nonfinite", 0):
        broken.append(f"{prefix}{metrics['nonfinite']} NaN or inf value(s) where the reference is finite")
    for metric, threshold in tolerance.items():
        if metric not in metrics:
            continue  # not applicable to this output
        value = metrics[metric]
        if value is None:
            broken.append(f"{prefix}{metric} is not a finite number")
        elif metric in HIGHER_IS_BETTER and value < threshold:
            shown, limit = _distinct(value, threshold)
            broken.append(f"{prefix}{metric} {shown} < {limit}{_flips(metric, metrics)}")
        elif metric in LOWER_IS_BETTER and value > threshold:
            shown, limit = _distinct(value, threshold)
            broken.append(f"{prefix}{metric} {shown} > {limit}")
    return broken


def _flips(metric: str, metrics: Mapping[str, Any]) -> str:
    if metric != "top1_agreement" or "top1_flips" not in metrics:
        return ""
    return (
        f" ({metrics['top1_flips']} of {metrics['top1_positions']} positions changed their top-1 "
        f"over axis {metrics['rule'].split('=')[-1]}, {metrics['top1_near_tie_flips']} of them near-ties)"
    )


def _rows_over(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` as rows of the class axis: one row per position."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


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
