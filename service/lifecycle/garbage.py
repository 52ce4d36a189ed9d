"""Garbage collection: store entries nothing needs any more, once older than a grace period.

Run under the catalog's ``gc`` lease (every ``KILN_GC_INTERVAL_S``, by one replica
of a cluster; always by a single node), never inline in a delete. Removed, each
only once untouched for ``KILN_GC_GRACE_S``:

- builds no version references (matched by model sha256 and options digest) and
  no live lease covers, with their engine files;
- engine directories the catalog has no build for (a build that crashed before
  its commit) and artifacts that are not their build's committed one (a builder
  fenced out);
- models and data sets no version uses (an upload publishes its files before its
  version exists; the grace covers that, and a deduplicated upload touches the
  file it reuses);
- temporary directories ``tmp/<owner>/`` of replicas that are not live, judged
  by the newest file inside (a single node owns ``tmp/`` whole and sweeps it at
  start-up instead).

The store is walked and pruned off the event loop; the catalog queries stay on it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from engines.store import EngineStore
from service.catalog.base import BuildState, BuildStatus, VersionCatalog

_KEY = re.compile(r"^[0-9a-f]{8,64}$")


async def collect_garbage(catalog: VersionCatalog, store: EngineStore, grace_s: float) -> int:
    """Remove what nothing references, once older than ``grace_s``; returns how many
    entries were removed."""
    live = set(await catalog.live_replicas())
    removed = await asyncio.to_thread(_collect_temp_dirs, store, live, grace_s)
    await catalog.forget_expired_replicas(grace_s)
    versions = await catalog.versions()
    referenced = {(v.model_sha256, v.options_digest) for v in versions}
    for build in await catalog.builds():
        if (
            (build.model_sha256, build.options_digest) in referenced
            or (build.state == BuildState.BUILDING and not build.expired)
            or build.idle_s < grace_s
        ):
            continue
        await asyncio.to_thread(store.discard_engine, build.cache_key)
        await catalog.forget_build(build.cache_key)
        removed += 1
    builds = {build.cache_key: build for build in await catalog.builds()}
    removed += await asyncio.to_thread(_collect_engines, store, builds, grace_s)
    models = {v.model_sha256 for v in versions}
    data = {
        sha
        for v in versions
        for sha in (v.options.get("calibration_sha256"), v.options.get("validation_sha256"))
        if sha
    }
    removed += await asyncio.to_thread(_collect_models_and_data, store, models, data, grace_s)
    return removed


def _collect_temp_dirs(store: EngineStore, live: set[str], grace_s: float) -> int:
    if store.temp_dir == store.root / "tmp":
        return 0  # one owner of all of tmp/: swept when it starts
    removed = 0
    for owner in store.temp_owners():
        directory = store.root / "tmp" / owner
        if owner not in live and directory != store.temp_dir and _idle_s(directory) > grace_s:
            store.remove_temp_dir(owner)
            removed += 1
    return removed


def _collect_engines(store: EngineStore, builds: dict[str, BuildStatus], grace_s: float) -> int:
    removed = 0
    for directory in sorted((store.root / "engines").iterdir()):
        if not directory.is_dir() or not _KEY.match(directory.name):
            continue  # not kiln's
        build = builds.get(directory.name)
        if build is None:
            if _idle_s(directory) > grace_s:
                store.discard_engine(directory.name)
                removed += 1
            continue
        if build.state == BuildState.BUILDING:
            continue
        keep = _folder((build.meta or {}).get("artifact")) if build.state == BuildState.COMMITTED else None
        for artifact in directory.glob("engine-*"):
            if artifact.name != keep and _idle_s(artifact) > grace_s:
                store.remove_artifact(directory.name, artifact.name)
                removed += 1
    return removed


def _collect_models_and_data(store: EngineStore, models: set[str], data: set[str], grace_s: float) -> int:
    removed = 0
    for model in (store.root / "models").iterdir():  # <sha>.onnx, or a package <sha>/
        if model.name.split(".", 1)[0] not in models and _age_s(model) > grace_s:
            store.remove_model(model.name.split(".", 1)[0])
            removed += 1
    for blob in (store.root / "data").iterdir():
        if blob.stem not in data and _age_s(blob) > grace_s:
            blob.unlink(missing_ok=True)
            removed += 1
    return removed


def _folder(artifact: str | None) -> str | None:
    """The ``engine-<hash>`` directory of an artifact path (``engine-<hash>/engine.onnx``)."""
    return artifact.split("/", 1)[0] if artifact else None


def _age_s(path: Path) -> float:
    """Seconds since ``path`` itself changed (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _idle_s(root: Path) -> float:
    """Seconds since anything under ``root`` changed: the newest mtime in its tree."""
    newest = 0.0
    try:
        newest = root.stat().st_mtime
        for directory, _, files in os.walk(root):
            for name in (directory, *(os.path.join(directory, f) for f in files)):
                try:
                    newest = max(newest, os.stat(name).st_mtime)
                except OSError:
                    continue
    except OSError:
        return 0.0
    return time.time() - newest
