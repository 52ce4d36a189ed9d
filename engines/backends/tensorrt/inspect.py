"""The fusion report: which network layers TensorRT fused, from the engine inspector."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engines.backends.tensorrt.builder import ShapeTriple
from engines.backends.tensorrt.library import dims, errors_or, first_line, io_names
from engines.backends.tensorrt.runner import output_shapes_at


def fusion_report(
    engine_information: str | Mapping[str, Any],
    network_layers: int | None,
    engine_layers: int | None = None,
) -> dict[str, Any]:
    """Which network layers TensorRT fused, from the engine inspector's JSON.

    A layer counts as fused when its name joins several with ``" + "``, its
    Metadata names more than one ONNX node, or it is a Myelin ``{ForeignNode[...]}``
    region. Reads both the 10.x (``Bindings``) and 11.x (``I/O Tensors``) layouts.
    """
    info = json.loads(engine_information) if isinstance(engine_information, str) else engine_information
    raw_layers = info.get("Layers", [])
    fused: list[dict[str, Any]] = []
    reformats = 0
    for entry in raw_layers:
        if isinstance(entry, Mapping):
            name = str(entry.get("Name", ""))
            layer_type = str(entry.get("LayerType", ""))
            metadata = str(entry.get("Metadata", "") or "")
        else:  # LAYER_NAMES_ONLY verbosity gives bare names
            name, layer_type, metadata = str(entry), "", ""
        if layer_type == "Reformat" or "Reformatting CopyNode" in name:
            reformats += 1
            continue
        nodes = _onnx_nodes(metadata)
        if " + " in name or len(nodes) > 1 or name.startswith("{ForeignNode["):
            fused.append(
                {
                    "name": name,
                    "layer_type": layer_type,
                    "nodes": nodes or [part.strip() for part in name.split(" + ")],
                }
            )
    if "I/O Tensors" in info:
        layout = "I/O Tensors"
        io_tensors = [
            str(t.get("Name", "")) if isinstance(t, Mapping) else str(t) for t in info["I/O Tensors"]
        ]
    elif "Bindings" in info:
        layout = "Bindings"
        io_tensors = [str(t.get("Name", "")) if isinstance(t, Mapping) else str(t) for t in info["Bindings"]]
    else:
        layout, io_tensors = "unknown", []
    return {
        "network_layers": network_layers,
        "engine_layers": engine_layers if engine_layers is not None else len(raw_layers),
        "fused_layer_count": len(fused),
        "fused_layers": fused,
        "reformat_layers": reformats,
        "io_tensors": io_tensors,
        "inspector_layout": layout,
    }


def _onnx_nodes(metadata: str) -> list[str]:
    """The distinct ONNX nodes a layer came from, in order.

    TensorRT writes "[ONNX Layer: <node name>]" per source node, joined by \x1f; a node
    lowered to several layers and fused back repeats, and a node inside a local
    function reads "<node> | <inner> (<function>)" (onnx-tensorrt's processMetadata):
    both count once, as the node.
    """
    nodes: list[str] = []
    for part in metadata.split("\x1f"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("[ONNX Layer:") and part.endswith("]"):
            part = part[len("[ONNX Layer:") : -1].strip()
        part = part.split(" | ", 1)[0].strip()
        if part not in nodes:
            nodes.append(part)
    return nodes


def inspect_plan(
    trt: Any, logger: Any, plan: memoryview, network_layers: int, profile: Mapping[str, ShapeTriple]
) -> dict[str, Any]:
    """The fusion report of a freshly built plan, after checking its outputs can be served.

    Raises ``UnsupportedModel`` for an output whose shape depends on the data, so
    the build fails before accuracy checks and profiling. Any other failure here is
    reported, not raised: a good engine must not fail on its report.
    """
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # best effort, as below
        return {"error": f"engine inspection failed: {first_line(exc)}"}
    if engine is None:
        reason = errors_or(logger, "no reason logged")
        return {"error": f"the new plan could not be deserialized for inspection: {reason}"}
    _check_outputs_follow_inputs(trt, logger, engine, profile)
    try:
        inspector = engine.create_engine_inspector()
        information = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return fusion_report(information, network_layers, engine.num_layers)
    except Exception as exc:  # best effort: a good engine must not fail on its report
        return {"error": f"engine inspection failed: {first_line(exc)}"}


def _check_outputs_follow_inputs(
    trt: Any, logger: Any, engine: Any, profile: Mapping[str, ShapeTriple]
) -> None:
    inputs, outputs = io_names(trt, engine)
    largest = {
        name: profile[name][2] if name in profile else dims(engine.get_tensor_shape(name)) for name in inputs
    }
    context = engine.create_execution_context()
    if context is None:
        return  # out of memory for a context now; the load will say so
    output_shapes_at(context, largest, outputs, logger)
