"""The management answers: what exists comes from the catalog; each version carries
this process's state of it and what every live replica reports (a single node is
its own one replica). Deletes and retries go to the catalog, then this process
follows at once (a pass of its reconciler); the others follow on their next pass.
Raises ``CatalogUnavailable`` (503) while the catalog cannot be reached."""

from __future__ import annotations

import asyncio
from typing import Any

from service.catalog.base import ReplicaReport, VersionRecord
from service.errors import NotFound
from service.state import AppState


def _here(state: AppState, record: VersionRecord) -> dict[str, Any]:
    """This process's status of a catalog version (``pending`` until it holds it)."""
    held = state.registry.find(record.name, record.version)
    if held is not None:
        return held.status()
    return {
        "name": record.name,
        "version": record.version,
        "state": "pending",
        "phase": None,
        "progress": 0.0,
        "error": None,
        "progressive": record.progressive,
        "serving": None,
        "model_sha256": record.model_sha256,
        "model_filename": record.model_filename,
        "created_at": record.created_at,
        "build_options": record.options,
        "batching": record.batching,
        "report": None,
    }


def replica_states(replicas: dict[str, ReplicaReport], record: VersionRecord) -> list[dict[str, Any]]:
    """Each live replica's state of the version (replicas that do not hold it are left out)."""
    rows = []
    for replica_id, replica in sorted(replicas.items()):
        report = replica.versions.get(record.label)
        if report is not None:
            rows.append({"replica": replica_id, "state": report.state, **report.details()})
    return rows


def _counts(replicas: dict[str, ReplicaReport], record: VersionRecord) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in replica_states(replicas, record):
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return counts


def status(state: AppState, record: VersionRecord, replicas: dict[str, ReplicaReport]) -> dict[str, Any]:
    return {
        **_here(state, record),
        "catalog_state": record.state,
        "catalog_error": record.error,
        "replicas": _counts(replicas, record),
        "replica_states": replica_states(replicas, record),
    }


def summary(record: VersionRecord, local_state: str) -> dict[str, Any]:
    url = f"/engines/{record.name}/versions/{record.version}"
    return {"name": record.name, "version": record.version, "state": local_state, "url": url}


async def records(state: AppState, name: str | None = None) -> list[VersionRecord]:
    found = await state.catalog.versions()
    if name is None:
        return found
    found = [record for record in found if record.name == name]
    if not found:
        raise NotFound(f"no engine named '{name}'")
    return found


def by_name(found: list[VersionRecord]) -> dict[str, list[VersionRecord]]:
    grouped: dict[str, list[VersionRecord]] = {}
    for record in found:
        grouped.setdefault(record.name, []).append(record)
    return grouped


async def list_engines(state: AppState) -> list[dict[str, Any]]:
    found = await records(state)
    replicas = await state.catalog.live_replicas()
    engines = []
    for versions in by_name(found).values():
        latest = status(state, versions[-1], replicas)
        engines.append(
            {
                **summary(versions[-1], latest["state"]),
                "versions": [v.version for v in versions],
                "phase": latest["phase"],
                "progress": latest["progress"],
                "replicas": latest["replicas"],
            }
        )
    return engines


async def engine(state: AppState, name: str) -> dict[str, Any]:
    versions = await records(state, name)
    replicas = await state.catalog.live_replicas()
    return {
        **status(state, versions[-1], replicas),
        "versions": [summary(v, _here(state, v)["state"]) for v in versions],
    }


async def engine_version(state: AppState, name: str, version: int) -> dict[str, Any]:
    for record in await records(state, name):
        if record.version == version:
            return status(state, record, await state.catalog.live_replicas())
    raise NotFound(f"engine '{name}' has no version {version}")


def _missing(name: str, version: int | None) -> NotFound:
    return NotFound(
        f"no engine named '{name}'" if version is None else f"engine '{name}' has no version {version}"
    )


async def delete(state: AppState, name: str, version: int | None) -> dict[str, Any]:
    """Remove from the catalog; this process unloads them before answering, the
    others on their next pass. Files go later, through garbage collection."""
    removed = await state.catalog.delete_versions(name, None if version is None else [version])
    if not removed:
        raise _missing(name, version)
    await state.reconciler.sync()
    unloading = [
        state.manager.unload(held) for number in removed if (held := state.registry.find(name, number))
    ]
    await asyncio.gather(*(asyncio.shield(task) for task in unloading))
    return {"name": name, "deleted_versions": removed}


async def retry(state: AppState, name: str, version: int | None) -> dict[str, Any]:
    """Start failed versions again on every replica: their failed builds are reset
    (tried afresh, with all their retries) and replicas try their loads again."""
    retried = await state.catalog.retry_version(name, version)
    if not retried:
        raise _missing(name, version)
    await state.reconciler.sync()
    return {"name": name, "retried_versions": retried}
