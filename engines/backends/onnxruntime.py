"""The ONNX Runtime backend: kiln's engine on machines without an NVIDIA GPU.

Build = ONNX Runtime's graph optimizer at its highest level (constant folding,
node fusions such as Conv+Activation, Gemm+Activation, LayerNorm, attention),
saved as the engine artifact, with a report of what was fused. Because extended
and layout optimizations pick kernels for the CPU they run on, the artifact is
keyed by the CPU's signature (see ``engines.device``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.backends.base import Backend, ProgressCallback, Runner, no_progress
from engines.device import cpu_device_info
from engines.errors import (
    BuildFailed,
    EngineError,
    InferenceFailed,
    InvalidInput,
    StoreCorrupted,
    UnsupportedModel,
)
from engines.types import BuildOptions, DeviceSignature, Signature

_log = logging.getLogger("engines.backends.onnxruntime")

INLINE_WEIGHTS_LIMIT = 1024**3
"""A model with external weights up to this size is optimized into one
self-contained file; above it, the optimized model keeps its weights in
``<artifact>.data`` beside it (one protobuf message holds at most 2 GB)."""


def default_intra_op_threads() -> int:
    """All cores but one: the server's event loop needs a core of its own, and on a
    small machine an extra intra-op thread costs more in wake-ups than it saves."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


