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
from engines.backends.tensorrt.library import (
    CallLog,
    check_io_types,
    dims,
    errors_or,
    first_line,
    io_names,
    numpy_dtype,
    volume,
)
from engines.errors import (
    BackendUnavailable,
    DeviceLost,
    InferenceFailed,
    InvalidInput,
    StoreCorrupted,
    UnsupportedModel,
)
from engines.types import DYNAMIC, Signature

_log = logging.getLogger("engines.backends.tensorrt")


class TensorRTExecutionError(InferenceFailed):
    """TensorRT failed while running a batch that passed the input checks."""


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

    def grow(self, name: str, nbytes: int) -> None:
        """Replace the device and host buffers of ``name`` with ones of ``nbytes``."""
        self.device.pop(name).free()
        self.device[name] = cuda.DeviceBuffer(nbytes)
        self.host.pop(name).free()
        self.host[name] = cuda.PinnedBuffer(nbytes)

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


def output_shapes_at(
    context: Any,
    input_shapes: Mapping[str, tuple[int, ...]],
    output_names: Sequence[str],
    logger: Any,
) -> dict[str, tuple[int, ...]]:
    """Every output's shape for ``input_shapes``, which are set on ``context``.

    Raises ``UnsupportedModel`` for an output whose shape depends on the data
    (NonZero, NonMaxSuppression), which this runner cannot size, and
    ``StoreCorrupted`` when the engine refuses shapes from its own profile.
    """
    with logger.capture() as call:
        for name, shape in input_shapes.items():
            if not context.set_input_shape(name, shape):
                raise StoreCorrupted(
                    f"the engine refused its own profile shape {list(shape)} for input '{name}': "
                    + call.errors_or("no reason logged")
                )
        try:
            unresolved = context.infer_shapes()
        except RuntimeError as exc:
            raise UnsupportedModel(
                "TensorRT cannot infer the output shapes at the profile's largest inputs: "
                + call.errors_or(first_line(exc))
            ) from exc
    if unresolved:
        raise UnsupportedModel(f"TensorRT cannot infer the shapes of {sorted(unresolved)}")
    shapes = {name: dims(context.get_tensor_shape(name)) for name in output_names}
    for name, shape in shapes.items():
        if any(dim < 0 for dim in shape):
            raise UnsupportedModel(
                f"output '{name}' has a data-dependent shape {list(shape)} (e.g. NonZero or "
                "NonMaxSuppression); the TensorRT runner needs output shapes that follow from "
                "the input shapes"
            )
    return shapes


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
        self._lost: DeviceLost | None = None
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

    def _describe_io(self, trt: Any) -> tuple[list[_TensorBinding], dict[str, np.dtype[Any]]]:
        """Input bindings with their profile ranges, and the output dtypes (in engine order)."""
        engine = self._engine
        input_names, output_names = io_names(trt, engine)
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
        maximum = {binding.name: binding.max_shape for binding in inputs}
        shapes = output_shapes_at(context, maximum, list(output_dtypes), self._logger)
        return [
            _TensorBinding(name, False, dtype, shapes[name], shapes[name])
            for name, dtype in output_dtypes.items()
        ]

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
        if self._lost is not None:
            raise self._lost  # the device cannot run anything until the process restarts
        self._check_ranges(feeds)
        try:
            self._bind_device()
            slot = self._pool.acquire()
            try:
                with self._logger.capture() as call:
                    return self._run(slot, feeds, call)
            finally:
                self._pool.release(slot)
        except DeviceLost as exc:
            self._lost = exc
            _log.critical("the GPU is lost for this process: %s", exc.message)
            raise

    def _run(self, slot: _Slot, feeds: Mapping[str, np.ndarray], call: CallLog) -> dict[str, np.ndarray]:
        context = slot.context
        stream = slot.stream
        assert stream is not None
        for binding in self._inputs:
            shape = tuple(feeds[binding.name].shape)
            if not context.set_input_shape(binding.name, shape):
                raise InvalidInput(
                    f"TensorRT refused shape {list(shape)} for input '{binding.name}': "
                    + call.errors_or("outside the engine's profile")
                )
        output_shapes = self._infer_output_shapes(context, feeds, call)
        # Buffers are sized at the profile's largest inputs, but an output need not be
        # largest there (e.g. a slice that shrinks as an input grows): grow it before
        # TensorRT is given the address, since kernels write the whole output.
        for binding in self._outputs:
            nbytes = volume(output_shapes[binding.name]) * binding.dtype.itemsize
            if nbytes > slot.device[binding.name].nbytes:
                slot.grow(binding.name, nbytes)
        for binding in [*self._inputs, *self._outputs]:
            if not context.set_tensor_address(binding.name, slot.device[binding.name].ptr):
                raise TensorRTExecutionError(
                    f"TensorRT refused the address of '{binding.name}': " + call.errors_or("no reason logged")
                )
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
                    "TensorRT failed to enqueue the batch: " + call.errors_or("no reason logged")
                )
            for binding in self._outputs:
                nbytes = volume(output_shapes[binding.name]) * binding.dtype.itemsize
                cuda.memcpy_dtoh_async(
                    slot.host[binding.name].ptr, slot.device[binding.name].ptr, nbytes, stream
                )
            stream.synchronize()
        except BaseException as exc:
            # The slot goes back to the pool: nothing of this call may still be in flight.
            try:
                stream.synchronize()
            except cuda.CudaDeviceLost as lost:
                raise lost from exc  # the real cause of a failed enqueue
            except cuda.CudaError as drain_error:
                _log.error("could not drain a TensorRT stream after a failed batch: %s", drain_error.message)
            raise
        return {
            binding.name: slot.host[binding.name].view(binding.dtype, output_shapes[binding.name]).copy()
            for binding in self._outputs
        }

    def _infer_output_shapes(
        self, context: Any, feeds: Mapping[str, np.ndarray], call: CallLog
    ) -> dict[str, tuple[int, ...]]:
        """The output shapes for the input shapes just set; final once ``infer_shapes`` succeeds."""
        try:
            unresolved = context.infer_shapes()
        except RuntimeError as exc:
            # TensorRT raises when the shapes are each in range but disagree with each
            # other (a shared named dimension, a Reshape that does not divide).
            given = ", ".join(f"'{name}' {list(array.shape)}" for name, array in feeds.items())
            raise InvalidInput(
                f"TensorRT cannot run these input shapes together ({given}): "
                + call.errors_or(first_line(exc))
                + "; inputs that share a dimension in the model must agree on its length"
            ) from exc
        if unresolved:
            raise TensorRTExecutionError(f"TensorRT could not infer the shapes of {sorted(unresolved)}")
        shapes = {binding.name: dims(context.get_tensor_shape(binding.name)) for binding in self._outputs}
        for name, shape in shapes.items():
            if any(dim < 0 for dim in shape):
                raise TensorRTExecutionError(f"output '{name}' has a data-dependent shape {list(shape)}")
        return shapes

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
