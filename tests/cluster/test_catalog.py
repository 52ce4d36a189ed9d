"""PostgresCatalog against a real PostgreSQL: allocation, pruning, leases, fencing, feed."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from service.catalog import migrations
from service.catalog.base import BuildLease, BuildStatus, CatalogUnavailable, NewVersion
from service.catalog.postgres import PostgresCatalog
from tests.cluster.postgres import PostgresServer

SHA = "a" * 64


def spec(name: str = "m", sha: str = SHA) -> NewVersion:
    return NewVersion(name, sha, "m.onnx", {"precision": "fp32"}, {"max_batch_size": 8})


async def opened(url: str, replica: str = "r1", ttl_s: float = 30.0) -> PostgresCatalog:
    catalog = PostgresCatalog(url, replica, lease_ttl_s=ttl_s)
    await catalog.start()
    return catalog


async def test_migrations_apply_once_even_when_replicas_start_together(catalog_url: str) -> None:
    catalogs = await asyncio.gather(*(opened(catalog_url, f"r{i}") for i in range(4)))
    async with await psycopg.AsyncConnection.connect(catalog_url) as conn:
        rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
        assert [row[0] for row in rows] == list(range(1, len(migrations.MIGRATIONS) + 1))
        assert await migrations.apply(conn) == []
    for catalog in catalogs:
        await catalog.close()


async def test_versions_are_allocated_without_gaps_or_reuse_under_concurrency(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a"), await opened(catalog_url, "b")
    allocations = await asyncio.gather(*(c.create_version(spec(), 100) for c in [a, b] * 10))
    numbers = sorted(alloc.version.version for alloc in allocations)
    assert numbers == list(range(1, 21))
    assert await a.delete_versions("m", [20]) == [20]
    assert (await b.create_version(spec(), 100)).version.version == 21  # 20 is never reused
    assert await a.delete_versions("m") == [*range(1, 20), 21]
    assert (await a.create_version(spec(), 100)).version.version == 22
    await a.close()
    await b.close()


async def test_pruning_keeps_the_newest_by_number_and_the_newest_ready_one(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    for _ in range(3):
        await catalog.create_version(spec(), 3)
    assert await catalog.set_version_state("m", 1, "ready", None, 3) == []
    assert await catalog.set_version_state("m", 2, "failed", {"type": "x", "message": "y"}, 3) == []
    allocation = await catalog.create_version(spec(), 3)  # v2-v4 are the newest, v1 the newest ready
    assert allocation.pruned == []
    assert await catalog.set_version_state("m", 3, "ready", None, 3) == [1]  # v3 is the newest ready now
    allocation = await catalog.create_version(spec(), 3)
    assert allocation.pruned == [2]
    assert [v.version for v in await catalog.versions()] == [3, 4, 5]
    await catalog.create_version(spec(), 3)  # v3 is kept while v4 and v5 are pending
    assert [v.version for v in await catalog.versions()] == [3, 4, 5, 6]
    assert await catalog.set_version_state("m", 5, "ready", None, 3) == [3]
    await catalog.close()


async def test_one_build_lease_per_key_and_takeover_after_expiry(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a", ttl_s=0.5), await opened(catalog_url, "b", ttl_s=0.5)
    first = await a.acquire_build("k1", SHA, {})
    assert isinstance(first, BuildLease) and not first.took_over
    busy = await b.acquire_build("k1", SHA, {})
    assert isinstance(busy, BuildStatus) and busy.state == "building" and busy.holder == "a"
    assert await a.renew_build(first)
    await asyncio.sleep(0.8)  # past the ttl on the database clock
    second = await b.acquire_build("k1", SHA, {})
    assert isinstance(second, BuildLease) and second.took_over
    assert second.generation == first.generation + 1
    assert not await a.renew_build(first)
    assert not await a.commit_build(first, {"artifact_sha256": "1" * 64})  # fenced out
    assert await b.commit_build(second, {"artifact_sha256": "2" * 64})
    status = await a.build_status("k1")
    assert status is not None and status.state == "committed"
    assert status.meta == {"artifact_sha256": "2" * 64}
    done = await a.acquire_build("k1", SHA, {})
    assert isinstance(done, BuildStatus) and done.state == "committed"
    await a.close()
    await b.close()


async def test_deterministic_failures_stay_and_others_release_the_lease(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a"), await opened(catalog_url, "b")
    lease = await a.acquire_build("k1", SHA, {})
    assert isinstance(lease, BuildLease)
    await a.fail_build(lease, {"type": "build_crashed", "message": "killed"}, deterministic=False)
    retry = await b.acquire_build("k1", SHA, {})
    assert isinstance(retry, BuildLease)
    await b.fail_build(retry, {"type": "accuracy_rejected", "message": "too far"}, deterministic=True)
    final = await a.acquire_build("k1", SHA, {})
    assert isinstance(final, BuildStatus) and final.state == "failed"
    assert final.error == {"type": "accuracy_rejected", "message": "too far"}
    await a.close()
    await b.close()


async def test_a_corrupt_artifact_is_invalidated_only_once(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    lease = await catalog.acquire_build("k1", SHA, {})
    assert isinstance(lease, BuildLease)
    await catalog.commit_build(lease, {"artifact_sha256": "1" * 64})
    await catalog.invalidate_build("k1", "2" * 64)  # another artifact: nothing happens
    assert isinstance(await catalog.acquire_build("k1", SHA, {}), BuildStatus)
    await catalog.invalidate_build("k1", "1" * 64)
    assert isinstance(await catalog.acquire_build("k1", SHA, {}), BuildLease)
    await catalog.close()


async def test_every_committed_change_wakes_listeners(catalog_url: str) -> None:
    listener, writer = await opened(catalog_url, "l"), await opened(catalog_url, "w")
    wake = asyncio.Event()
    task = asyncio.create_task(listener.changes(wake.set))
    await asyncio.wait_for(wake.wait(), 5)  # set once on connect
    wake.clear()
    await writer.create_version(spec(), 10)
    await asyncio.wait_for(wake.wait(), 2)
    wake.clear()
    await writer.delete_versions("m", [1])
    await asyncio.wait_for(wake.wait(), 2)
    task.cancel()
    await listener.close()
    await writer.close()


async def test_replicas_and_named_leases(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a", ttl_s=0.5), await opened(catalog_url, "b", ttl_s=0.5)
    await a.heartbeat("cpu1", {"m/1": "ready"})
    await b.heartbeat("cpu1", {"m/1": "loading"})
    assert await a.live_replicas() == {"a": {"m/1": "ready"}, "b": {"m/1": "loading"}}
    assert await a.try_lease("gc") and await a.try_lease("gc")
    assert not await b.try_lease("gc")
    await asyncio.sleep(0.8)
    assert await a.live_replicas() == {}
    assert sorted(await a.forget_expired_replicas()) == ["a", "b"]
    assert await b.try_lease("gc")
    await a.close()
    await b.close()


async def test_unreferenced_builds_are_those_of_no_version(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    await catalog.create_version(spec(), 10)
    options: dict[str, Any] = {"precision": "fp32"}
    for key, sha in (("k1", SHA), ("k2", "b" * 64)):
        lease = await catalog.acquire_build(key, sha, options)
        assert isinstance(lease, BuildLease)
        await catalog.commit_build(lease, {})
    assert [b.cache_key for b in await catalog.unreferenced_builds()] == ["k2"]
    await catalog.delete_versions("m")
    assert [b.cache_key for b in await catalog.unreferenced_builds()] == ["k1", "k2"]
    await catalog.close()


async def test_an_unreachable_database_is_a_catalog_error_not_a_hang(postgres: PostgresServer) -> None:
    catalog = PostgresCatalog(
        f"postgresql://kiln@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/kiln",
        "r",
        timeout_s=1.0,
    )
    with pytest.raises(CatalogUnavailable, match="catalog is unavailable"):
        await asyncio.wait_for(catalog.start(), 10)


async def test_a_version_keeps_what_it_was_uploaded_with(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    progressive = NewVersion(
        "p", SHA, "p.onnx", {"precision": "auto"}, {"max_batch_size": 4}, progressive=True
    )
    await catalog.create_version(progressive, 10)
    await catalog.create_version(spec("q"), 10)
    by_name = {v.name: v for v in await catalog.versions()}
    assert by_name["p"].progressive and not by_name["q"].progressive
    assert (by_name["p"].options, by_name["p"].batching, by_name["p"].model_filename) == (
        {"precision": "auto"},
        {"max_batch_size": 4},
        "p.onnx",
    )
    assert by_name["p"].state == "pending" and by_name["p"].created_at > 0
    await catalog.close()
