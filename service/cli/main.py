"""The ``kiln`` command: ``serve``, ``build`` (offline, with a progress bar), ``bench``,
and ``catalog import`` / ``catalog retry``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("kiln")

UPLOAD_OPTIONS = (
    "precision",
    "calibration",
    "calibration_method",
    "validation",
    "tolerance",
    "metrics",
    "shapes",
    "max_batch_size",
    "opt_batch_size",
    "preferred_batch_sizes",
    "max_queue_delay_ms",
    "max_queue_size",
    "timeout_ms",
    "instances",
    "latency_target_ms",
    "priority_levels",
    "default_priority_level",
    "workspace_bytes",
    "optimization_level",
    "repair",
    "repair_max_nodes",
    "repair_seconds",
    "progressive",
)
"""Every option an upload takes (the fields of ``UploadFields`` and the data files);
``kiln build`` offers each as a flag and passes it on as the same text."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _settings(overrides: dict[str, Any]) -> Any:
    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"KILN_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SystemExit(f"kiln: invalid settings: {problems}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from service.logs import configure_logging
    from service.server import run_server

    settings = _settings(
        {
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "store": args.store,
            "backend": args.backend,
        }
    )
    configure_logging(settings.log_level, settings.log_json)
    try:
        keys = settings.all_api_keys()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"kiln: KILN_API_KEYS_FILE cannot be read: {exc}", file=sys.stderr)
        return 2
    if not keys and not _is_loopback(settings.host):
        if not settings.allow_unauthenticated:
            print(
                f"kiln: refusing to listen on {settings.host} without API keys. Set KILN_API_KEYS "
                "(or KILN_API_KEYS_FILE), or KILN_ALLOW_UNAUTHENTICATED=true to serve without "
                "authentication on purpose.",
                file=sys.stderr,
            )
            return 2
        log.warning("serving on %s WITHOUT authentication (KILN_ALLOW_UNAUTHENTICATED)", settings.host)
    elif not keys:
        log.info("no API keys configured; listening on loopback only (%s)", settings.host)
    if settings.catalog_url is None and not _store_is_free(settings.store):
        return 1
    run_server(settings)
    return 0


def _store_is_free(store_root: Path) -> bool:
    """Say so plainly when another server holds the store (the server takes the lock
    for itself at start-up; this only spares a traceback)."""
    from engines.errors import StoreInUse
    from engines.store import EngineStore
    from service.app import SECOND_SERVER_HINT

    store = EngineStore(store_root)
    try:
        store.lock_exclusive(hint=SECOND_SERVER_HINT)
    except StoreInUse as exc:
        print(f"kiln: {exc.message}", file=sys.stderr)
        return False
    store.unlock()
    return True


def cmd_build(args: argparse.Namespace) -> int:
    """Build an engine into a store through the server's own lifecycle (validate,
    register, build in a child process, load, warm up); a server on that store then
    serves it. Bad input exits 2 with one line, a failed build 1."""
    import asyncio

    from engines.errors import EngineError
    from service.errors import ServiceError

    settings = _settings({"store": args.store, "backend": args.backend})
    if settings.catalog_url:
        print(
            "kiln: KILN_CATALOG_URL is set: in a cluster, upload models through a server's API "
            "(POST /engines); kiln build writes a single-node store",
            file=sys.stderr,
        )
        return 2
    from engines.sources import is_uri

    remote = is_uri(args.model)
    model_path = Path(args.model)
    if not remote and not model_path.is_file():
        print(f"kiln: no such model file: {model_path}", file=sys.stderr)
        return 2
    file_name = args.model.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    fields = {"name": args.name or re.sub(r"\.(onnx|zip|tar|tar\.gz|tgz)$", "", file_name)}
    if remote:
        fields["source"] = args.model
    if args.sha256:
        fields["sha256"] = args.sha256
    files: dict[str, Path] = {}
    for option in UPLOAD_OPTIONS:
        value = getattr(args, option)
        if value is None:
            continue
        if option in ("calibration", "validation") and is_uri(value):
            fields[f"{option}_source"] = value
        elif option == "calibration" and value != "synthetic":
            files["calibration"] = Path(value)
        elif option == "validation":
            files["validation"] = Path(value)
        else:
            fields[option] = value
    for purpose, path in files.items():
        if not path.is_file():
            print(f"kiln: no such {purpose} file: {path}", file=sys.stderr)
            return 2
    # The build's own lines would repeat what the summary or the error line says.
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return asyncio.run(_build(settings, fields, model_path, files))
    except (ServiceError, EngineError) as exc:
        print(f"kiln: {exc.message}", file=sys.stderr)
        return 2
    finally:
        log.setLevel(level)


