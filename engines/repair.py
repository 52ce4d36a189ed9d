"""Precision repair: when an FP16 or INT8 candidate fails the accuracy gate, find the
nodes that cause the error by measurement and keep them in FP32 until it passes.

``repair`` runs these steps, each ending in a rebuild checked by the same gate at every
served batch size, and stops at the first candidate that passes, when a budget runs out
(nodes kept, seconds), or when no node adds measurable error:

1. INT8: the other calibration methods first (percentile, entropy, minmax), without
   keeping any node in FP32. The first that passes wins; otherwise the best of them
   (the highest worst-case metric) is repaired further. Their ranges all come from the
   build's one calibration pass (``engines.int8_calibration``).
   Where the backend runs it (ONNX Runtime), dynamic INT8 is tried next as a candidate
   of its own: int8 MatMul weights, activations quantized per run, no calibration.
2. FP16: tensors whose FP32 values leave float16's range (|x| > 65504) on the samples
   become inf in float16 whatever their consumer does, so their producers and
   consumers are kept in FP32 at once.
3. Measure: the FP32 model and the candidate's ONNX run in ONNX Runtime with every float
   intermediate tensor exposed as a graph output (``qdq_loss_debug``), on the first
   MEASURE_SAMPLES validation samples. A node's error is the relative error of its
   outputs minus the largest relative error of its inputs, each input traced back
   through Cast and Q/DQ nodes to the tensor both graphs share: the error the node
   itself adds.
4. Keep the worst nodes in FP32 (FP16: the converter's node block list; INT8: the
   weighted ops left out of Q/DQ insertion, a blamed node together with the quantized
   nodes whose Q/DQ pairs feed it, through a Relu or pooling between them), 1, 1, 2,
   4... at a time, measuring the new candidate again each round. A blamed node that
   belongs to a stage (exporters name nodes by module path: the weighted nodes of
   ``feature_extractor/conv_layers.0``, ``.1``... form the stage ``conv_layers``) brings
   its whole stage when it fits the node budget, else its own block (``conv_layers.3``):
   sensitivity runs along a stage (raw audio's first convolutions), not node by node.
5. When both a static repair and dynamic INT8 pass, the faster one is served (the
   static one where latency cannot be measured); ``chosen`` in the report says which.

The repair owns no build step: the pipeline lends it ``RepairTools`` (convert, build,
gate, profile), so a repaired candidate is made exactly like any other.
"""

from __future__ import annotations

import itertools
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.calibration import iter_batches
from engines.errors import BuildFailed, EngineError
from engines.types import CalibrationMethod, Precision, Signature

FP16_MAX = 65504.0
"""The largest finite float16 value."""

NODE_BUDGET_FRACTION = 0.10
"""Default node budget: this fraction of the model's weighted nodes..."""

MIN_NODE_BUDGET = 4
"""...but at least this many nodes, so a small model can keep a layer and its activation."""

MEASURE_SAMPLES = 8
"""Validation samples run with every intermediate tensor exposed (memory grows with it)."""

ERROR_CAP = 1e6
"""Relative error given to a tensor that is NaN or inf where the FP32 one is finite."""

MIN_ADDED_ERROR = 1e-6
"""A node adding less relative error than this is not blamed."""

WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_PASS_THROUGH = ("Cast", "QuantizeLinear", "DequantizeLinear")

_METHOD_ORDER = (CalibrationMethod.PERCENTILE, CalibrationMethod.ENTROPY, CalibrationMethod.MINMAX)


@dataclass
class Attempt:
    """One candidate made from the FP32 model: its files and what the gate said."""

    onnx_path: Path
    artifact_path: Path
    transform: dict[str, Any]
    build: dict[str, Any]
    comparison: dict[str, Any]
    violations: list[str]
    method: CalibrationMethod | None = None
    kept: tuple[str, ...] = ()
    dynamic: bool = False

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class RepairTools:
    """What the build pipeline lends the repair, so candidates are made as any other.

    ``convert(onnx_out, kept, method)`` writes the precision-transformed ONNX with
    ``kept`` nodes in FP32 and returns the transform report; ``build(onnx, artifact)``
    builds the backend's engine and returns its report; ``gate(artifact)`` compares it
    with the FP32 model at every served batch size and returns (comparison,
    violations); ``profile(artifact)`` returns median latency per batch size, or is None
    when the model's inputs cannot be made up; ``fp32_artifact()`` returns the FP32
    engine (built on first use); ``progress(fraction)`` hears the share of the time
    budget spent after each rebuild.
    """

    convert: Callable[[Path, frozenset[str], CalibrationMethod | None], dict[str, Any]]
    build: Callable[[Path, Path], dict[str, Any]]
    gate: Callable[[Path], tuple[dict[str, Any], list[str]]]
    profile: Callable[[Path], dict[int, float]] | None
    fp32_artifact: Callable[[], Path]
    progress: Callable[[float], None]
    convert_dynamic: Callable[[Path, frozenset[str]], dict[str, Any]] | None = None
    """Writes the dynamic INT8 transform; None where the backend cannot run one."""


