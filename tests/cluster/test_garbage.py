"""Garbage collection in cluster mode: only what no version references and no live
lease or replica covers, and only once untouched for the grace period."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psycopg

from engines.store import EngineStore
from service.catalog.base import BuildLease, NewVersion
from service.catalog.postgres import PostgresCatalog
from service.lifecycle.garbage import collect_garbage

KEPT, GONE = "a" * 64, "b" * 64
KEY_KEPT, KEY_GONE, KEY_ORPHAN = "1" * 64, "2" * 64, "3" * 64
BUILD_KEPT, BUILD_LOSER, BUILD_GONE, BUILD_ORPHAN = (f"engine-{c * 64}" for c in "4567")
OPTIONS = {"precision": "fp32"}


def _file(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _age(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            os.utime(path, (1, 1))


async def _commit(
    catalog: PostgresCatalog, key: str, model: str, artifact: str, options: dict = OPTIONS
) -> None:
    lease = await catalog.acquire_build(key, model, options)
    assert isinstance(lease, BuildLease)
    assert await catalog.commit_build(lease, {"artifact": artifact, "artifact_sha256": "0" * 64})


async def _age_builds(catalog_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(catalog_url, autocommit=True) as conn:
        await conn.execute("UPDATE builds SET updated_at = now() - interval '1 hour'")


async def test_collect_garbage_removes_only_unreferenced_old_entries(
    catalog_url: str, tmp_path: Path
) -> None:
    store = EngineStore(tmp_path, temp_owner="live")
    live = PostgresCatalog(catalog_url, "live", lease_ttl_s=30)
    dead = PostgresCatalog(catalog_url, "dead", lease_ttl_s=0.5)
    await live.start()
    await dead.start()
    await live.create_version(NewVersion("m", KEPT, "m.onnx", OPTIONS, {}))
    calibrated = {**OPTIONS, "calibration_sha256": "e" * 64}  # keeps its data set
    await live.create_version(NewVersion("c", KEPT, "m.onnx", calibrated, {}))
    gone_version = await live.create_version(NewVersion("g", GONE, "g.onnx", OPTIONS, {}))
    await _commit(live, KEY_KEPT, KEPT, f"{BUILD_KEPT}/engine.onnx")
    await _commit(live, KEY_GONE, GONE, f"{BUILD_GONE}/engine.onnx")
    await live.delete_versions("g", [gone_version.version])
    await live.heartbeat("cpu", {})
    await dead.heartbeat("cpu", {})
    entries = {
        "kept model": _file(store.model_path(KEPT)),
        "gone model": _file(store.model_path(GONE)),
        "gone package": _file(tmp_path / "models" / ("c" * 64) / "model.onnx"),
        "gone data": _file(store.data_path("d" * 64)),
        "kept data": _file(store.data_path("e" * 64)),
        "kept artifact": _file(store.engine_dir(KEY_KEPT) / BUILD_KEPT / "engine.onnx"),
        "fenced-out artifact": _file(store.engine_dir(KEY_KEPT) / BUILD_LOSER / "engine.onnx"),
        "gone engine": _file(store.engine_dir(KEY_GONE) / BUILD_GONE / "engine.onnx"),
        "orphan engine": _file(store.engine_dir(KEY_ORPHAN) / BUILD_ORPHAN / "engine.onnx"),
        "live temp": _file(tmp_path / "tmp" / "live" / "upload"),
        "dead temp": _file(tmp_path / "tmp" / "dead" / "upload"),
    }
    await asyncio.sleep(0.8)  # the dead replica's heartbeat expires
    assert await collect_garbage(live, store, grace_s=60) == 0  # everything is younger than the grace

    _age(
        *entries.values(), *(p.parent for p in entries.values()), *(p.parent.parent for p in entries.values())
    )
    await _age_builds(catalog_url)
    removed = await collect_garbage(live, store, grace_s=60)
    assert removed == 7
    left = {name for name, path in entries.items() if path.exists()}
    assert left == {"kept model", "kept data", "kept artifact", "live temp"}
    assert [b.cache_key for b in await live.builds()] == [KEY_KEPT]
    await live.close()
    await dead.close()


async def test_a_replica_whose_heartbeat_lapsed_keeps_its_temp_files_for_the_grace(
    catalog_url: str, tmp_path: Path
) -> None:
    """Its heartbeat may have lapsed for a database outage while it builds and uploads:
    its temp directory goes only once nothing in it changed for the grace period."""
    collector = PostgresCatalog(catalog_url, "collector", lease_ttl_s=30)
    quiet = PostgresCatalog(catalog_url, "quiet", lease_ttl_s=0.5)
    await collector.start()
    await quiet.start()
    await quiet.heartbeat("cpu", {})
    store = EngineStore(tmp_path, temp_owner="collector")
    workdir = tmp_path / "tmp" / "quiet" / "build-1"
    staged = _file(workdir / "fp32.onnx")
    _age(workdir.parent, workdir)  # an old directory, with a file written a moment ago
    await asyncio.sleep(0.8)
    assert await collector.live_replicas() == {}
    assert await collect_garbage(collector, store, grace_s=60) == 0
    assert staged.exists()
    _age(staged)
    assert await collect_garbage(collector, store, grace_s=60) == 1
    assert not (tmp_path / "tmp" / "quiet").exists()
    await collector.close()
    await quiet.close()


async def test_an_added_option_field_leaves_engines_in_use_alone(catalog_url: str, tmp_path: Path) -> None:
    """A version written by a kiln that did not have an option field yet, and its engine
    built by one that has it (with its default): one digest, the engine is in use."""
    store = EngineStore(tmp_path, temp_owner="r")
    catalog = PostgresCatalog(catalog_url, "r")
    await catalog.start()
    await catalog.create_version(NewVersion("m", KEPT, "m.onnx", OPTIONS, {}))
    await _commit(catalog, KEY_KEPT, KEPT, f"{BUILD_KEPT}/engine.onnx", {**OPTIONS, "repair_seconds": 600.0})
    async with await psycopg.AsyncConnection.connect(catalog_url, autocommit=True) as conn:
        await conn.execute("UPDATE versions SET options_digest = NULL")  # as the older kiln wrote it
    artifact = _file(store.engine_dir(KEY_KEPT) / BUILD_KEPT / "engine.onnx")
    _age(artifact, artifact.parent, artifact.parent.parent)
    await _age_builds(catalog_url)
    assert await collect_garbage(catalog, store, grace_s=60) == 0
    assert artifact.exists() and [b.cache_key for b in await catalog.builds()] == [KEY_KEPT]
    await catalog.close()


async def test_new_files_survive_the_grace_period(catalog_url: str, tmp_path: Path) -> None:
    store = EngineStore(tmp_path, temp_owner="r")
    catalog = PostgresCatalog(catalog_url, "r")
    await catalog.start()
    fresh = _file(store.model_path(GONE))  # just published, its version not inserted yet
    orphan = _file(store.engine_dir(KEY_ORPHAN) / BUILD_ORPHAN / "engine.onnx")  # a build starting
    assert await collect_garbage(catalog, store, grace_s=60) == 0
    assert fresh.exists() and orphan.exists()
    await catalog.close()


def test_an_upload_of_a_stored_model_marks_it_as_just_used(tmp_path: Path) -> None:
    """The model was published long ago and its versions deleted: a new upload of the
    same bytes reuses the file, which must not look old to the collector until its
    version exists."""
    store = EngineStore(tmp_path)
    first = store.temp_path()
    first.write_bytes(b"model")
    stored = store.add_model(first, KEPT)
    _age(stored)
    again = store.temp_path()
    again.write_bytes(b"model")
    assert store.add_model(again, KEPT) == stored
    assert stored.stat().st_mtime > 1_000_000 and not again.exists()
