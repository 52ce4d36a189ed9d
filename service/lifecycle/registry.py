"""The registry: name → versions, with each version's state, runner and batcher.

The single source of truth for what is servable (``EngineVersion.servable``).
Records are persisted through a ``RecordStore`` (today the engine store's
``records/<name>/<version>.json``) when a version is registered and whenever it
settles, so a restart on the same store serves the same engines.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.backends.base import Runner
from engines.types import BuildOptions, Signature
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import BadRequest, NotFound, NotReady
from service.lifecycle.serving import Serving
from service.lifecycle.states import SERVABLE, VersionState, check_move

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or name in (".", ".."):
        raise BadRequest("engine names are 1-64 characters of letters, digits, '_', '-' and '.'")
    return name


class RecordStore(Protocol):
    """Where version records persist (the engine store; a database could stand in)."""

    def save_record(self, record: dict[str, Any]) -> None: ...

    def delete_record(self, name: str, version: int) -> None: ...

    def load_records(self) -> tuple[list[dict[str, Any]], list[str]]: ...


@dataclass(eq=False)
class EngineVersion:
    name: str
    version: int
    model_sha256: str
    options: BuildOptions
    batching: BatchingConfig
    cache_key: str
    _state: VersionState = VersionState.BUILDING
    phase: str | None = "queued"
    progress: float = 0.0
    error: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    model_filename: str = ""
    progressive: bool = False
    serving: Serving | None = None
    runner: Runner | None = None
    batcher: DynamicBatcher | None = None
    _signature: Signature | None = field(default=None, repr=False)

    @property
    def state(self) -> VersionState:
        return self._state

    @property
    def servable(self) -> bool:
        """Requests can run on this version now."""
        return self._state in SERVABLE and self.batcher is not None

    def move_to(self, state: VersionState) -> None:
        """Change the state; only ``EngineManager.transition`` calls this."""
        check_move(self._state, state)
        self._state = state

    @property
    def signature(self) -> Signature | None:
        """The engine's signature: the built engine's (parsed once), else the baseline
        engine's while it serves; None before either."""
        if self._signature is None and self.meta is not None:
            self._signature = Signature.from_dict(self.meta["signature"])
        if self._signature is None and self.runner is not None:
            return self.runner.signature
        return self._signature

    @property
    def url(self) -> str:
        return f"/engines/{self.name}/versions/{self.version}"

    def record(self) -> dict[str, Any]:
        """What is persisted in the store."""
        return {
            "name": self.name,
            "version": self.version,
            "model_sha256": self.model_sha256,
            "model_filename": self.model_filename,
            "options": self.options.to_dict(),
            "batching": self.batching.to_dict(),
            "cache_key": self.cache_key,
            "state": str(self.state),
            "error": self.error,
            "created_at": self.created_at,
            "progressive": self.progressive,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], state: VersionState) -> EngineVersion:
        """A version read back from its record, starting in ``state``."""
        return cls(
            name=record["name"],
            version=int(record["version"]),
            model_sha256=record["model_sha256"],
            model_filename=record.get("model_filename", ""),
            options=BuildOptions.from_dict(record["options"]),
            batching=BatchingConfig.from_dict(record["batching"]),
            cache_key=record["cache_key"],
            _state=state,
            error=record.get("error"),
            created_at=float(record.get("created_at", time.time())),
            progressive=bool(record.get("progressive", False)),
        )

    def _adaptive_status(self) -> dict[str, Any] | None:
        if self.batcher is None or self.batching.latency_target_ms is None:
            return None
        delay_s, cap = self.batcher.plan
        return {"delay_ms": round(delay_s * 1000, 3), "batch_cap": cap}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "state": str(self.state), "url": self.url}

    def status(self) -> dict[str, Any]:
        report: dict[str, Any] | None = None
        if self.meta is not None:
            report = {
                "backend": self.meta.get("backend"),
                "device": self.meta.get("device"),
                "precision": self.meta.get("precision"),
                "signature": self.meta.get("signature"),
                "max_batch_size": self.meta.get("max_batch_size"),
                "artifact_bytes": self.meta.get("artifact_bytes"),
                "cache_key": self.cache_key,
                **(self.meta.get("report") or {}),
            }
        return {
            "name": self.name,
            "version": self.version,
            "state": str(self.state),
            "phase": self.phase,
            "progress": round(self.progress, 4),
            "error": self.error,
            "progressive": self.progressive,
            "serving": self.serving.to_dict() if self.serving is not None else None,
            "model_sha256": self.model_sha256,
            "model_filename": self.model_filename,
            "created_at": self.created_at,
            "build_options": self.options.to_dict(),
            "batching": self.batching.to_dict(),
            "adaptive": self._adaptive_status(),
            "report": report,
        }


class Registry:
    """Engine versions by name. Event-loop only: no locking needed."""

    def __init__(self, records: RecordStore) -> None:
        self.records = records
        self._engines: dict[str, dict[int, EngineVersion]] = {}

    def names(self) -> list[str]:
        return sorted(self._engines)

    def versions(self, name: str) -> list[EngineVersion]:
        versions = self._engines.get(name)
        if not versions:
            raise NotFound(f"no engine named '{name}'")
        return [versions[v] for v in sorted(versions)]

    def all_versions(self) -> list[EngineVersion]:
        return [ev for name in self.names() for ev in self.versions(name)]

    def next_version(self, name: str) -> int:
        """The number the next version of ``name`` gets: the only place versions are numbered."""
        return max(self._engines.get(name, {0: None}), default=0) + 1

    def add(self, version: EngineVersion) -> None:
        self.index(version)
        self.save(version)

    def index(self, version: EngineVersion) -> None:
        """Index a version read back from its record (nothing is written)."""
        self._engines.setdefault(version.name, {})[version.version] = version

    def load(self) -> None:
        """Index every readable record in its recorded state, for a process that only
        registers versions (``kiln build``); a server restores through the manager."""
        records, _ = self.records.load_records()
        for record in records:
            try:
                self.index(EngineVersion.from_record(record, VersionState(record["state"])))
            except (KeyError, ValueError, TypeError):
                continue  # the server that restores it says why

    def save(self, version: EngineVersion) -> None:
        self.records.save_record(version.record())

    def remove(self, version: EngineVersion) -> None:
        versions = self._engines.get(version.name, {})
        versions.pop(version.version, None)
        if not versions:
            self._engines.pop(version.name, None)
        self.records.delete_record(version.name, version.version)

    def get(self, name: str, version: int | None = None) -> EngineVersion:
        """A version by number, or the newest version; raises ``NotFound``."""
        versions = self.versions(name)
        if version is None:
            return versions[-1]
        found = self._engines[name].get(version)
        if found is None:
            raise NotFound(f"engine '{name}' has no version {version}")
        return found

    def servable(self, name: str, version: int | None = None) -> EngineVersion:
        """The version to run a request on: the given one, or the newest ready one.

        Raises ``NotFound``, or ``NotReady`` (409) naming the state."""
        if version is not None:
            found = self.get(name, version)
            if not found.servable:
                raise NotReady(
                    f"engine '{name}' version {version} is {found.state}, not ready",
                )
            return found
        versions = self.versions(name)
        for candidate in reversed(versions):
            if candidate.servable:
                return candidate
        latest = versions[-1]
        raise NotReady(f"engine '{name}' has no ready version; version {latest.version} is {latest.state}")

    def count_by_state(self) -> dict[str, int]:
        counts = {str(state): 0 for state in VersionState}
        for version in self.all_versions():
            counts[str(version.state)] += 1
        return counts
