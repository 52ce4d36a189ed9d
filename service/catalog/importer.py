"""``kiln catalog import``: the upgrade path from a single-node store to a cluster.

Reads the store's records and committed engines (under the store's exclusive
lock, so no single-node server may be running on it) and adds them to the
catalog with their version numbers. Ready versions keep their engines: replicas
with the same device signature load them without building. Versions a restart
had interrupted are left out (upload them again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engines.errors import StoreCorrupted
from engines.store import EngineStore
from service.catalog.base import CatalogState, VersionRecord
from service.catalog.postgres import ImportedBuild, PostgresCatalog

log = logging.getLogger("kiln.catalog")


@dataclass
class ImportReport:
    versions: list[str] = field(default_factory=list)
    engines: int = 0
    skipped: list[str] = field(default_factory=list)


def read_store(store: EngineStore) -> tuple[list[VersionRecord], list[ImportedBuild], ImportReport]:
    """The versions and committed engines a single-node store holds."""
    report = ImportReport()
    records, problems = store.load_records()
    report.skipped += [f"{problem} (unreadable)" for problem in problems]
    versions: list[VersionRecord] = []
    builds: dict[str, ImportedBuild] = {}
    for record in sorted(records, key=lambda r: (r.get("name", ""), r.get("version", 0))):
        label = f"{record.get('name')} v{record.get('version')}"
        state = record.get("state")
        if state not in ("ready", "fallback", "failed"):
            report.skipped.append(f"{label} ({state}: interrupted, upload it again)")
            continue
        try:
            versions.append(
                VersionRecord(
                    name=record["name"],
                    version=int(record["version"]),
                    model_sha256=record["model_sha256"],
                    model_filename=record.get("model_filename", ""),
                    options=record["options"],
                    batching=record["batching"],
                    state=CatalogState.FAILED if state == "failed" else CatalogState.READY,
                    error=record.get("error"),
                    created_at=float(record.get("created_at", 0.0)),
                    progressive=bool(record.get("progressive", False)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            report.skipped.append(f"{label} (malformed record: {exc})")
            continue
        report.versions.append(label)
        key = record.get("cache_key")
        if state == "failed" or not key or key in builds:
            continue
        try:
            meta = store.verify_engine(key)
        except StoreCorrupted as exc:
            log.warning("%s; replicas will rebuild it", exc.message)
            meta = None
        if meta is not None:
            builds[key] = ImportedBuild(key, record["model_sha256"], record["options"], meta)
    report.engines = len(builds)
    return versions, list(builds.values()), report


async def import_store(store: EngineStore, catalog: PostgresCatalog) -> ImportReport:
    versions, builds, report = read_store(store)
    await catalog.import_store(versions, builds)
    return report
