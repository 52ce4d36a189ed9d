"""One contract, two catalogs: every test here runs against the single-node
``StoreCatalog`` (the store's records) and against ``PostgresCatalog`` (a real
PostgreSQL). What the lifecycle relies on holds for both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from engines.store import EngineStore
from service.catalog.base import (
    BuildLease,
    BuildStatus,
    CatalogState,
    NewVersion,
    VersionCatalog,
    VersionReport,
    options_digest,
)
from service.catalog.postgres import PostgresCatalog
from service.catalog.store import StoreCatalog

SHA, OTHER = "a" * 64, "b" * 64
OPTIONS: dict[str, Any] = {"precision": "fp32", "max_batch_size": 8}
K1, K2, K3 = "c" * 64, "d" * 64, "e" * 64


def spec(name: str = "m", sha: str = SHA, options: dict[str, Any] | None = None) -> NewVersion:
    return NewVersion(name, sha, "m.onnx", dict(options or OPTIONS), {"max_batch_size": 8})


@pytest.fixture(params=["store", "postgres"])
async def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VersionCatalog]:
    opened: VersionCatalog
    if request.param == "store":
        opened = StoreCatalog(EngineStore(tmp_path / "store"), replica_id="r1")
    else:
        opened = PostgresCatalog(request.getfixturevalue("catalog_url"), "r1")
    await opened.start()
    yield opened
    await opened.close()


async def lease_of(
    catalog: VersionCatalog, key: str = K1, options: dict[str, Any] | None = None
) -> BuildLease:
    lease = await catalog.acquire_build(key, SHA, options or OPTIONS)
    assert isinstance(lease, BuildLease), lease
    return lease


async def report(catalog: VersionCatalog, **states: str) -> None:
    """This replica holds ``m/<n>`` in the given states (``v1="ready"``)."""
    await catalog.heartbeat("cpu", {f"m/{key[1:]}": VersionReport(state) for key, state in states.items()})


# -- versions ----------------------------------------------------------------------------


async def test_numbers_are_allocated_in_order_and_never_reused(catalog: VersionCatalog) -> None:
    numbers = [(await catalog.create_version(spec())).version for _ in range(3)]
    assert numbers == [1, 2, 3]
    assert await catalog.delete_versions("m", [3]) == [3]
    assert (await catalog.create_version(spec())).version == 4
    assert await catalog.delete_versions("m") == [1, 2, 4]
    assert await catalog.versions() == []
    assert (await catalog.create_version(spec())).version == 5  # the name keeps its high-water mark
    assert (await catalog.create_version(spec("other"))).version == 1


async def test_a_version_keeps_what_it_was_uploaded_with(catalog: VersionCatalog) -> None:
    created = await catalog.create_version(
        NewVersion("p", SHA, "p.onnx", {"precision": "auto"}, {"max_batch_size": 4}, progressive=True)
    )
    (found,) = await catalog.versions()
    assert found == created
    assert (found.options, found.batching, found.model_filename, found.progressive) == (
        {"precision": "auto"},
        {"max_batch_size": 4},
        "p.onnx",
        True,
    )
    assert found.state == CatalogState.PENDING and found.created_at > 0 and found.retries == 0
    assert found.options_digest == options_digest({"precision": "auto"})


async def test_states_are_recorded_once(catalog: VersionCatalog) -> None:
    await catalog.create_version(spec())
    error = {"type": "accuracy_rejected", "message": "too far"}
    assert await catalog.set_version_state("m", 1, CatalogState.FAILED, error)
    assert not await catalog.set_version_state("m", 1, CatalogState.FAILED, error)  # no change
    assert not await catalog.set_version_state("m", 9, CatalogState.READY, None)  # no such version
    (found,) = await catalog.versions()
    assert (found.state, found.error) == (CatalogState.FAILED, error)


async def test_retry_puts_failed_versions_back_and_frees_their_builds(catalog: VersionCatalog) -> None:
    await catalog.create_version(spec())
    await catalog.create_version(spec())
    await catalog.set_version_state("m", 1, CatalogState.FAILED, {"type": "x", "message": "y"})
    await catalog.set_version_state("m", 2, CatalogState.READY, None)
    lease = await lease_of(catalog)
    await catalog.fail_build(lease, {"type": "invalid_model", "message": "no"}, retry_after_s=None)
    assert isinstance(await catalog.acquire_build(K1, SHA, OPTIONS), BuildStatus)
    assert await catalog.retry_version("m", 1) == [1]
    v1, v2 = await catalog.versions()
    assert (v1.state, v1.error, v1.retries) == (CatalogState.PENDING, None, 1)
    assert (v2.state, v2.retries) == (CatalogState.READY, 0)
    again = await lease_of(catalog)  # tried afresh
    assert again.attempts == 0
    assert await catalog.retry_version("m") == [1, 2]
    assert await catalog.retry_version("nope") == []


# -- pruning: the same rule on both ---------------------------------------------------------


async def test_pruning_keeps_the_newest_and_what_replicas_serve(catalog: VersionCatalog) -> None:
    for _ in range(4):
        await catalog.create_version(spec())
    for number in (1, 2, 3):
        await catalog.set_version_state("m", number, CatalogState.READY, None)
    # v4 is loading here, so v3 still answers: kept; v1 and v2 go.
    await report(catalog, v1="ready", v2="ready", v3="ready", v4="loading")
    assert await catalog.prune(1) == [("m", 1), ("m", 2)]
    assert [v.version for v in await catalog.versions()] == [3, 4]
    await report(catalog, v3="ready", v4="failed")  # its load failed here: v3 stays
    assert await catalog.prune(1) == []
    await report(catalog, v3="ready", v4="ready")
    assert await catalog.prune(1) == []  # the newest the catalog has as ready is v3
    await catalog.set_version_state("m", 4, CatalogState.READY, None)
    assert await catalog.prune(1) == [("m", 3)]
    assert [v.version for v in await catalog.versions()] == [4]


async def test_pending_versions_go_only_once_every_replica_failed_them(catalog: VersionCatalog) -> None:
    for _ in range(3):
        await catalog.create_version(spec())
    await report(catalog, v1="building", v2="building", v3="building")
    assert await catalog.prune(1) == []  # still being built
    await report(catalog, v1="failed", v2="building", v3="ready")
    assert await catalog.prune(1) == [("m", 1)]  # failed everywhere: not kept forever
    assert [v.version for v in await catalog.versions()] == [2, 3]


# -- builds ---------------------------------------------------------------------------------


async def test_one_lease_per_build_and_its_commit_is_fenced(catalog: VersionCatalog) -> None:
    first = await lease_of(catalog)
    busy = await catalog.acquire_build(K1, SHA, OPTIONS)
    assert isinstance(busy, BuildStatus) and busy.state == "building" and busy.holder == "r1"
    assert not busy.expired and await catalog.renew_build(first)
    assert await catalog.fail_build(first, {"type": "build_crashed", "message": "killed"}, retry_after_s=0)
    second = await lease_of(catalog)
    assert second.generation > first.generation and second.attempts == 1
    assert not await catalog.renew_build(first)
    assert not await catalog.commit_build(first, {"artifact_sha256": "1" * 64})  # fenced out
    assert await catalog.commit_build(second, {"artifact_sha256": "2" * 64})
    status = await catalog.build_status(K1)
    assert status is not None and status.state == "committed"
    assert status.meta is not None and status.meta["artifact_sha256"] == "2" * 64
    assert (status.model_sha256, status.options_digest) == (SHA, options_digest(OPTIONS))
    assert isinstance(await catalog.acquire_build(K1, SHA, OPTIONS), BuildStatus)


async def test_a_failed_attempt_waits_its_backoff_and_a_permanent_failure_stays(
    catalog: VersionCatalog,
) -> None:
    lease = await lease_of(catalog)
    error = {"type": "build_crashed", "message": "killed"}
    assert await catalog.fail_build(lease, error, retry_after_s=30)
    waiting = await catalog.acquire_build(K1, SHA, OPTIONS)
    assert isinstance(waiting, BuildStatus) and waiting.state == "released"
    assert 25 < waiting.retry_in_s <= 30 and waiting.attempts == 1 and waiting.error == error
    other = await lease_of(catalog, K2)
    assert await catalog.release_build(other)  # cancelled: free at once, no attempt counted
    assert (await lease_of(catalog, K2)).attempts == 0
    third = await lease_of(catalog, K3)
    rejected = {"type": "accuracy_rejected", "message": "too far"}
    assert await catalog.fail_build(third, rejected, retry_after_s=None)
    final = await catalog.acquire_build(K3, SHA, OPTIONS)
    assert isinstance(final, BuildStatus) and final.state == "failed" and final.error == rejected


async def test_a_corrupt_artifact_is_invalidated_only_once(catalog: VersionCatalog) -> None:
    lease = await lease_of(catalog, "1" * 64)
    assert await catalog.commit_build(lease, {"artifact_sha256": "1" * 64, "artifact": "engine-x/e.onnx"})
    await catalog.invalidate_build("1" * 64, "2" * 64)  # another artifact: nothing happens
    assert isinstance(await catalog.acquire_build("1" * 64, SHA, OPTIONS), BuildStatus)
    await catalog.invalidate_build("1" * 64, "1" * 64)
    assert isinstance(await catalog.acquire_build("1" * 64, SHA, OPTIONS), BuildLease)


async def test_builds_carry_what_they_were_built_from(catalog: VersionCatalog) -> None:
    committed = await lease_of(catalog, "1" * 64)
    await catalog.commit_build(committed, {"artifact_sha256": "1" * 64, "options": OPTIONS})
    await lease_of(catalog, "2" * 64, {"precision": "fp16"})
    found = {b.cache_key: b for b in await catalog.builds()}
    assert set(found) == {"1" * 64, "2" * 64}
    assert found["1" * 64].state == "committed" and found["2" * 64].state == "building"
    assert found["2" * 64].options_digest == options_digest({"precision": "fp16"})
    assert all(b.model_sha256 == SHA and 0 <= b.idle_s < 30 for b in found.values())


async def test_option_fields_at_their_default_do_not_change_the_digest() -> None:
    assert options_digest({"precision": "fp32"}) == options_digest({"precision": "fp32", "repair": True})
    assert options_digest({}) == options_digest({"repair_seconds": 600.0, "max_batch_size": 8})
    assert options_digest({"precision": "fp16"}) != options_digest({"precision": "fp32"})


# -- replicas and the feed -------------------------------------------------------------------


async def test_the_replica_is_live_with_what_it_reports(catalog: VersionCatalog) -> None:
    failed = VersionReport("failed", {"type": "unsupported_model", "message": "no"}, attempts=2)
    await catalog.heartbeat("cpu", {"m/1": VersionReport("ready"), "m/2": failed})
    replicas = await catalog.live_replicas()
    assert list(replicas) == ["r1"]
    assert replicas["r1"].versions == {"m/1": VersionReport("ready"), "m/2": failed}
    assert replicas["r1"].newest_serving("m") == 1
    assert await catalog.try_lease("gc") and await catalog.try_lease("gc")
    await catalog.leave()
    assert await catalog.live_replicas() == {}


async def test_every_change_wakes_the_feed(catalog: VersionCatalog) -> None:
    woke = asyncio.Event()
    feed = asyncio.create_task(catalog.changes(woke.set))
    try:
        await asyncio.wait_for(woke.wait(), 5)  # once on (re)connecting
        changes: list[Callable[[], Any]] = [
            lambda: catalog.create_version(spec()),
            lambda: catalog.set_version_state("m", 1, CatalogState.READY, None),
            lambda: catalog.retry_version("m"),
            lambda: lease_of(catalog),
            lambda: catalog.delete_versions("m", [1]),
        ]
        for change in changes:
            woke.clear()
            await change()
            await asyncio.wait_for(woke.wait(), 2)
    finally:
        feed.cancel()
