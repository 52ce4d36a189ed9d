"""``create_app(settings)``: assembles routers, error handlers and the lifespan.

The lifespan owns the lifecycle: open the store → pick the backend → start
restoring engines (load, warm up, start batchers in the background: readiness
waits for them) → serve; on shutdown: readiness off,
drain the batchers, stop builds, close runners. Nothing is built at import time.
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
from service.catalog.postgres import PostgresCatalog
from service.catalog.replica import ClusterReplica, new_replica_id
from service.errors import install_error_handlers
from service.lifecycle import routes as engines
from service.lifecycle.jobs import BuildRunner
from service.lifecycle.manager import EngineManager
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
        cluster = settings.catalog_url is not None
        replica_id = new_replica_id() if cluster else None
        store = EngineStore(settings.store, temp_owner=replica_id)
        if not cluster:
            store.lock_exclusive(hint=SECOND_SERVER_HINT)
        backend, reason = select_backend(settings.backend, settings.backend_options())
        log.info("backend: %s", reason)
        metrics = KilnMetrics(cluster=cluster)
        _register_gpu_metrics(metrics)
        registry = Registry(store, cluster=cluster)
        builds = BuildRunner(workers=settings.build_workers, timeout_s=settings.build_timeout_s)
        manager = EngineManager(settings, store, registry, backend, metrics, builds)
        state = AppState(
            settings=settings,
            store=store,
            registry=registry,
            backend=backend,
            backend_reason=reason,
            metrics=metrics,
            manager=manager,
            api_keys=settings.all_api_keys(),
        )
        app.state.kiln = state
        # Loads run in the background; /health/ready answers 503 until they end.
        tracing.start_from_environment()
        grpc_server = await _start_grpc(state)
        if settings.catalog_url is not None and replica_id is not None and metrics.catalog is not None:
            catalog = PostgresCatalog(
                settings.catalog_url, replica_id, lease_ttl_s=settings.catalog_lease_ttl_s
            )
            state.cluster = manager.cluster = ClusterReplica(
                catalog,
                manager,
                metrics.catalog,
                resync_s=settings.catalog_resync_s,
                gc_grace_s=10 * settings.catalog_lease_ttl_s,
            )
            await state.cluster.start()
            log.info("cluster mode: replica %s, catalog %s", replica_id, catalog.display_url)
        else:
            await manager.restore()
        try:
            yield
        finally:
            state.draining = True
            if grpc_server is not None:
                await grpc_server.stop(min(settings.drain_timeout_s, 5.0))
            if state.cluster is not None:
                await state.cluster.stop()
            # Under `kiln serve` the drain ran before this; this only bounds what is left.
            await manager.shutdown(min(settings.drain_timeout_s, 5.0))
            state.offload.close()
            tracing.shutdown()
            store.unlock()
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


def _register_gpu_metrics(metrics: KilnMetrics) -> None:
    try:
        from service.gpu_metrics import register_gpu_collector
    except ImportError:
        return
    register_gpu_collector(metrics.registry)
