"""What the app holds while it runs, and the small dependencies that reach it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from engines.backends.base import Backend
from engines.store import EngineStore
from service.catalog.base import VersionCatalog
from service.lifecycle.manager import EngineManager
from service.lifecycle.reconcile import Reconciler
from service.lifecycle.registry import Registry
from service.metrics import KilnMetrics
from service.protocols.offload import Offload
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    store: EngineStore
    registry: Registry
    backend: Backend
    backend_reason: str
    metrics: KilnMetrics
    manager: EngineManager
    catalog: VersionCatalog
    reconciler: Reconciler
    api_keys: list[str] = field(default_factory=list)
    draining: bool = False
    offload: Offload = field(default_factory=Offload)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.kiln
    return state