async def _build(settings: Any, fields: dict[str, str], model: Path, paths: dict[str, Path]) -> int:
    import asyncio

    from tqdm import tqdm

    from engines.backends import select_backend
    from engines.store import EngineStore, sha256_file
    from service.catalog.store import StoreCatalog
    from service.lifecycle.jobs import BuildRunner
    from service.lifecycle.manager import EngineManager
    from service.lifecycle.reconcile import Reconciler
    from service.lifecycle.registry import Registry
    from service.lifecycle.sources import FetchedSources, check_sha256, fetch_sources
    from service.lifecycle.states import WORKING, VersionState
    from service.lifecycle.uploads import UploadedFile
    from service.lifecycle.versions import register_version
    from service.metrics import KilnMetrics

    store = EngineStore(settings.store)
    catalog = StoreCatalog(
        store,
        lock_hint="stop the server on this store, or upload the model through its API",
        default_progressive=settings.progressive,
    )
    backend, reason = select_backend(settings.backend, settings.backend_options())
    manager = EngineManager(
        settings,
        store,
        Registry(),
        backend,
        KilnMetrics(),
        BuildRunner(1, settings.build_timeout_s),
        catalog,
        baselines=False,  # it serves nothing; the record keeps the progressive choice for servers
    )
    reconciler = Reconciler(catalog, manager)
    await catalog.start()  # the store's lock, for the whole build
    try:
        print(f"backend: {reason}")
        files: dict[str, UploadedFile] = {}
        fetched = FetchedSources()
        try:
            for purpose, path in paths.items():
                staged = store.temp_path(path.suffix)
                shutil.copyfile(path, staged)
                files[purpose] = UploadedFile(
                    purpose, path.name, staged, staged.stat().st_size, sha256_file(staged)
                )
            if "source" not in fields and "sha256" in fields:
                actual = await asyncio.to_thread(sha256_file, model)
                check_sha256(actual, fields.pop("sha256"), "the model file")
            fetched = await fetch_sources(fields, files, False, store, settings)
            files.update(fetched.files)
            version = await register_version(
                manager,
                fields,
                files,
                model_data=fetched.model_data,
                model_on_disk=None if "model" in fetched.files else model,
            )
            with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% {desc}") as bar:
                while version.state in WORKING:
                    bar.set_description_str(version.phase or "")
                    bar.n = round(100 * version.progress, 1)
                    bar.refresh()
                    await asyncio.sleep(0.1)
                bar.n = round(100 * version.progress, 1)
                bar.set_description_str(str(version.state))
                bar.refresh()
            await reconciler.settle()  # records the outcome: a server restores it as such
        finally:
            for uploaded in files.values():
                uploaded.path.unlink(missing_ok=True)
            fetched.discard()
            await manager.shutdown(0)
    finally:
        await catalog.close()  # for callers in this process (tests); exit releases it too
    if version.state == VersionState.FALLBACK:
        error = version.error or {}
        print(f"kiln: built, not as requested (fallback): {error.get('message')}", file=sys.stderr)
        return 1
    if version.state != VersionState.READY:
        error = version.error or {}
        print(f"kiln: build failed ({error.get('type')}): {error.get('message')}", file=sys.stderr)
        return 1
    meta = version.meta or {}
    summary = {
        "name": version.name,
        "version": version.version,
        "backend": meta.get("backend"),
        "precision": meta.get("precision"),
        "batchable": meta.get("signature", {}).get("batchable"),
        "latency_ms": meta.get("report", {}).get("latency_ms"),
        "artifact_bytes": meta.get("artifact_bytes"),
    }
    if "repair" in meta.get("report", {}):
        summary["kept_fp32"] = [node["name"] for node in meta["report"]["repair"]["kept_fp32"]]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_catalog_import(args: argparse.Namespace) -> int:
    """Add a single-node store's versions and engines to the cluster's catalog."""
    import asyncio

    from engines.errors import StoreInUse
    from engines.store import EngineStore
    from service.catalog.base import CatalogUnavailable
    from service.catalog.importer import import_store
    from service.catalog.postgres import PostgresCatalog

    settings = _settings({"store": args.store, "catalog_url": args.catalog_url})
    if not settings.catalog_url:
        print("kiln: set KILN_CATALOG_URL (or --catalog-url) to the cluster's catalog", file=sys.stderr)
        return 2

    async def run() -> Any:
        catalog = PostgresCatalog(settings.catalog_url, "import", lease_ttl_s=settings.catalog_lease_ttl_s)
        await catalog.start()
        try:
            return await import_store(
                EngineStore(settings.store),
                catalog,
                lock_hint="stop the single-node server before importing its store",
            )
        finally:
            await catalog.close()

    try:
        report = asyncio.run(run())
    except StoreInUse as exc:
        print(f"kiln: {exc.message}", file=sys.stderr)
        return 2
    except (CatalogUnavailable, ValueError) as exc:
        print(f"kiln: import failed, nothing was added: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"imported": report.versions, "engines": report.engines, "skipped": report.skipped}, indent=2
        )
    )
    return 0


