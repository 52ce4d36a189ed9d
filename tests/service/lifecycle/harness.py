"""A lifecycle in the test's process: the real manager, registry, single-node catalog
(the store's records) and reconciler, with whatever backend and build runner the
test brings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.store import EngineStore
from service.catalog.store import StoreCatalog
from service.lifecycle.manager import EngineManager
from service.lifecycle.reconcile import Reconciler
from service.lifecycle.registry import Registry
from service.metrics import KilnMetrics
from service.settings import Settings


@dataclass
class Running:
    manager: EngineManager
    reconciler: Reconciler
    catalog: StoreCatalog

    async def stop(self) -> None:
        await self.reconciler.stop()
        await self.manager.shutdown(0.5)
        await self.catalog.close()


async def start_lifecycle(settings: Settings, store: EngineStore, backend: Any, builds: Any) -> Running:
    """Open the store's catalog and follow it (its first pass is the restore)."""
    catalog = StoreCatalog(store, lease_ttl_s=settings.catalog_lease_ttl_s)
    manager = EngineManager(settings, store, Registry(), backend, KilnMetrics(), builds, catalog)
    reconciler = Reconciler(catalog, manager)
    await reconciler.start()
    return Running(manager, reconciler, catalog)
