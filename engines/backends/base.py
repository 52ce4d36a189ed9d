"""The contract every backend implements: build an engine artifact, load it as a Runner.

A backend turns an ONNX file (already precision-transformed) into an artifact file,
and loads that artifact into a ``Runner``. Backends import their heavy libraries
lazily so that choosing a backend never fails on a missing library.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engines.errors import InvalidInput
from engines.types import DYNAMIC, BuildOptions, DeviceSignature, Signature

ProgressCallback = Callable[[str, float], None]
"""Called with (phase name, fraction of that phase done in [0, 1])."""


def no_progress(phase: str, fraction: float) -> None:
    """A progress callback that ignores its calls."""


class Runner(ABC):
    """A loaded engine that runs inference.

    ``infer`` is thread-safe: the service calls it from up to ``instances`` worker
    threads at once. It checks the feeds against the signature, then calls the
    backend's ``_infer``. Outputs are fresh arrays owned by the caller.
    """

    def __init__(self, signature: Signature, max_batch_size: int) -> None:
        self.signature = signature
        self.max_batch_size = max_batch_size
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def inputs(self) -> tuple[Any, ...]:
        return self.signature.inputs

    @property
    def outputs(self) -> tuple[Any, ...]:
        return self.signature.outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises ``InvalidInput`` when a feed does not fit the signature."""
        if self._closed:
            raise InvalidInput("engine is closed")
        self.check_feeds(feeds)
        return self._infer(feeds)

    def infer_prechecked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch whose parts each passed ``check_feeds`` (the batcher's case:
        concatenating checked requests along axis 0, within ``max_batch_size``,
        keeps them valid), without checking again on the worker thread."""
        if self._closed:
            raise InvalidInput("engine is closed")
        return self._infer(feeds)

    def check_feeds(self, feeds: Mapping[str, np.ndarray], *, max_rows: int | None = None) -> None:
        """Raise ``InvalidInput`` unless ``feeds`` fit the signature: names, dtypes,
        shapes, one batch size of 1 to ``max_batch_size`` rows (or to ``max_rows``,
        for callers that split bigger requests into engine-sized runs)."""
        expected = {spec.name for spec in self.signature.inputs}
        missing = expected - feeds.keys()
        extra = feeds.keys() - expected
        if missing:
            raise InvalidInput(f"missing input(s): {', '.join(sorted(missing))}")
        if extra:
            raise InvalidInput(
                f"unknown input(s): {', '.join(sorted(extra))}; "
                f"this engine takes {', '.join(sorted(expected))}"
            )
        batch_sizes = set()
        for spec in self.signature.inputs:
            array = feeds[spec.name]
            if array.dtype != np.dtype(spec.dtype):
                raise InvalidInput(
                    f"input '{spec.name}' has dtype {array.dtype}, the engine takes {spec.dtype}"
                )
            if array.ndim != spec.rank:
                raise InvalidInput(
                    f"input '{spec.name}' has rank {array.ndim} (shape {list(array.shape)}), "
                    f"the engine takes rank {spec.rank} (shape {list(spec.shape)})"
                )
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
                if want != DYNAMIC and got != want:
                    raise InvalidInput(
                        f"input '{spec.name}' has shape {list(array.shape)}, "
                        f"dimension {axis} must be {want} (engine shape {list(spec.shape)})"
                    )
            if self.signature.batchable:
                batch_sizes.add(array.shape[0])
        if self.signature.batchable:
            if len(batch_sizes) > 1:
                raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
            batch = batch_sizes.pop()
            if batch < 1:
                raise InvalidInput("the request has no rows: send at least one")
            if max_rows is None and batch > self.max_batch_size:
                raise InvalidInput(
                    f"batch of {batch} rows is outside this engine's range 1..{self.max_batch_size}"
                )
            if max_rows is not None and batch > max(max_rows, self.max_batch_size):
                raise InvalidInput(
                    f"the request has {batch} rows; this server takes at most "
                    f"{max(max_rows, self.max_batch_size)} in one request (KILN_MAX_REQUEST_ROWS): "
                    "send the rest in further requests"
                )

    @abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend-specific inference on already-checked feeds."""

    def close(self) -> None:
        """Release the engine's resources. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Backend-specific release of resources."""


class Backend(ABC):
    """Builds and loads engines for one kind of device."""

    name: ClassVar[str]
    artifact_suffix: ClassVar[str]

    @classmethod
    @abstractmethod
    def probe(cls) -> tuple[bool, str]:
        """Whether this backend can run here, and a one-line reason either way."""

    @abstractmethod
    def device_signature(self) -> DeviceSignature:
        """The backend version and device facts an engine built here is tied to."""

    @abstractmethod
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
        """Build an engine from ``onnx_path`` and write it to ``output_path``.

        Returns the backend's part of the build report (fusion report, build log).
        Raises ``BuildFailed`` or ``UnsupportedModel`` with a reason the user can act on.
        Runs in a build child process, never on the server's event loop.
        """

    @abstractmethod
    def load(
        self,
        artifact_path: Path,
        signature: Signature,
        options: BuildOptions,
        *,
        instances: int = 1,
    ) -> Runner:
        """Load an artifact this backend built; ``instances`` concurrent ``infer`` calls."""
