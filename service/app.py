"""``create_app(settings)``: assembles routers, error handlers and the lifespan.

The lifespan owns the lifecycle: open the store and its catalog (the store's own
records on a single node, PostgreSQL with ``KILN_CATALOG_URL``) → pick the
backend → follow the catalog (its first pass restores the engines: load, warm up,
start batchers in the background; readiness waits for them) → serve; on
shutdown: readiness off, stop following, drain the batchers, stop builds, close
runners and the catalog. Nothing is built at import time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from engines.backends import select_backend
from engines.store import EngineStore
from service import health, tracing
from service.catalog.base import VersionCatalog
from service.catalog.postgres import PostgresCatalog, new_replica_id
from service.catalog.store import StoreCatalog
from service.errors import install_error_handlers
from service.lifecycle import routes as engines
from service.lifecycle.jobs import BuildRunner
from service.lifecycle.manager import EngineManager
from service.lifecycle.reconcile import Reconciler
from service.lifecycle.registry import Registry
from service.metrics import KilnMetrics
from service.protocols import kserve
from service.protocols import native as predict
from service.protocols.fastpath import FastPathApp
from service.request_id import RequestIdMiddleware
from service.settings import Settings
from service.state import AppState
from service.ui import router as ui_router

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("kiln")

SECOND_SERVER_HINT = (
    "one server per store without a catalog. To run several servers on one store, give "
    "every one the same KILN_CATALOG_URL=postgresql://… (see docs/OPERATIONS.md)"
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        replica_id = new_replica_id() if settings.catalog_url is not None else None
        store = EngineStore(settings.store, temp_owner=replica_id)
        catalog = _catalog(settings, store, replica_id)
        backend, reason = select_backend(settings.backend, settings.backend_options())
        log.info("backend: %s", reason)
        metrics = KilnMetrics(cluster=catalog.shared)
        _register_gpu_metrics(metrics)
        registry = Registry(retry_elsewhere=catalog.shared)
        builds = BuildRunner(workers=settings.build_workers, timeout_s=settings.build_timeout_s)
        manager = EngineManager(settings, store, registry, backend, metrics, builds, catalog)
        reconciler = Reconciler(catalog, manager)
        state = AppState(
            settings=settings,
            store=store,
            registry=registry,
            backend=backend,
            backend_reason=reason,
            metrics=metrics,
            manager=manager,
            catalog=catalog,
            reconciler=reconciler,
            api_keys=settings.all_api_keys(),
        )
        app.state.kiln = state
        # Loads run in the background; /health/ready answers 503 until they end.
        tracing.start_from_environment()
        grpc_server = await _start_grpc(state)
        await reconciler.start()
        if isinstance(catalog, PostgresCatalog):
            log.info("cluster mode: replica %s, catalog %s", replica_id, catalog.display_url)
        try:
            yield
        finally:
            state.draining = True
            if grpc_server is not None:
                await grpc_server.stop(min(settings.drain_timeout_s, 5.0))
            await reconciler.stop()
            # Under `kiln serve` the drain ran before this; this only bounds what is left.
            await manager.shutdown(min(settings.drain_timeout_s, 5.0))
            await catalog.close()
            state.offload.close()
            tracing.shutdown()
            log.info("kiln stopped")

    app = FastPathApp(
        title="kiln",
        summary="Inference server for ONNX models: optimized engines, dynamic batching, KServe v2.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # service.ui serves /docs from a local Swagger UI; ReDoc needs a CDN: off
        redoc_url=None,
    )
    install_error_handlers(app)
    # Outermost middleware: every answer carries X-Request-ID (the fast path sets its own).
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(engines.router)
    app.include_router(predict.router)
    app.include_router(kserve.router)
    app.include_router(ui_router)

    @app.get("/metrics", tags=["metrics"], include_in_schema=True)
    async def metrics_endpoint(request: Request) -> Response:
        state: AppState = request.app.state.kiln
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _start_grpc(state: AppState) -> grpc.aio.Server | None:
    """The gRPC server on this event loop (None when KILN_GRPC_PORT is 0)."""
    if not state.settings.grpc_port:
        return None
    from service.protocols.grpc.server import start_grpc_server

    return await start_grpc_server(state)


def _catalog(settings: Settings, store: EngineStore, replica_id: str | None) -> VersionCatalog:
    """PostgreSQL with ``KILN_CATALOG_URL`` (several replicas), else the store's own records."""
    if settings.catalog_url is not None and replica_id is not None:
        return PostgresCatalog(settings.catalog_url, replica_id, lease_ttl_s=settings.catalog_lease_ttl_s)
    return StoreCatalog(
        store,
        lease_ttl_s=settings.catalog_lease_ttl_s,
        lock_hint=SECOND_SERVER_HINT,
        default_progressive=settings.progressive,
    )


def _register_gpu_metrics(metrics: KilnMetrics) -> None:
    try:
        from service.gpu_metrics import register_gpu_collector
    except ImportError:
        return
    register_gpu_collector(metrics.registry)
