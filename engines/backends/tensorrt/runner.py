"""Running a deserialized engine: a pool of slots, each one context, stream and buffer set.

One deserialized engine is shared by a pool of ``instances`` slots, each one
execution context, one non-default stream and pinned host plus device buffers
sized for the profile's largest shapes. An ``infer`` call holds one slot, so a
context is never used by two threads at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.backends import cuda
from engines.backends.base import Runner
from engines.backends.tensorrt.library import check_io_types, dims, errors_or, numpy_dtype, volume
from engines.errors import BackendUnavailable, EngineError, InvalidInput, StoreCorrupted, UnsupportedModel
from engines.types import DYNAMIC, Signature

_log = logging.getLogger("engines.backends.tensorrt")


class TensorRTExecutionError(EngineError):
    """TensorRT failed while running a batch that passed the input checks."""

    kind = "inference_failed"


@dataclass(frozen=True)
class _TensorBinding:
    """One engine I/O tensor and the largest shape a slot must hold for it."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @property
    def max_nbytes(self) -> int:
        return volume(self.max_shape) * self.dtype.itemsize


@dataclass
class _Slot:
    """What one concurrent inference owns: a context, a stream and its buffers."""

    context: Any
    stream: cuda.Stream | None = None
    device: dict[str, cuda.DeviceBuffer] = field(default_factory=dict)
    host: dict[str, cuda.PinnedBuffer] = field(default_factory=dict)

    def release(self) -> list[str]:
        """Drop the context, free buffers, destroy the stream; returns the errors met."""
        problems: list[str] = []
        self.context = None
        buffers: list[cuda.DeviceBuffer | cuda.PinnedBuffer] = [
            *self.device.values(),
            *self.host.values(),
        ]
        for buffer in buffers:
            try:
                buffer.free()
            except cuda.CudaError as exc:
                problems.append(exc.message)
        self.device.clear()
        self.host.clear()
        if self.stream is not None:
            try:
                self.stream.destroy()
            except cuda.CudaError as exc:
                problems.append(exc.message)
            self.stream = None
        return problems


