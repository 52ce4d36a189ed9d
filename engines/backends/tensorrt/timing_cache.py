"""The store's timing cache for one device signature, loaded before and merged after a build."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engines.backends.tensorrt.artifact import write_atomically
from engines.backends.tensorrt.library import first_line


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock on ``path`` + ".lock" between processes (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class TimingCacheFile:
    """The store's timing cache for one device signature, loaded before and merged after a build.

    Writers serialise on a lock file and merge with whatever another build wrote
    meanwhile, so no build's measurements are lost; the write is atomic. Problems
    with the cache never fail a build: they become warnings in the report.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.loaded_bytes = 0
        self.written_bytes = 0

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            self.warnings.append(f"could not read the timing cache: {exc}")
            return b""

    def _create(self, config: Any, saved: bytes) -> Any:
        try:
            cache = config.create_timing_cache(saved)
        except (RuntimeError, TypeError, ValueError) as exc:
            self.warnings.append(f"the timing cache could not be read, starting empty: {first_line(exc)}")
            cache = None
        if cache is None and saved:
            cache = config.create_timing_cache(b"")
        return cache

    def attach(self, config: Any) -> None:
        """Load the saved cache into ``config`` (an empty one when there is none).

        ``loaded_bytes`` counts only a saved cache TensorRT actually took: an invalid
        blob is not an error there, TensorRT logs a warning and starts an empty cache
        (NVIDIA/TensorRT#1413), which is told apart by comparing with a fresh one.
        """
        saved = self._read()
        cache = self._create(config, saved)
        if cache is None:
            self.warnings.append("TensorRT could not create a timing cache; building without one")
            return
        if saved and _serialized(cache) == _serialized(config.create_timing_cache(b"")):
            self.warnings.append(
                f"the saved timing cache ({len(saved)} bytes) is invalid and TensorRT discarded it; "
                "starting empty"
            )
            saved = b""
        if not config.set_timing_cache(cache, False):
            self.warnings.append("the saved timing cache does not match this device; starting empty")
            cache = config.create_timing_cache(b"")
            if cache is None or not config.set_timing_cache(cache, False):
                self.warnings.append("TensorRT refused an empty timing cache; building without one")
            return
        self.loaded_bytes = len(saved)

    def save(self, config: Any) -> None:
        """Merge the build's cache with the file's latest contents and write it back."""
        try:
            with exclusive_lock(self.path):
                cache = config.get_timing_cache()
                if cache is None:
                    return
                latest = self._read()
                if latest:
                    disk_cache = self._create(config, latest)
                    if disk_cache is not None and not cache.combine(disk_cache, False):
                        self.warnings.append("could not merge with the timing cache on disk; replacing it")
                serialized = cache.serialize()
                self.written_bytes = write_atomically(self.path, [memoryview(serialized)])
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            self.warnings.append(f"could not save the timing cache: {first_line(exc)}")

    def report(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "loaded_bytes": self.loaded_bytes,
            "written_bytes": self.written_bytes,
            "warnings": list(self.warnings),
        }


def _serialized(cache: Any) -> bytes:
    return bytes(memoryview(cache.serialize()).cast("B"))
