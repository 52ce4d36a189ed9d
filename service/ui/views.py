"""The JSON behind each view of the page: the catalog's versions (in a cluster, the
cluster's), each with this server's state, its serving tier and every live
replica's state, as the management API answers them.

Fields that only some statuses have (a version's ``serving`` tier, per-replica
``replicas`` counts and ``replica_states``) are passed through when the status
carries them, so the page shows them where they exist and nothing breaks where
they don't.
"""

from __future__ import annotations

from typing import Any

from service.health import not_ready_reason
from service.lifecycle import views as management
from service.lifecycle.states import SERVABLE, WORKING
from service.state import AppState
from service.ui.sampler import TrafficSampler

POLL_S = 2.0
"""How often the page asks for a view while it is visible (documented in OPERATIONS.md)."""

OPTIONAL_FIELDS = ("serving", "replicas", "replica_states")


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


async def overview(state: AppState, sampler: TrafficSampler) -> dict[str, Any]:
    """Every engine's newest version with its current traffic, and every build in progress."""
    records = await management.records(state)
    replicas = await state.catalog.live_replicas()
    engines: list[dict[str, Any]] = []
    builds: list[dict[str, Any]] = []
    for name, versions in management.by_name(records).items():
        statuses = [management.status(state, record, replicas) for record in versions]
        latest = _version_row(statuses[-1])
        latest["versions"] = len(versions)
        # What predictions without a version get from this server.
        ready = [s["version"] for s in statuses if s["state"] in SERVABLE]
        latest["ready_version"] = ready[-1] if ready else None
        latest["traffic"] = sampler.latest(name)
        engines.append(latest)
        builds.extend(_version_row(s) for s in statuses if s["state"] in WORKING)
    return {
        "server": {
            "backend": state.backend.name,
            "backend_reason": state.backend_reason,
            "not_ready_reason": not_ready_reason(state),
            "draining": state.draining,
            # In a cluster: this replica, and that the page shows every replica's state.
            "cluster": state.catalog.shared,
            "replica": state.catalog.replica_id if state.catalog.shared else None,
        },
        "engines": engines,
        "builds": builds,
        "poll_s": POLL_S,
    }


async def engine(state: AppState, sampler: TrafficSampler, name: str) -> dict[str, Any]:
    """One engine: every version's full status (newest first) and its live series."""
    records = await management.records(state, name)
    replicas = await state.catalog.live_replicas()
    return {
        "name": name,
        "cluster": state.catalog.shared,
        "replica": state.catalog.replica_id if state.catalog.shared else None,
        "versions": [management.status(state, record, replicas) for record in reversed(records)],
        "traffic": sampler.series(name),
        "sample_interval_s": sampler.interval_s,
        "window_s": sampler.window_s,
        "poll_s": POLL_S,
    }
