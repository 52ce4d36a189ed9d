"""The registry: name → versions held by this process, with each version's state,
runner and batcher.

The single source of truth for what is servable here (``EngineVersion.servable``).
It persists nothing: what versions exist is the catalog's to say
(``service/catalog``); the registry follows it (``service/lifecycle/reconcile.py``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from engines.backends.base import Runner
from engines.types import BuildOptions, Signature
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import BadRequest, NotFound, NotReady, Unavailable
from service.lifecycle.serving import Serving
from service.lifecycle.states import SERVABLE, WORKING, VersionState, check_move

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or name in (".", ".."):
        raise BadRequest("engine names are 1-64 characters of letters, digits, '_', '-' and '.'")
    return name


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
    # Retries: the catalog's ``retries`` this version last started from; failed
    # attempts here since (a load, say); when the next one is due (time.monotonic());
    # ``final``: its build failed for good in the catalog, nothing to retry here.
    retries: int = 0
    attempts: int = 0
    retry_at: float | None = None
    final: bool = False

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
    def retry_in_s(self) -> float | None:
        """Seconds until this process tries a failed version again (None: no retry is due)."""
        if self.retry_at is None:
            return None
        return round(max(0.0, self.retry_at - time.monotonic()), 1)

    @property
    def url(self) -> str:
        return f"/engines/{self.name}/versions/{self.version}"

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
            "attempts": self.attempts,
            "retry_in_s": self.retry_in_s,
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

    def __init__(self, *, retry_elsewhere: bool = False) -> None:
        # With other replicas, a version that exists but is not loaded here yet is a
        # 503 to retry (maybe on another replica), not a 409.
        self.retry_elsewhere = retry_elsewhere
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

    def index(self, version: EngineVersion) -> None:
        self._engines.setdefault(version.name, {})[version.version] = version

    def remove(self, version: EngineVersion) -> None:
        versions = self._engines.get(version.name, {})
        if versions.get(version.version) is version:
            del versions[version.version]
        if not versions:
            self._engines.pop(version.name, None)

    def find(self, name: str, version: int) -> EngineVersion | None:
        return self._engines.get(name, {}).get(version)

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
                self._not_ready(f"engine '{name}' version {version} is {found.state}, not ready", found)
            return found
        versions = self.versions(name)
        for candidate in reversed(versions):
            if candidate.servable:
                return candidate
        latest = versions[-1]
        self._not_ready(
            f"engine '{name}' has no ready version; version {latest.version} is {latest.state}", latest
        )

    def _not_ready(self, message: str, version: EngineVersion) -> NoReturn:
        if self.retry_elsewhere and version.state in WORKING:
            raise Unavailable(f"{message} on this replica yet", headers={"Retry-After": "1"})
        raise NotReady(message)

    def count_by_state(self) -> dict[str, int]:
        counts = {str(state): 0 for state in VersionState}
        for version in self.all_versions():
            counts[str(version.state)] += 1
        return counts