class OnnxRuntimeBackend(Backend):
    """CPU engines through ONNX Runtime.

    ``intra_op_threads`` is the thread count of each session; ``session_per_instance``
    gives every serving instance its own session instead of one shared session.
    """

    name = "onnxruntime"
    artifact_suffix = ".onnx"

    def __init__(self, intra_op_threads: int | None = None, session_per_instance: bool = False) -> None:
        self.intra_op_threads = intra_op_threads or default_intra_op_threads()
        self.session_per_instance = session_per_instance

    @classmethod
    def probe(cls) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as exc:
            return False, f"onnxruntime does not import ({exc})"
        return True, f"ONNX Runtime {onnxruntime.__version__} on {cpu_device_info()['arch']} CPU"

    def device_signature(self) -> DeviceSignature:
        import onnxruntime

        return DeviceSignature(
            backend=self.name,
            backend_version=onnxruntime.__version__,
            device=cpu_device_info(),
        )

    def _session_options(self, threads: int) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: declared-shape warnings would flood the log
        # Spinning worker threads burn the second core between requests on small machines.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def build(
        self,
        onnx_path: Path,
        signature: Signature,
        options: BuildOptions,
        output_path: Path,
        *,
        timing_cache_path: Path | None = None,
        progress: ProgressCallback = no_progress,
    ) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        from engines.onnx_model import external_data_bytes

        progress("optimize", 0.0)
        before = onnx.load_model(str(onnx_path), load_external_data=False)
        opts = self._session_options(self.intra_op_threads)
        opts.optimized_model_filepath = str(output_path)
        external_bytes = external_data_bytes(before)
        if external_bytes:
            # Otherwise the optimized model would point at the source's data files.
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{output_path.name}.data"
            )
            if external_bytes <= INLINE_WEIGHTS_LIMIT:  # small enough: one self-contained file
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes",
                    str(INLINE_WEIGHTS_LIMIT + 1),
                )
        try:
            ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for every load error
            raise UnsupportedModel(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from exc
        if not output_path.exists() or output_path.stat().st_size == 0:
            raise BuildFailed("ONNX Runtime did not write the optimized model")
        progress("optimize", 1.0)
        after = onnx.load_model(str(output_path), load_external_data=False)
        return {"fusion": fusion_report(before, after)}

    def load(
        self,
        artifact_path: Path,
        signature: Signature,
        options: BuildOptions,
        *,
        instances: int = 1,
        providers: Sequence[Any] = ("CPUExecutionProvider",),
    ) -> OnnxRuntimeRunner:
        """Load an artifact (or any ONNX model: the baseline engine loads the upload
        itself) on ``providers``, ONNX Runtime's execution providers in order."""
        return OnnxRuntimeRunner(
            artifact_path,
            signature,
            options.max_batch_size if signature.batchable else 1,
            threads=self.intra_op_threads,
            sessions=instances if self.session_per_instance else 1,
            session_options=self._session_options,
            providers=providers,
        )


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model. ``session.run`` is thread-safe, so one shared session
    serves every instance unless ``sessions`` > 1 asks for one each. ``providers``
    are ONNX Runtime's execution providers in order of preference; ``provider`` is
    the one that runs the model (ONNX Runtime falls back when one cannot start)."""

    def __init__(
        self,
        artifact_path: Path,
        signature: Signature,
        max_batch_size: int,
        *,
        threads: int,
        sessions: int,
        session_options: Any,
        providers: Sequence[Any] = ("CPUExecutionProvider",),
    ) -> None:
        super().__init__(signature, max_batch_size)
        import queue

        import onnxruntime as ort

        self._sessions: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            for _ in range(max(1, sessions)):
                self._sessions.put(
                    ort.InferenceSession(
                        str(artifact_path),
                        sess_options=session_options(threads),
                        providers=list(providers),
                    )
                )
        except Exception as exc:  # a corrupt or foreign artifact
            raise StoreCorrupted(f"ONNX Runtime cannot load the engine: {_first_line(exc)}") from exc
        self._shared = sessions <= 1
        first = self._sessions.get()
        self._output_names = [o.name for o in first.get_outputs()]
        self.provider: str = first.get_providers()[0]
        self._sessions.put(first)
        if self._shared:
            self._session = first

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._shared:
            return self._run(self._session, feeds)
        session = self._sessions.get()
        try:
            return self._run(session, feeds)
        finally:
            self._sessions.put(session)

    def _run(self, session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = session.run(self._output_names, dict(feeds))
        except Exception as exc:
            raise run_error(exc) from exc
        return dict(zip(self._output_names, results, strict=True))

    def _close(self) -> None:
        while not self._sessions.empty():
            self._sessions.get()
        self._session = None


# "... while running Gather node. Name:'emb' Status Message: indices element out of data bounds, ..."
_NODE_FAILURE = re.compile(r"while running (\S+) node\. Name:'([^']*)' Status Message: (.*)", re.DOTALL)


def run_error(exc: BaseException) -> EngineError:
    """ONNX Runtime's run-time exception as kiln's: ``InvalidArgument`` (a value the
    model rejects: an index out of range, shapes that disagree) is the input's fault,
    400; any other (``Fail``: out of memory, a kernel fault; ``RuntimeException``...)
    is the server's, 500, and logged."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    text = str(exc).strip()
    found = _NODE_FAILURE.search(text)
    if found is not None:
        op, name, message = found.groups()
        where = f"its {op} node" + (f" '{name}'" if name else "")
        detail = f"{where}: {message.strip().splitlines()[0][:400]}"
    else:
        detail = _first_line(exc)
    if isinstance(exc, InvalidArgument):
        return InvalidInput(
            f"the engine rejected the input at {detail}; check the values against what the model "
            "accepts (indices within their tables, shapes that agree)"
            if found is not None
            else f"the engine rejected the input: {detail}"
        )
    _log.error("ONNX Runtime failed to run a batch (%s): %s", type(exc).__name__, text[:2000])
    return InferenceFailed(f"ONNX Runtime failed to run the batch: {detail}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def fusion_report(before: Any, after: Any) -> dict[str, Any]:
    """What the optimizer changed: op counts before and after, and the new fused nodes."""
    before_ops = Counter(node.op_type for node in before.graph.node)
    after_ops = Counter(node.op_type for node in after.graph.node)
    before_names = {node.name for node in before.graph.node}
    new_nodes = [
        {"name": node.name, "op_type": node.op_type, "domain": node.domain or "ai.onnx"}
        for node in after.graph.node
        if node.name not in before_names
    ]
    after_names = {node.name for node in after.graph.node}
    return {
        "nodes_before": sum(before_ops.values()),
        "nodes_after": sum(after_ops.values()),
        "op_counts_before": dict(sorted(before_ops.items())),
        "op_counts_after": dict(sorted(after_ops.items())),
        "removed_nodes": sorted(name for name in before_names - after_names if name),
        "fused_nodes": new_nodes,
    }
