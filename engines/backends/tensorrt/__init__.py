"""The TensorRT backend: kiln's engine on NVIDIA GPUs (TensorRT 10.x and 11.x).

One module per role:

- ``backend``: ``TensorRTBackend`` (probe, device signature, build, load), the
  only class the rest of kiln uses;
- ``builder``: the network, its optimization profile and the builder config;
- ``timing_cache``: the store's timing cache, loaded before and merged after a build;
- ``inspect``: the fusion report from the engine inspector;
- ``artifact``: the file format (kiln header + plan) and its atomic write;
- ``runner``: ``TensorRTRunner``, a pool of execution slots over one engine;
- ``library``: the lazy import, the collecting logger and small shared helpers.

``tensorrt`` is imported lazily, inside functions, always under the local name
``trt`` (the static API check in the tests relies on that). Nothing that
TensorRT 11 removed is used.
"""

from engines.backends.tensorrt.artifact import ARTIFACT_MAGIC, pack_artifact_header, split_artifact
from engines.backends.tensorrt.backend import TensorRTBackend
from engines.backends.tensorrt.builder import optimization_profile
from engines.backends.tensorrt.inspect import fusion_report
from engines.backends.tensorrt.library import new_logger
from engines.backends.tensorrt.runner import TensorRTExecutionError, TensorRTRunner

__all__ = [
    "ARTIFACT_MAGIC",
    "TensorRTBackend",
    "TensorRTExecutionError",
    "TensorRTRunner",
    "fusion_report",
    "new_logger",
    "optimization_profile",
    "pack_artifact_header",
    "split_artifact",
]
