"""PostgresCatalog against a real PostgreSQL, where it differs from a single node:
several replicas at once, leases on the database clock, a database that goes away
or refuses writes, rows written by an older kiln. (What both catalogs promise is in
test_contract.py.)"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from service.catalog import migrations
from service.catalog.base import BuildLease, BuildStatus, CatalogUnavailable, NewVersion, options_digest
from service.catalog.postgres import PostgresCatalog
from tests.cluster.postgres import PostgresServer

SHA = "a" * 64
OPTIONS = {"precision": "fp32"}


def spec(name: str = "m", sha: str = SHA) -> NewVersion:
    return NewVersion(name, sha, "m.onnx", dict(OPTIONS), {"max_batch_size": 8})


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
    created = await asyncio.gather(*(c.create_version(spec()) for c in [a, b] * 10))
    assert sorted(record.version for record in created) == list(range(1, 21))
    assert await a.delete_versions("m", [20]) == [20]
    assert (await b.create_version(spec())).version == 21  # 20 is never reused
    await a.close()
    await b.close()


async def test_an_expired_lease_is_taken_over_only_when_asked_for_its_generation(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a", ttl_s=0.5), await opened(catalog_url, "b", ttl_s=0.5)
    first = await a.acquire_build("1" * 64, SHA, OPTIONS)
    assert isinstance(first, BuildLease) and not first.took_over
    await asyncio.sleep(0.8)  # past the ttl on the database clock
    expired = await b.acquire_build("1" * 64, SHA, OPTIONS)
    # Expired but not taken: its holder may only have lost the database for a while.
    assert isinstance(expired, BuildStatus) and expired.expired and expired.holder == "a"
    assert isinstance(
        await b.acquire_build("1" * 64, SHA, OPTIONS, take_over=first.generation + 1), BuildStatus
    )
    second = await b.acquire_build("1" * 64, SHA, OPTIONS, take_over=first.generation)
    assert isinstance(second, BuildLease) and second.took_over
    assert second.generation == first.generation + 1
    assert not await a.renew_build(first)
    assert not await a.commit_build(first, {"artifact_sha256": "1" * 64})  # fenced out
    assert await b.commit_build(second, {"artifact_sha256": "2" * 64})
    await a.close()
    await b.close()


async def test_a_late_commit_goes_through_when_nobody_took_the_lease(catalog_url: str) -> None:
    catalog = await opened(catalog_url, "a", ttl_s=0.5)
    lease = await catalog.acquire_build("1" * 64, SHA, OPTIONS)
    assert isinstance(lease, BuildLease)
    await asyncio.sleep(0.8)  # it expired (a database outage, say): its generation still holds
    assert await catalog.commit_build(lease, {"artifact_sha256": "1" * 64})
    await catalog.close()


async def test_replicas_expire_and_named_leases_pass_on(catalog_url: str) -> None:
    a, b = await opened(catalog_url, "a", ttl_s=0.5), await opened(catalog_url, "b", ttl_s=0.5)
    await a.heartbeat("cpu1", {})
    await b.heartbeat("cpu1", {})
    assert sorted(await a.live_replicas()) == ["a", "b"]
    assert await a.try_lease("gc") and await a.try_lease("gc")
    assert not await b.try_lease("gc")
    await asyncio.sleep(0.8)
    assert await a.live_replicas() == {}
    assert await a.forget_expired_replicas(60) == []  # expired, but not for a minute yet
    assert sorted(await a.forget_expired_replicas(0)) == ["a", "b"]
    assert await b.try_lease("gc")
    await a.close()
    await b.close()


async def test_an_unreachable_database_is_a_catalog_error_not_a_hang(postgres: PostgresServer) -> None:
    catalog = PostgresCatalog(
        f"postgresql://kiln@127.0.0.1:{postgres.port + 1 if postgres.port < 65535 else 1}/kiln",
        "r",
        timeout_s=1.0,
    )
    with pytest.raises(CatalogUnavailable, match="catalog is unavailable"):
        await asyncio.wait_for(catalog.start(), 10)


async def test_a_database_that_refuses_writes_is_unavailable_then_used_again(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    database = catalog_url.rsplit("/", 1)[1]
    try:
        # What a demoted primary does: every new transaction is read-only.
        await admin(catalog_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await admin(
            catalog_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
        )
        refusals = []
        for _ in range(3):  # the pool may first hand out a connection the database cut
            with pytest.raises(CatalogUnavailable) as raised:
                await catalog.create_version(spec())
            refusals.append(raised.value)
        assert any("refuses writes" in refusal.message for refusal in refusals)
        assert all((r.status, r.kind) == (503, "catalog_unavailable") for r in refusals)
        assert await catalog.versions() == []  # reads still work
        await admin(catalog_url, f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        # A connection that meets a refusal is dropped, so the pool's connections opened
        # while the database refused writes give way to new, writable ones.
        for _ in range(5):
            with contextlib.suppress(CatalogUnavailable):
                assert (await catalog.create_version(spec())).version == 1
                break
        else:
            raise AssertionError("no write went through after the database took writes again")
    finally:
        await catalog.close()


async def admin(url: str, sql: str) -> None:
    """Run ``sql`` from the server's ``postgres`` database (the catalog's may refuse writes)."""
    async with await psycopg.AsyncConnection.connect(
        url.rsplit("/", 1)[0] + "/postgres", autocommit=True
    ) as conn:
        await conn.execute(sql.encode())


async def test_the_feed_comes_back_after_its_connection_is_terminated(catalog_url: str) -> None:
    listener, writer = await opened(catalog_url, "l"), await opened(catalog_url, "w")
    woke = asyncio.Event()
    feed = asyncio.create_task(listener.changes(woke.set))
    try:
        await asyncio.wait_for(woke.wait(), 5)
        async with await psycopg.AsyncConnection.connect(catalog_url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'"
            )
        woke.clear()
        await asyncio.wait_for(woke.wait(), 5)  # reconnected (and says so)
        woke.clear()
        await writer.create_version(spec())
        await asyncio.wait_for(woke.wait(), 2)
    finally:
        feed.cancel()
        await listener.close()
        await writer.close()


async def test_rows_of_an_older_kiln_get_their_digest_from_their_options(catalog_url: str) -> None:
    catalog = await opened(catalog_url)
    await catalog.create_version(spec())
    lease = await catalog.acquire_build("1" * 64, SHA, {**OPTIONS, "repair": True})
    assert isinstance(lease, BuildLease)
    async with await psycopg.AsyncConnection.connect(catalog_url, autocommit=True) as admin:
        await admin.execute("UPDATE versions SET options_digest = NULL")
        await admin.execute("UPDATE builds SET options_digest = NULL")
    (version,) = await catalog.versions()
    (build,) = await catalog.builds()
    assert version.options_digest == build.options_digest == options_digest(OPTIONS)
    await catalog.close()
