"""``kiln catalog import``: the upgrade path from a single-node store to a cluster.

Reads the store's catalog (its records and committed engines, under the store's
exclusive lock, so no single-node server may be running on it) and adds it to
the PostgreSQL catalog with the same version numbers; the numbering goes on from
the highest number each name ever had. Ready versions keep their engines:
replicas with the same device signature load them without building. Versions
still pending (a restart interrupted their build) come along and are built by
the cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engines.store import EngineStore
from service.catalog.base import BuildState
from service.catalog.postgres import ImportedBuild, PostgresCatalog
from service.catalog.store import StoreCatalog

log = logging.getLogger("kiln.catalog")


@dataclass
class ImportReport:
    versions: list[str] = field(default_factory=list)
    engines: int = 0
    skipped: list[str] = field(default_factory=list)


async def import_store(store: EngineStore, catalog: PostgresCatalog, *, lock_hint: str) -> ImportReport:
    """Raises ``StoreInUse`` (naming ``lock_hint``) while a server holds the store."""
    local = StoreCatalog(store, lock_hint=lock_hint)
    await local.start()
    try:
        versions = await local.versions()
        builds = [
            ImportedBuild(
                build.cache_key, build.model_sha256, dict(build.meta.get("options", {})), build.meta
            )
            for build in await local.builds()
            if build.state == BuildState.COMMITTED and build.meta is not None and build.model_sha256
        ]
        numbers = {version.name: local.highest(version.name) for version in versions}
        report = ImportReport(
            versions=[f"{v.name} v{v.version}" for v in versions], engines=len(builds), skipped=local.problems
        )
    finally:
        await local.close()
    await catalog.import_store(versions, builds, numbers)
    return report
