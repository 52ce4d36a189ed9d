"""Which engine serves a version: the baseline (the upload at FP32 on ONNX Runtime,
servable within seconds) or the optimized engine its build produced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engines.baseline import BASELINE_BACKEND, BASELINE_PRECISION


class Tier(StrEnum):
    BASELINE = "baseline"
    OPTIMIZED = "optimized"


@dataclass(frozen=True)
class Serving:
    """The engine behind a version's batcher, and since when (Unix time).
    ``provider`` is ONNX Runtime's execution provider where ONNX Runtime serves."""

    tier: Tier
    backend: str
    precision: str
    provider: str | None = None
    since: float = field(default_factory=time.time)

    @classmethod
    def baseline(cls, provider: str) -> Serving:
        return cls(Tier.BASELINE, BASELINE_BACKEND, BASELINE_PRECISION, provider)

    @classmethod
    def optimized(cls, meta: dict[str, Any], runner: Any) -> Serving:
        """From a committed engine's metadata and its loaded runner."""
        return cls(
            Tier.OPTIMIZED,
            str(meta.get("backend")),
            str(meta.get("precision")),
            getattr(runner, "provider", None),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tier": str(self.tier),
            "backend": self.backend,
            "precision": self.precision,
            "provider": self.provider,
            "since": self.since,
        }