@dataclass(frozen=True)
class Budget:
    max_nodes: int
    seconds: float


@dataclass
class _Blame:
    """A set of nodes to keep together, and why."""

    nodes: tuple[str, ...]
    score: float
    reason: str


@dataclass
class _Progress:
    started: float = field(default_factory=time.perf_counter)
    kept: dict[str, str] = field(default_factory=dict)
    """Node name → why it is kept, in the order they were kept."""
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def weighted_node_count(model_path: Path) -> int:
    model = onnx.load(model_path, load_external_data=False)
    return sum(node.op_type in WEIGHTED_OP_TYPES for node in model.graph.node)


def default_node_budget(weighted_nodes: int) -> int:
    """NODE_BUDGET_FRACTION of the weighted nodes, at least MIN_NODE_BUDGET."""
    return max(MIN_NODE_BUDGET, math.ceil(NODE_BUDGET_FRACTION * weighted_nodes))


def repair(
    precision: Precision,
    model_path: Path,
    samples: Mapping[str, np.ndarray],
    signature: Signature,
    failed: Attempt,
    tools: RepairTools,
    budget: Budget,
    workdir: Path,
) -> tuple[Attempt, dict[str, Any]]:
    """Repair the candidate ``failed`` (built and gated already, with violations).

    Returns the attempt to serve (the first that passed, else the best one tried, which
    the caller rejects) and the repair report (see docs/API.md, "Precision repair").
    """
    progress = _Progress()
    report: dict[str, Any] = {
        "failed_at_first": {"violations": failed.violations, "accuracy": failed.comparison},
        "node_budget": budget.max_nodes,
        "time_budget_s": budget.seconds,
    }
    best, stopped = failed, None
    counter = itertools.count(1)

    def attempt(kept: frozenset[str], method: CalibrationMethod | None) -> Attempt:
        index = next(counter)
        onnx_path = workdir / f"{precision}-repair-{index}.onnx"
        artifact_path = workdir / f"{precision}-repair-{index}.engine"
        transform = tools.convert(onnx_path, kept, method)
        build = tools.build(onnx_path, artifact_path)
        comparison, violations = tools.gate(artifact_path)
        tools.progress(min(1.0, progress.elapsed() / budget.seconds))
        return Attempt(
            onnx_path, artifact_path, transform, build, comparison, violations, method, tuple(sorted(kept))
        )

    def out_of_time(per_attempt: float) -> str | None:
        left = budget.seconds - progress.elapsed()
        if left <= 0:
            return f"the time budget of {budget.seconds:g} s ran out"
        if per_attempt > left:
            return (
                f"the next rebuild would take about {per_attempt:.1f} s, more than the "
                f"{left:.1f} s left of the time budget ({budget.seconds:g} s)"
            )
        return None

    def attempt_dynamic() -> Attempt:
        assert tools.convert_dynamic is not None
        onnx_path, artifact_path = workdir / "int8-dynamic.onnx", workdir / "int8-dynamic.engine"
        transform = tools.convert_dynamic(onnx_path, frozenset())
        build = tools.build(onnx_path, artifact_path)
        comparison, violations = tools.gate(artifact_path)
        tools.progress(min(1.0, progress.elapsed() / budget.seconds))
        return Attempt(onnx_path, artifact_path, transform, build, comparison, violations, dynamic=True)

    dynamic: Attempt | None = None
    try:
        if precision == Precision.INT8:
            best, tried = _try_calibration_methods(failed, attempt, out_of_time)
            report["calibration_methods"] = tried
            report["calibration_method"] = str(best.method)
            if not best.passed and tools.convert_dynamic is not None and not out_of_time(0.0):
                dynamic, report["dynamic_int8"] = _try_dynamic(attempt_dynamic)
        if not best.passed:
            best, stopped = _keep_nodes(
                precision, model_path, samples, signature, best, attempt, out_of_time, budget, progress
            )
    except EngineError as exc:
        stopped = f"the repair failed: {exc.message}"
    if dynamic is not None and dynamic.passed:
        best, report["chosen"] = _choose(best, dynamic, tools)
        stopped = None
    elif best.passed:
        report["chosen"] = _static_choice(best)

    kept_ops = _op_types(best.onnx_path, progress.kept)
    report.update(
        {
            "passed": best.passed,
            "kept_fp32": [
                {"name": name, "op_type": kept_ops.get(name, ""), "reason": reason}
                for name, reason in progress.kept.items()
                if name in best.kept
            ],
            "rounds": progress.rounds,
        }
    )
    if not best.passed:
        report["stopped"] = stopped or "no candidate passed"
    elif tools.profile is not None:
        report["latency_ms"] = _baseline_latency(tools, failed)
    report["seconds"] = round(progress.elapsed(), 3)
    return best, report