def cmd_catalog_retry(args: argparse.Namespace) -> int:
    """Start failed versions again: their failed builds are tried afresh (with all
    their retries), and every replica loads them again where they failed."""
    import asyncio

    from engines.errors import StoreInUse
    from engines.store import EngineStore
    from service.catalog.base import CatalogUnavailable, VersionCatalog
    from service.catalog.postgres import PostgresCatalog
    from service.catalog.store import StoreCatalog

    settings = _settings({"store": args.store, "catalog_url": args.catalog_url})
    catalog: VersionCatalog
    if settings.catalog_url:
        catalog = PostgresCatalog(settings.catalog_url, "cli", lease_ttl_s=settings.catalog_lease_ttl_s)
    else:
        catalog = StoreCatalog(
            EngineStore(settings.store),
            lock_hint=f"while a server runs, ask it: POST /engines/{args.name}"
            + (f"/versions/{args.version}" if args.version else "")
            + "/retry",
        )

    async def run() -> list[int]:
        await catalog.start()
        try:
            return await catalog.retry_version(args.name, args.version)
        finally:
            await catalog.close()

    try:
        retried = asyncio.run(run())
    except StoreInUse as exc:
        print(f"kiln: {exc.message}", file=sys.stderr)
        return 2
    except CatalogUnavailable as exc:
        print(f"kiln: {exc.message}", file=sys.stderr)
        return 1
    if not retried:
        missing = (
            f"engine '{args.name}' has no version {args.version}"
            if args.version
            else f"no engine named '{args.name}'"
        )
        print(f"kiln: {missing} in the catalog", file=sys.stderr)
        return 1
    print(json.dumps({"name": args.name, "retried_versions": retried}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from service.cli.bench import run_bench_cli

    return run_bench_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Inference server for ONNX models.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (flags override KILN_* settings)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grpc-port", type=int, help="gRPC port (KILN_GRPC_PORT, default 8001; 0 = off)")
    serve.add_argument("--store", help="store directory (KILN_STORE)")
    serve.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"])
    serve.set_defaults(func=cmd_serve)

    build = sub.add_parser("build", help="build an engine offline into a store")
    build.add_argument(
        "model",
        help="the .onnx model (its external data files beside it), or a .zip, .tar or .tar.gz "
        "archive of the model and its data files: a path, or an s3://bucket/key or https:// URI",
    )
    build.add_argument("--store", help="store directory (KILN_STORE)")
    build.add_argument("--name", help="engine name (default: the file name without .onnx)")
    build.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"])
    build.add_argument(
        "--calibration",
        help=".npz calibration data for int8 (a path or a URI), or 'synthetic' to calibrate on random data",
    )
    build.add_argument("--validation", help=".npz validation data for the accuracy check (a path or a URI)")
    build.add_argument("--sha256", help="the model file's expected sha256, checked before anything is built")
    for option in UPLOAD_OPTIONS:
        if option not in ("calibration", "validation"):
            build.add_argument(
                f"--{option.replace('_', '-')}",
                help=f"the upload field '{option}' (same syntax; see docs/API.md)",
            )
    build.set_defaults(func=cmd_build)

    catalog = sub.add_parser("catalog", help="manage the cluster catalog (KILN_CATALOG_URL)")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    catalog_import = catalog_sub.add_parser(
        "import", help="add a single-node store's versions and engines to the catalog (stop its server first)"
    )
    catalog_import.add_argument("--store", help="store directory (KILN_STORE)")
    catalog_import.add_argument("--catalog-url", help="postgresql://… (KILN_CATALOG_URL)")
    catalog_import.set_defaults(func=cmd_catalog_import)
    catalog_retry = catalog_sub.add_parser(
        "retry",
        help="start failed versions of an engine again (their failed builds afresh); without "
        "KILN_CATALOG_URL, a stopped single node's store",
    )
    catalog_retry.add_argument("name", help="the engine's name")
    catalog_retry.add_argument("--version", type=int, help="only this version (default: every version)")
    catalog_retry.add_argument("--store", help="store directory (KILN_STORE), for a single node")
    catalog_retry.add_argument("--catalog-url", help="postgresql://… (KILN_CATALOG_URL)")
    catalog_retry.set_defaults(func=cmd_catalog_retry)

    bench = sub.add_parser("bench", help="load-test a running kiln server")
    from service.cli.bench import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
