"""The JSON behind each view of the page, built from what the app already holds.

Fields that only some servers have (a version's ``serving`` tier, per-replica
``replicas`` counts) are passed through when the status carries them, so the page
shows them where they exist and nothing breaks where they don't.
"""

from __future__ import annotations

from typing import Any

from service.health import not_ready_reason
from service.lifecycle.states import SERVABLE, WORKING
from service.state import AppState
from service.ui.sampler import TrafficSampler

POLL_S = 2.0
"""How often the page asks for a view while it is visible (documented in OPERATIONS.md)."""

OPTIONAL_FIELDS = ("serving", "replicas")


def _precision(status: dict[str, Any]) -> dict[str, Any]:
    report = status.get("report") or {}
    return {"requested": status["build_options"].get("precision"), "chosen": report.get("precision")}


def _version_row(status: dict[str, Any]) -> dict[str, Any]:
    report = status.get("report") or {}
    row = {
        key: status.get(key)
        for key in ("name", "version", "state", "phase", "progress", "error", "created_at", "model_filename")
    }
    row["precision"] = _precision(status)
    row["backend"] = report.get("backend")
    row.update({key: status[key] for key in OPTIONAL_FIELDS if key in status})
    return row


def overview(state: AppState, sampler: TrafficSampler) -> dict[str, Any]:
    """Every engine's newest version with its current traffic, and every build in progress."""
    engines: list[dict[str, Any]] = []
    builds: list[dict[str, Any]] = []
    for name in state.registry.names():
        versions = state.registry.versions(name)
        latest = _version_row(versions[-1].status())
        latest["versions"] = len(versions)
        ready = [v.version for v in versions if v.state in SERVABLE]
        latest["ready_version"] = ready[-1] if ready else None  # what predictions without a version get
        latest["traffic"] = sampler.latest(name)
        engines.append(latest)
        builds.extend(_version_row(v.status()) for v in versions if v.state in WORKING)
    return {
        "server": {
            "backend": state.backend.name,
            "backend_reason": state.backend_reason,
            "not_ready_reason": not_ready_reason(state),
            "draining": state.draining,
        },
        "engines": engines,
        "builds": builds,
        "poll_s": POLL_S,
    }


def engine(state: AppState, sampler: TrafficSampler, name: str) -> dict[str, Any]:
    """One engine: every version's full status (newest first) and its live series."""
    versions = [v.status() for v in reversed(state.registry.versions(name))]
    return {
        "name": name,
        "versions": versions,
        "traffic": sampler.series(name),
        "sample_interval_s": sampler.interval_s,
        "window_s": sampler.window_s,
        "poll_s": POLL_S,
    }