def _try_dynamic(attempt_dynamic: Callable[[], Attempt]) -> tuple[Attempt | None, dict[str, Any]]:
    started = time.perf_counter()
    try:
        dynamic = attempt_dynamic()
    except EngineError as exc:  # nothing to quantize dynamically, or a failed step
        return None, {"passed": False, "error": exc.message}
    return dynamic, {
        "passed": dynamic.passed,
        "violations": dynamic.violations,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _static_choice(static: Attempt) -> str:
    kept = f" with {len(static.kept)} node(s) kept in FP32" if static.kept else ""
    return f"static int8 ({static.method} calibration){kept}"


def _choose(static: Attempt, dynamic: Attempt, tools: RepairTools) -> tuple[Attempt, str]:
    """Dynamic INT8 passed: serve it unless a passing static repair is faster."""
    if not static.passed:
        return dynamic, "dynamic int8: static int8 did not pass, dynamic int8 did"
    if tools.profile is None:
        return static, f"{_static_choice(static)}: both passed; latency cannot be measured on this model"
    static_ms, dynamic_ms = tools.profile(static.artifact_path), tools.profile(dynamic.artifact_path)
    ratios = [math.log(dynamic_ms[b] / max(static_ms[b], 1e-9)) for b in static_ms if b in dynamic_ms]
    ratio = math.exp(sum(ratios) / len(ratios)) if ratios else 1.0
    if ratio < 1.0:
        return dynamic, f"dynamic int8: both passed, dynamic ran at {ratio:.2f}x the static repair's latency"
    return static, f"{_static_choice(static)}: both passed, dynamic int8 ran at {ratio:.2f}x its latency"


def _try_calibration_methods(
    failed: Attempt,
    attempt: Callable[[frozenset[str], CalibrationMethod | None], Attempt],
    out_of_time: Callable[[float], str | None],
) -> tuple[Attempt, list[dict[str, Any]]]:
    tried = [{"method": str(failed.method), "passed": False, "violations": failed.violations}]
    best = failed
    for method in _METHOD_ORDER:
        if method == failed.method or out_of_time(0.0):
            continue
        started = time.perf_counter()
        try:
            candidate = attempt(frozenset(), method)
        except EngineError as exc:
            tried.append({"method": str(method), "passed": False, "error": exc.message})
            continue
        seconds = round(time.perf_counter() - started, 3)
        tried.append(
            {
                "method": str(method),
                "passed": candidate.passed,
                "violations": candidate.violations,
                "seconds": seconds,
            }
        )
        if candidate.passed:
            return candidate, tried
        if _score(candidate.comparison) > _score(best.comparison):
            best = candidate
    return best, tried


def _keep_nodes(
    precision: Precision,
    model_path: Path,
    samples: Mapping[str, np.ndarray],
    signature: Signature,
    current: Attempt,
    attempt: Callable[[frozenset[str], CalibrationMethod | None], Attempt],
    out_of_time: Callable[[float], str | None],
    budget: Budget,
    progress: _Progress,
) -> tuple[Attempt, str | None]:
    """Grow the set of FP32 nodes from measurements until the candidate passes."""
    reference = _intermediates(model_path, samples, signature)
    step, per_attempt = 1, 0.0
    pending: list[_Blame] = []
    if precision == Precision.FP16:
        pending = _overflows(current.onnx_path, reference, set(current.transform.get("fp32_nodes", ())))
    while True:
        if reason := out_of_time(per_attempt):
            return current, reason
        if not pending:
            pending = _rank(precision, current, reference, samples, signature, set(progress.kept))
            pending = pending[:step]
            step *= 2
        if not pending:
            return current, "no node left adds measurable error"
        units = _stage_units(current.onnx_path) if precision == Precision.INT8 else {}
        chosen: dict[str, str] = {}
        for blame in pending:
            for nodes, reason in _widenings(blame, units):
                new = [name for name in nodes if name not in progress.kept and name not in chosen]
                if len(progress.kept) + len(chosen) + len(new) <= budget.max_nodes:
                    chosen.update(dict.fromkeys(new, reason))
                    break
            else:
                break
        if not chosen:
            return current, (
                f"the node budget is spent: {len(progress.kept)} of {budget.max_nodes} nodes kept, "
                f"and the next culprit measured ({', '.join(pending[0].nodes)}) does not fit"
            )
        pending = []
        progress.kept.update(chosen)
        started = time.perf_counter()
        current = attempt(frozenset(progress.kept), current.method)
        per_attempt = time.perf_counter() - started
        progress.rounds.append(
            {
                "kept_fp32": list(chosen),
                "violations": current.violations,
                "seconds": round(per_attempt, 3),
            }
        )
        if current.passed:
            return current, None


_INDEXED = re.compile(r"^(.+?)[._](\d+)$")
"""A module path component with an index: ``conv_layers.0``, ``layers_3``."""


def _stage_units(onnx_path: Path) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """For each quantized weighted node named by module path, the units it belongs to,
    largest first: its stage (every block of ``.../conv_layers``) and its block
    (``.../conv_layers.3``), each as (label, node names in graph order)."""
    graph = onnx.load(onnx_path, load_external_data=False).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    quantized = [
        node.name
        for node in graph.node
        if node.op_type in WEIGHTED_OP_TYPES and any(name in dequantized for name in node.input)
    ]
    stages: dict[str, list[str]] = {}
    blocks: dict[str, list[str]] = {}
    places: dict[str, tuple[str, str]] = {}
    for name in quantized:
        parts = name.strip("/").split("/")
        for index in range(len(parts) - 2, -1, -1):  # the last component is the op itself
            match = _INDEXED.match(parts[index])
            if match:
                stage = "/".join([*parts[:index], match.group(1)])
                block = "/".join(parts[: index + 1])
                stages.setdefault(stage, []).append(name)
                blocks.setdefault(block, []).append(name)
                places[name] = (stage, block)
                break
    units: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for name, (stage, block) in places.items():
        found = [(f"stage '{stage}'", tuple(stages[stage]))]
        if blocks[block] != stages[stage]:
            found.append((f"block '{block}'", tuple(blocks[block])))
        units[name] = [unit for unit in found if len(unit[1]) > 1]
    return units


def _widenings(
    blame: _Blame, units: Mapping[str, list[tuple[str, tuple[str, ...]]]]
) -> list[tuple[tuple[str, ...], str]]:
    """What to keep for a blamed node, largest first: its stage, its block, itself."""
    head = blame.nodes[0]
    found = [
        (
            tuple(dict.fromkeys((*members, *blame.nodes))),
            f"{label} of a sensitive node: '{head}' {blame.reason}",
        )
        for label, members in units.get(head, [])
    ]
    return [*found, (blame.nodes, blame.reason)]


def _overflows(
    candidate_path: Path, reference: Mapping[str, list[np.ndarray]], fp32_already: set[str]
) -> list[_Blame]:
    """Producers and consumers of tensors whose FP32 values overflow float16, worst
    first, leaving out the nodes the candidate already runs in FP32."""
    graph = onnx.load(candidate_path, load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    sources = _sources_of(graph)
    largest = {
        name: max(float(np.max(np.abs(v[np.isfinite(v)]), initial=0.0)) for v in values)
        for name, values in reference.items()
    }
    over = sorted((name for name, value in largest.items() if value > FP16_MAX), key=lambda n: -largest[n])
    blames = []
    for name in over:
        nodes = [producer[name]] if name in producer else []
        nodes += [node for node in graph.node if name in sources.get(node.name, ())]
        names = tuple(
            dict.fromkeys(n.name for n in nodes if n.op_type != "Cast" and n.name not in fp32_already)
        )
        if names:
            blames.append(
                _Blame(names, largest[name], f"overflow: '{name}' reaches {largest[name]:.4g} > {FP16_MAX:g}")
            )
    return blames


def _rank(
    precision: Precision,
    current: Attempt,
    reference: Mapping[str, list[np.ndarray]],
    samples: Mapping[str, np.ndarray],
    signature: Signature,
    kept: set[str],
) -> list[_Blame]:
    """Nodes of the candidate by the relative error they add, worst first."""
    graph = onnx.load(current.onnx_path, load_external_data=False).graph
    measured = _intermediates(current.onnx_path, samples, signature)
    error = {name: _relative_error(reference[name], measured[name]) for name in measured if name in reference}
    # A node whose output the conversion renamed (a graph output behind a Cast) is
    # measured where that value leaves through Cast or Q/DQ nodes under its old name.
    forward = {node.input[0]: node.output[0] for node in graph.node if node.op_type in _PASS_THROUGH}

    def output_error(name: str) -> float | None:
        for _ in range(4):
            if name in error:
                return error[name]
            if name not in forward:
                break
            name = forward[name]
        return None

    sources = _sources_of(graph)
    producer = {output: node for node in graph.node for output in node.output}
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}

    def eligible(node: onnx.NodeProto) -> bool:
        if node.op_type in _PASS_THROUGH or node.name in kept:
            return False
        if precision == Precision.INT8:
            return node.op_type in WEIGHTED_OP_TYPES and any(name in dequantized for name in node.input)
        return node.name not in set(current.transform.get("fp32_nodes", ()))

    def quantizing_producers(node: onnx.NodeProto, depth: int = 0) -> list[str]:
        """The quantized nodes whose Q/DQ pairs feed ``node``: a weighted op quantizes
        its output too, and a Relu or pooling between two weighted ops passes the
        error of both pairs on."""
        found = []
        for name, source in zip(node.input, sources.get(node.name, ()), strict=True):
            if name not in dequantized or source not in producer:
                continue
            feeding = producer[source]
            if eligible(feeding):
                found.append(feeding.name)
            elif depth < 3 and feeding.op_type not in _PASS_THROUGH:
                found += quantizing_producers(feeding, depth + 1)
        return found

    blames = []
    for node in graph.node:
        if node.op_type in _PASS_THROUGH:
            continue
        out = max((e for name in node.output if (e := output_error(name)) is not None), default=None)
        if out is None:
            continue
        added = out - max((error.get(name, 0.0) for name in sources.get(node.name, ())), default=0.0)
        if not added > MIN_ADDED_ERROR:
            continue
        nodes = [node.name] if eligible(node) else []
        if precision == Precision.INT8:
            nodes += quantizing_producers(node)
        nodes = list(dict.fromkeys(nodes))
        if nodes:
            blames.append(_Blame(tuple(nodes), added, f"adds relative error {added:.3g}"))
    return sorted(blames, key=lambda blame: -blame.score)


def _sources_of(graph: onnx.GraphProto) -> dict[str, tuple[str, ...]]:
    """Each node's inputs traced back through Cast and Q/DQ nodes to the tensors they
    carry (the names the FP32 graph has too)."""
    producer = {output: node for node in graph.node for output in node.output}

    def source(name: str) -> str:
        for _ in range(8):  # a Cast, then a DQ, then a Q at most; bounded all the same
            node = producer.get(name)
            if node is None or node.op_type not in _PASS_THROUGH:
                break
            name = node.input[0]
        return name

    return {node.name: tuple(source(name) if name else "" for name in node.input) for node in graph.node}


def _intermediates(
    model_path: Path, samples: Mapping[str, np.ndarray], signature: Signature
) -> dict[str, list[np.ndarray]]:
    """Every float tensor of the model on each of the first MEASURE_SAMPLES samples, run
    one at a time, flattened, as float32: errors are then measured per sample, so a
    quiet input counts as much as a loud one."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        modify_model_output_intermediate_tensors,
    )

    first = {name: array[:MEASURE_SAMPLES] for name, array in samples.items()}
    with tempfile.TemporaryDirectory(prefix=".repair-", dir=model_path.parent) as scratch:
        augmented = Path(scratch) / "augmented.onnx"
        try:
            modify_model_output_intermediate_tensors(model_path, augmented)
            activations = collect_activations(str(augmented), list(iter_batches(first, 1, signature)))
        except Exception as exc:  # shape inference and ONNX Runtime raise their own types
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise BuildFailed(f"measuring the intermediate tensors of {model_path.name}: {text}") from exc
    return {
        name: [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
        for name, arrays in activations.items()
        if arrays and np.asarray(arrays[0]).dtype.kind == "f"
    }


def _relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """The mean over samples of each sample's relative error."""
    if len(reference) != len(candidate) or not reference:
        return 0.0
    if len({array.shape for array in (*reference, *candidate)}) > 1:
        return float(np.mean([_sample_error(r, c) for r, c in zip(reference, candidate, strict=True)]))
    # All samples alike: one vectorised pass, as _sample_error computes each (in
    # float32: a relative error needs no more digits, and these arrays are large).
    ref, cand = np.stack(reference), np.stack(candidate)
    finite = np.isfinite(ref)
    candidate_finite = np.isfinite(cand)
    broken = np.any(finite & ~candidate_finite, axis=1)
    if not (finite.all() and candidate_finite.all()):
        ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
    norm = np.linalg.norm(ref, axis=1)
    difference = np.linalg.norm(ref - cand, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(norm > 0, difference / np.where(norm > 0, norm, 1.0), 0.0)
    errors = np.where(norm == 0, np.where(difference == 0, 0.0, ERROR_CAP), np.minimum(relative, ERROR_CAP))
    return float(np.mean(np.where(broken, ERROR_CAP, errors)))


def _sample_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return 0.0  # a tensor the two graphs shape differently: not comparable
    finite = np.isfinite(reference)
    if np.any(finite & ~np.isfinite(candidate)):
        return ERROR_CAP
    reference, candidate = reference[finite].astype(np.float64), candidate[finite].astype(np.float64)
    norm = float(np.linalg.norm(reference))
    difference = float(np.linalg.norm(reference - candidate))
    if norm == 0.0:
        return 0.0 if difference == 0.0 else ERROR_CAP
    return min(difference / norm, ERROR_CAP)


def _score(comparison: Mapping[str, Any]) -> float:
    """The worst value of any output's deciding metric (higher is better)."""
    values = []
    for result in comparison.get("results", []):
        for metrics in result["outputs"].values():
            for metric in ("top1_agreement", "cosine_similarity", "exact_match"):
                if metric in metrics:
                    values.append(metrics[metric] if metrics[metric] is not None else -1.0)
                    break
    return min(values, default=-1.0)


def _op_types(onnx_path: Path, names: Mapping[str, str]) -> dict[str, str]:
    graph = onnx.load(onnx_path, load_external_data=False).graph
    return {node.name: node.op_type for node in graph.node if node.name in names}


def _baseline_latency(tools: RepairTools, unrepaired: Attempt) -> dict[str, dict[str, float]]:
    """Median latency per batch size of the unrepaired candidate and the FP32 engine."""
    assert tools.profile is not None
    return {
        "unrepaired": {str(b): ms for b, ms in tools.profile(unrepaired.artifact_path).items()},
        "fp32": {str(b): ms for b, ms in tools.profile(tools.fp32_artifact()).items()},
    }


def add_latency_costs(report: dict[str, Any], repaired_ms: Mapping[int, float]) -> None:
    """Complete a passed repair's report with the served engine's latency (the
    pipeline's own profile) and its geometric-mean ratio to the unrepaired candidate
    and to FP32."""
    latency = report.get("latency_ms")
    if not latency or not repaired_ms:
        return
    latency["repaired"] = {str(b): ms for b, ms in repaired_ms.items()}

    def ratio(other: Mapping[str, float]) -> float:
        logs = [math.log(ms / max(other[b], 1e-9)) for b, ms in latency["repaired"].items() if b in other]
        return round(math.exp(sum(logs) / len(logs)), 3) if logs else 1.0

    report["latency_vs_unrepaired"] = ratio(latency["unrepaired"])
    report["latency_vs_fp32"] = ratio(latency["fp32"])
