"""Management answers in cluster mode: what exists comes from the catalog, and each
version carries this replica's state plus how many live replicas hold it in each
state. Raises ``CatalogUnavailable`` (503) while the database is away."""

from __future__ import annotations

from typing import Any

from service.catalog.base import VersionRecord
from service.catalog.replica import ClusterReplica
from service.errors import NotFound
from service.state import AppState


def _here(state: AppState, record: VersionRecord) -> dict[str, Any]:
    """This replica's status of a catalog version (``pending`` until it adopts it)."""
    try:
        return state.registry.get(record.name, record.version).status()
    except NotFound:
        return {
            "name": record.name,
            "version": record.version,
            "state": "pending",
            "phase": None,
            "progress": 0.0,
        }


def _counts(replicas: dict[str, dict[str, str]], record: VersionRecord) -> dict[str, int]:
    counts: dict[str, int] = {}
    for loaded in replicas.values():
        held = loaded.get(f"{record.name}/{record.version}")
        if held is not None:
            counts[held] = counts.get(held, 0) + 1
    return counts


def _status(state: AppState, record: VersionRecord, replicas: dict[str, dict[str, str]]) -> dict[str, Any]:
    return {
        **_here(state, record),
        "catalog_state": record.state,
        "catalog_error": record.error,
        "replicas": _counts(replicas, record),
    }


def _summary(record: VersionRecord, local_state: str) -> dict[str, Any]:
    url = f"/engines/{record.name}/versions/{record.version}"
    return {"name": record.name, "version": record.version, "state": local_state, "url": url}


async def _records(cluster: ClusterReplica, name: str | None = None) -> list[VersionRecord]:
    records = await cluster.catalog.versions()
    if name is None:
        return records
    found = [record for record in records if record.name == name]
    if not found:
        raise NotFound(f"no engine named '{name}'")
    return found


async def list_engines(state: AppState, cluster: ClusterReplica) -> list[dict[str, Any]]:
    records = await _records(cluster)
    replicas = await cluster.catalog.live_replicas()
    by_name: dict[str, list[VersionRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    engines = []
    for versions in by_name.values():
        latest = _status(state, versions[-1], replicas)
        engines.append(
            {
                **_summary(versions[-1], latest["state"]),
                "versions": [v.version for v in versions],
                "phase": latest["phase"],
                "progress": latest["progress"],
                "replicas": latest["replicas"],
            }
        )
    return engines


async def engine(state: AppState, cluster: ClusterReplica, name: str) -> dict[str, Any]:
    versions = await _records(cluster, name)
    replicas = await cluster.catalog.live_replicas()
    return {
        **_status(state, versions[-1], replicas),
        "versions": [_summary(v, _here(state, v)["state"]) for v in versions],
    }


async def engine_version(state: AppState, cluster: ClusterReplica, name: str, version: int) -> dict[str, Any]:
    for record in await _records(cluster, name):
        if record.version == version:
            return _status(state, record, await cluster.catalog.live_replicas())
    raise NotFound(f"engine '{name}' has no version {version}")


async def delete(cluster: ClusterReplica, name: str, version: int | None) -> dict[str, Any]:
    """Remove from the catalog; every replica (this one first) unloads on its next pass."""
    removed = await cluster.catalog.delete_versions(name, None if version is None else [version])
    if not removed:
        raise NotFound(
            f"no engine named '{name}'" if version is None else f"engine '{name}' has no version {version}"
        )
    await cluster.reconcile()
    return {"name": name, "deleted_versions": removed}
