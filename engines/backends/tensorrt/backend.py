"""The TensorRT backend: probe, device signature, build (to an artifact) and load (to a runner)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from engines.backends import cuda
from engines.backends.base import Backend, ProgressCallback, Runner, no_progress
from engines.backends.tensorrt.artifact import (
    describe_signature,
    pack_artifact_header,
    split_artifact,
    write_atomically,
)
from engines.backends.tensorrt.builder import (
    MAX_OPTIMIZATION_LEVEL,
    build_plan,
    network_flags,
)
from engines.backends.tensorrt.inspect import inspect_plan
from engines.backends.tensorrt.library import (
    cuda_flavour,
    errors_or,
    first_line,
    import_tensorrt,
    new_logger,
)
from engines.backends.tensorrt.runner import TensorRTRunner
from engines.device import gpu_device_info
from engines.errors import BackendUnavailable, BuildFailed, EngineError, StoreCorrupted
from engines.types import BuildOptions, DeviceSignature, Signature


def _driver_too_old() -> str:
    try:
        versions = (
            f"it supports CUDA {cuda.driver_version()}, cuda-python needs CUDA {cuda.runtime_version()}"
        )
    except EngineError:
        versions = "cuda-python needs a newer CUDA"
    return (
        f"the NVIDIA driver is too old ({versions}; the CUDA 13 packages need driver R580 or "
        "newer): upgrade the driver, or install kiln[gpu-cu12] on hosts with a CUDA 12 driver"
    )


class TensorRTBackend(Backend):
    """Builds and loads TensorRT engines on CUDA device ``device_index``.

    ``build`` runs in a build child process (one builder per thread: TensorRT
    builders are not thread-safe). ``load`` may run on any thread; the runner it
    returns serves ``instances`` concurrent ``infer`` calls.
    """

    name = "tensorrt"
    artifact_suffix = ".plan"

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index

    @classmethod
    def probe(cls, device_index: int = 0) -> tuple[bool, str]:
        """(True, "TensorRT x.y on <GPU>") when tensorrt imports and CUDA device
        ``device_index`` (the one this backend will use) is usable.

        Never raises: a broken native install can raise anything at import time.
        """
        try:
            trt = import_tensorrt()
            version = str(trt.__version__)
        except EngineError as exc:
            return False, exc.message
        except Exception as exc:  # a broken native library fails in its own ways
            return False, f"tensorrt does not import ({first_line(exc)})"
        try:
            count = cuda.device_count()
            if count < 1:
                return False, "no CUDA device is visible"
            if device_index >= count:
                return False, f"CUDA device {device_index} is not visible (this process sees {count})"
            gpu_name = cuda.device_properties(device_index).name
        except cuda.CudaError as exc:
            if exc.details.get("error") == "cudaErrorInsufficientDriver":
                return False, f"TensorRT {version} imports but {_driver_too_old()}"
            return False, f"TensorRT {version} imports but no CUDA device is usable ({exc.message})"
        except EngineError as exc:
            return False, f"TensorRT {version} imports but no CUDA device is usable ({exc.message})"
        except Exception as exc:  # cuda-python failing outside its result codes
            return False, f"TensorRT {version} imports but CUDA is not usable ({first_line(exc)})"
        short_version = ".".join(version.split(".")[:2])
        return True, f"TensorRT {short_version} on {gpu_name}"

    def device_signature(self) -> DeviceSignature:
        """What a plan depends on: the full TensorRT version and the CUDA it was built for
        (``cuda_flavour``), the GPU (see ``gpu_device_info``), OS and architecture."""
        trt = import_tensorrt()
        info = gpu_device_info(self.device_index)
        if info is None:
            raise BackendUnavailable(f"CUDA device {self.device_index} is not visible")
        version = str(trt.__version__)
        return DeviceSignature(
            backend=self.name,
            backend_version=version,
            device={
                **info,
                "tensorrt_cuda": cuda_flavour(version),
                "os": platform.system(),
                "arch": platform.machine(),
            },
        )

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
        """Build a plan from ``onnx_path`` and write header + plan to ``output_path`` atomically.

        Returns the build report: profile, builder settings, timing cache, fusion
        report and the TensorRT messages at WARNING and above. Raises
        ``UnsupportedModel`` (parser or type problems, naming nodes and operators)
        or ``BuildFailed`` (options, profile, or the builder returning no plan).
        """
        trt = import_tensorrt()
        cuda.set_device(self.device_index)
        device = self.device_signature()
        self._check_options(options)
        logger = new_logger(trt)
        started = time.perf_counter()

        # The builder, network, parser (which owns the weights) and config live only in
        # build_plan: their memory is released before the plan is deserialized again below.
        built = build_plan(trt, logger, onnx_path, signature, options, timing_cache_path, progress)
        plan_view = memoryview(built.plan).cast("B")
        profile_shapes = built.profile
        profile_report = {
            name: {"min": list(low), "opt": list(optimal), "max": list(high)}
            for name, (low, optimal, high) in profile_shapes.items()
        }
        header = pack_artifact_header(
            {
                "format": 1,
                "tensorrt_version": str(trt.__version__),
                "device_signature": device.to_dict(),
                "profile": profile_report,
            }
        )
        write_atomically(output_path, [header, plan_view])
        build_seconds = time.perf_counter() - started
        progress("build", 1.0)

        progress("inspect", 0.0)
        fusion = inspect_plan(trt, logger, plan_view, built.network_layers, profile_shapes)
        progress("inspect", 1.0)
        return {
            "tensorrt_version": str(trt.__version__),
            "device": device.device,
            "strongly_typed": network_flags(trt) != 0,
            "profile": profile_report,
            "builder": {
                "workspace_bytes": options.workspace_bytes,
                "optimization_level": options.optimization_level,
                "profiling_verbosity": "DETAILED",
            },
            "timing_cache": built.timing_cache,
            "plan_bytes": plan_view.nbytes,
            "build_seconds": round(build_seconds, 3),
            "fusion": fusion,
            "build_log": logger.messages(),
        }

    @staticmethod
    def _check_options(options: BuildOptions) -> None:
        if options.max_batch_size < 1:
            raise BuildFailed(f"max_batch_size must be at least 1, got {options.max_batch_size}")
        if options.workspace_bytes is not None and options.workspace_bytes <= 0:
            raise BuildFailed(f"workspace_bytes must be positive, got {options.workspace_bytes}")
        level = options.optimization_level
        if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
            raise BuildFailed(
                f"optimization_level must be between 0 and {MAX_OPTIMIZATION_LEVEL} "
                f"(TensorRT's default is 3), got {level}"
            )

    def load(
        self,
        artifact_path: Path,
        signature: Signature,
        options: BuildOptions,
        *,
        instances: int = 1,
    ) -> Runner:
        """Deserialize the plan and set up ``instances`` slots.

        Raises ``StoreCorrupted`` for an unreadable plan or one recorded for another
        device signature (naming both), ``UnsupportedModel`` for engine
        I/O kiln cannot serve, ``BackendUnavailable`` without TensorRT or a device.
        """
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        trt = import_tensorrt()
        cuda.set_device(self.device_index)
        metadata, plan = split_artifact(artifact_path.read_bytes())
        if metadata is not None:
            recorded = metadata.get("device_signature")
            current = json.loads(json.dumps(self.device_signature().to_dict()))
            if recorded != current:
                raise StoreCorrupted(
                    f"the engine {artifact_path.name} was built for "
                    f"{describe_signature(recorded)}, this machine is "
                    f"{describe_signature(current)}; it must be rebuilt",
                    details={"recorded": recorded, "current": current},
                )
        logger = new_logger(trt)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise StoreCorrupted(
                f"TensorRT could not deserialize the engine {artifact_path.name}: "
                + errors_or(logger, "no reason logged"),
                details={"log": logger.messages()},
            )
        return TensorRTRunner(
            trt=trt,
            logger=logger,
            runtime=runtime,
            engine=engine,
            signature=signature,
            max_batch_size=options.max_batch_size if signature.batchable else 1,
            instances=instances,
            device_index=self.device_index,
        )
