"""The ``kiln`` command: ``serve``, ``build`` (offline, with a progress bar) and ``bench``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

log = logging.getLogger("kiln")


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

    settings = _settings({"host": args.host, "port": args.port, "store": args.store, "backend": args.backend})
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
    run_server(settings)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build an engine offline into a store; a server on that store then serves it."""
    from tqdm import tqdm

    from engines.backends import select_backend
    from engines.build import BuildJob, overall_progress, run_build
    from engines.errors import EngineError
    from engines.onnx_model import load_model, read_signature
    from engines.store import EngineStore, sha256_file
    from engines.types import BuildOptions, Precision, engine_cache_key
    from service.batching import BatchingConfig
    from service.lifecycle.manager import EngineManager
    from service.lifecycle.registry import EngineVersion, State, check_name

    settings = _settings({"store": args.store, "backend": args.backend})
    model_path = Path(args.model)
    if not model_path.is_file():
        print(f"kiln: no such model file: {model_path}", file=sys.stderr)
        return 2
    name = check_name(args.name or model_path.stem)
    store = EngineStore(settings.store)
    backend, reason = select_backend(settings.backend, settings.backend_options())
    print(f"backend: {reason}")
    try:
        signature = read_signature(load_model(model_path))
        sha = sha256_file(model_path)
        temp = store.temp_path(".onnx")
        shutil.copyfile(model_path, temp)
        store.add_model(temp, sha)
        calibration_sha = None
        if args.calibration and args.calibration != "synthetic":
            calibration_sha = sha256_file(Path(args.calibration))
            temp = store.temp_path(".npz")
            shutil.copyfile(args.calibration, temp)
            store.add_data(temp, calibration_sha)
        options = BuildOptions(
            precision=Precision(args.precision),
            max_batch_size=args.max_batch_size,
            calibration_sha256=calibration_sha,
            synthetic_calibration=args.calibration == "synthetic",
            repair=not args.no_repair,
        )
        batching = BatchingConfig(max_batch_size=args.max_batch_size)
        key = engine_cache_key(sha, options, backend.device_signature())
        job = BuildJob(
            str(store.root),
            sha,
            options.to_dict(),
            backend.name,
            key,
            EngineManager.batch_sizes(options, batching),
            settings.backend_options().get(backend.name, {}),
        )
        with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% {desc}") as bar:

            def progress(phase: str, fraction: float) -> None:
                bar.set_description_str(phase)
                bar.n = max(bar.n, round(100 * overall_progress(phase, fraction, bar.n / 100), 1))
                bar.refresh()

            meta = run_build(job, progress)
            bar.n = 100
            bar.set_description_str("done")
            bar.refresh()
    except EngineError as exc:
        print(f"kiln: build failed ({exc.kind}): {exc.message}", file=sys.stderr)
        return 1
    records, _ = store.load_records()
    version_number = 1 + max((r["version"] for r in records if r["name"] == name), default=0)
    version = EngineVersion(
        name=name,
        version=version_number,
        model_sha256=sha,
        model_filename=model_path.name,
        options=options,
        batching=batching,
        cache_key=key,
        state=State.READY,
    )
    store.save_record(version.record())
    summary = {
        "name": name,
        "version": version_number,
        "backend": meta["backend"],
        "precision": meta["precision"],
        "batchable": signature.batchable,
        "latency_ms": meta["report"].get("latency_ms"),
        "artifact_bytes": meta["artifact_bytes"],
    }
    if "repair" in meta["report"]:
        summary["kept_fp32"] = [node["name"] for node in meta["report"]["repair"]["kept_fp32"]]
    print(json.dumps(summary, indent=2))
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
    serve.add_argument("--store", help="store directory (KILN_STORE)")
    serve.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"])
    serve.set_defaults(func=cmd_serve)

    build = sub.add_parser("build", help="build an engine offline into a store")
    build.add_argument("model", help="path to the .onnx model")
    build.add_argument("--store", help="store directory (KILN_STORE)")
    build.add_argument("--name", help="engine name (default: the file name without .onnx)")
    build.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"])
    build.add_argument("--precision", choices=["fp32", "fp16", "int8", "auto"], default="fp32")
    build.add_argument(
        "--calibration", help=".npz calibration data for int8, or 'synthetic' to calibrate on random data"
    )
    build.add_argument("--max-batch-size", type=int, default=8)
    build.add_argument(
        "--no-repair",
        action="store_true",
        help="reject an fp16/int8 engine that fails the accuracy check instead of keeping "
        "the nodes responsible in fp32",
    )
    build.set_defaults(func=cmd_build)

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