class _SlotPool:
    """A blocking pool of slots. ``close`` waits until every slot is back, then hands all over."""

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self._all = list(slots)
        self._free = list(slots)
        self._condition = threading.Condition()
        self._closed = False

    def acquire(self) -> _Slot:
        """A free slot, waiting for one. Raises ``InvalidInput`` once the pool is closed."""
        with self._condition:
            while not self._free and not self._closed:
                self._condition.wait()
            if self._closed:
                raise InvalidInput("engine is closed")
            return self._free.pop()

    def release(self, slot: _Slot) -> None:
        with self._condition:
            self._free.append(slot)
            self._condition.notify_all()

    def close(self) -> list[_Slot]:
        """Refuse new work, wait for running work to return its slots, return all slots."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            while len(self._free) < len(self._all):
                self._condition.wait()
            slots, self._all, self._free = self._all, [], []
            return slots


class TensorRTRunner(Runner):
    """Runs a deserialized TensorRT engine with a pool of execution slots.

    Owns the logger, runtime and engine it is given and every slot it makes.
    ``infer`` may be called from any thread (each thread binds the device once);
    it blocks while all slots are busy. ``close`` waits for running calls, then
    frees buffers and streams and drops the contexts before the engine.
    """

    def __init__(
        self,
        *,
        trt: Any,
        logger: Any,
        runtime: Any,
        engine: Any,
        signature: Signature,
        max_batch_size: int,
        instances: int,
        device_index: int,
    ) -> None:
        super().__init__(signature, max_batch_size)
        self._logger = logger
        self._runtime = runtime
        self._engine = engine
        self._device_index = device_index
        self._thread_state = threading.local()
        self._thread_state.device_bound = True  # load() bound the device in this thread
        inputs, output_dtypes = self._describe_io(trt)
        if signature.batchable:
            limits = [binding.max_shape[0] for binding in inputs if binding.max_shape]
            if limits:
                self.max_batch_size = min(max_batch_size, *limits)
        slots: list[_Slot] = []
        try:
            first = _Slot(context=self._create_context())
            slots.append(first)
            outputs = self._describe_outputs(first.context, inputs, output_dtypes)
            self._inputs = inputs
            self._outputs = outputs
            self._allocate(first)
            for _ in range(instances - 1):
                slot = _Slot(context=self._create_context())
                slots.append(slot)
                self._allocate(slot)
        except BaseException:
            for slot in slots:
                slot.release()
            self._engine = None
            self._runtime = None
            raise
        self._pool = _SlotPool(slots)

    # -- set-up ------------------------------------------------------------------

    def _io_names(self, trt: Any) -> tuple[list[str], list[str]]:
        engine = self._engine
        inputs, outputs = [], []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(name)
            else:
                outputs.append(name)
        return inputs, outputs

    def _describe_io(self, trt: Any) -> tuple[list[_TensorBinding], dict[str, np.dtype[Any]]]:
        """Input bindings with their profile ranges, and the output dtypes (in engine order)."""
        engine = self._engine
        input_names, output_names = self._io_names(trt)
        expected_inputs = {spec.name for spec in self.signature.inputs}
        expected_outputs = {spec.name for spec in self.signature.outputs}
        if set(input_names) != expected_inputs or set(output_names) != expected_outputs:
            raise StoreCorrupted(
                f"the engine's inputs {sorted(input_names)} and outputs {sorted(output_names)} "
                f"do not match the model's {sorted(expected_inputs)} and "
                f"{sorted(expected_outputs)}"
            )
        dtypes: dict[str, np.dtype[Any]] = {}
        for name in [*input_names, *output_names]:
            if engine.is_shape_inference_io(name):
                raise UnsupportedModel(
                    f"'{name}' is a shape tensor; kiln serves engines whose inputs and outputs are data"
                )
            dtypes[name] = numpy_dtype(trt, engine.get_tensor_dtype(name), f"'{name}'")
        check_io_types([(name, dtypes[name]) for name in input_names], self.signature.inputs, "input")
        check_io_types([(name, dtypes[name]) for name in output_names], self.signature.outputs, "output")
        bindings = []
        for name in input_names:
            shape = dims(engine.get_tensor_shape(name))
            if DYNAMIC in shape:
                low, _, high = (dims(bound) for bound in engine.get_tensor_profile_shape(name, 0))
            else:
                low = high = shape
            bindings.append(_TensorBinding(name, True, dtypes[name], low, high))
        return bindings, {name: dtypes[name] for name in output_names}

    def _create_context(self) -> Any:
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(
                "TensorRT could not create an execution context (out of GPU memory?): "
                + errors_or(self._logger, "no reason logged")
            )
        return context

    def _describe_outputs(
        self,
        context: Any,
        inputs: Sequence[_TensorBinding],
        output_dtypes: Mapping[str, np.dtype[Any]],
    ) -> list[_TensorBinding]:
        """Output bindings sized by the output shapes at the profile's largest input shapes."""
        for binding in inputs:
            if not context.set_input_shape(binding.name, binding.max_shape):
                raise StoreCorrupted(
                    f"the engine refused its own maximum shape {list(binding.max_shape)} for "
                    f"input '{binding.name}': " + errors_or(self._logger, "no reason logged")
                )
        unresolved = context.infer_shapes()
        if unresolved:
            raise UnsupportedModel(f"TensorRT cannot infer the shapes of {sorted(unresolved)}")
        outputs = []
        for name, dtype in output_dtypes.items():
            shape = dims(context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise UnsupportedModel(
                    f"output '{name}' has a data-dependent shape {list(shape)} (e.g. NonZero or "
                    "NonMaxSuppression); the TensorRT runner needs output shapes that follow from "
                    "the input shapes"
                )
            outputs.append(_TensorBinding(name, False, dtype, shape, shape))
        return outputs

    def _allocate(self, slot: _Slot) -> None:
        slot.stream = cuda.Stream()
        for binding in [*self._inputs, *self._outputs]:
            slot.device[binding.name] = cuda.DeviceBuffer(binding.max_nbytes)
            slot.host[binding.name] = cuda.PinnedBuffer(binding.max_nbytes)

    def _bind_device(self) -> None:
        # CUDA's current device is per thread; bind it once in each calling thread.
        if not getattr(self._thread_state, "device_bound", False):
            cuda.set_device(self._device_index)
            self._thread_state.device_bound = True

    # -- inference ---------------------------------------------------------------

    def _check_ranges(self, feeds: Mapping[str, np.ndarray]) -> None:
        for binding in self._inputs:
            shape = feeds[binding.name].shape
            for axis, (size, low, high) in enumerate(
                zip(shape, binding.min_shape, binding.max_shape, strict=True)
            ):
                if not low <= size <= high:
                    raise InvalidInput(
                        f"input '{binding.name}' has shape {list(shape)}: dimension {axis} must be "
                        f"within {low}..{high} for this engine (its profile spans "
                        f"{list(binding.min_shape)} to {list(binding.max_shape)})"
                    )

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_ranges(feeds)
        self._bind_device()
        slot = self._pool.acquire()
        try:
            return self._run(slot, feeds)
        finally:
            self._pool.release(slot)

    def _run(self, slot: _Slot, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        context = slot.context
        stream = slot.stream
        assert stream is not None
        for binding in self._inputs:
            shape = tuple(feeds[binding.name].shape)
            if not context.set_input_shape(binding.name, shape):
                raise InvalidInput(
                    f"TensorRT refused shape {list(shape)} for input '{binding.name}': "
                    + errors_or(self._logger, "outside the engine's profile")
                )
        unresolved = context.infer_shapes()
        if unresolved:
            raise TensorRTExecutionError(f"TensorRT could not infer the shapes of {sorted(unresolved)}")
        for binding in [*self._inputs, *self._outputs]:
            context.set_tensor_address(binding.name, slot.device[binding.name].ptr)
        try:
            for binding in self._inputs:
                array = feeds[binding.name]
                host = slot.host[binding.name].view(binding.dtype, tuple(array.shape))
                np.copyto(host, array, casting="no")
                cuda.memcpy_htod_async(
                    slot.device[binding.name].ptr, slot.host[binding.name].ptr, host.nbytes, stream
                )
            if not context.execute_async_v3(stream.handle):
                raise TensorRTExecutionError(
                    "TensorRT failed to enqueue the batch: " + errors_or(self._logger, "no reason logged")
                )
            shapes = {}
            for binding in self._outputs:
                shape = dims(context.get_tensor_shape(binding.name))
                nbytes = volume(shape) * binding.dtype.itemsize
                if any(dim < 0 for dim in shape) or nbytes > binding.max_nbytes:
                    raise TensorRTExecutionError(
                        f"output '{binding.name}' came out with shape {list(shape)}, beyond the "
                        f"{list(binding.max_shape)} its buffer was sized for"
                    )
                shapes[binding.name] = shape
                cuda.memcpy_dtoh_async(
                    slot.host[binding.name].ptr, slot.device[binding.name].ptr, nbytes, stream
                )
            stream.synchronize()
        except BaseException:
            # The slot goes back to the pool: nothing of this call may still be in flight.
            try:
                stream.synchronize()
            except cuda.CudaError as exc:
                _log.error("could not drain a TensorRT stream after a failed batch: %s", exc.message)
            raise
        return {
            binding.name: slot.host[binding.name].view(binding.dtype, shapes[binding.name]).copy()
            for binding in self._outputs
        }

    # -- shutdown ----------------------------------------------------------------

    def _close(self) -> None:
        slots = self._pool.close()
        problems: list[str] = []
        try:
            self._bind_device()
        except cuda.CudaError as exc:
            problems.append(exc.message)
        for slot in slots:
            problems.extend(slot.release())
        # Contexts are gone with their slots; the engine goes before the runtime.
        self._engine = None
        self._runtime = None
        if problems:
            _log.warning("closing a TensorRT runner: %s", "; ".join(problems))
