"""``PostgresCatalog``: the catalog of a cluster of replicas, in PostgreSQL (13+).

Every mutation runs in one transaction and sends ``pg_notify`` in it, so the
notification goes out only if the change committed. Each replica LISTENs on a
dedicated connection (``changes``) and resyncs fully every few seconds, which
covers whatever was missed while reconnecting. Lease expiry is decided on the
database clock (``now()``), never on a replica's.

psycopg's pool reconnects on its own; while the database is down every call
raises ``CatalogUnavailable`` after ``timeout_s`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from service.catalog import migrations
from service.catalog.base import (
    Allocation,
    BuildLease,
    BuildState,
    BuildStatus,
    CatalogState,
    CatalogUnavailable,
    NewVersion,
    VersionRecord,
)

log = logging.getLogger("kiln.catalog")

CHANNEL = "kiln_catalog"
_NOTIFY = "SELECT pg_notify('kiln_catalog', %s)"
_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class PostgresCatalog:
    def __init__(
        self, url: str, replica_id: str, *, lease_ttl_s: float = 30.0, timeout_s: float = 3.0
    ) -> None:
        self.url = url
        self.replica_id = replica_id
        self.lease_ttl_s = lease_ttl_s
        self.timeout_s = timeout_s
        self._pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=timeout_s,
            check=AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout_s))},
            name="kiln-catalog",
            reconnect_timeout=0,  # keep retrying for as long as the database is away
        )

    @property
    def display_url(self) -> str:
        """The URL without its password, for logs."""
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", self.url)

    # -- connection ------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=self.timeout_s)
            async with self._pool.connection() as conn:
                applied = await migrations.apply(conn)
        except _ERRORS as exc:
            await self._pool.close()
            raise CatalogUnavailable(_reason(exc)) from exc
        if applied:
            log.info("catalog schema migrated to version %d", applied[-1])

    async def close(self) -> None:
        await self._pool.close()

    async def _fetch(self, sql: Any, params: Any = None) -> list[dict[str, Any]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.cursor(row_factory=dict_row).execute(sql, params)
                return await cursor.fetchall() if cursor.description else []
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    # -- versions --------------------------------------------------------------

    async def create_version(self, spec: NewVersion, max_versions: int) -> Allocation:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    "INSERT INTO engines (name, next_version) VALUES (%s, 2) ON CONFLICT (name) "
                    "DO UPDATE SET next_version = engines.next_version + 1 "
                    "RETURNING next_version - 1 AS version",
                    (spec.name,),
                )
                allocated = await cur.fetchone()
                assert allocated is not None
                await cur.execute(
                    "INSERT INTO versions (name, version, model_sha256, model_filename, options, batching,"
                    f" progressive) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_VERSION_COLUMNS}",
                    (
                        spec.name,
                        allocated["version"],
                        spec.model_sha256,
                        spec.model_filename,
                        Jsonb(spec.options),
                        Jsonb(spec.batching),
                        spec.progressive,
                    ),
                )
                row = await cur.fetchone()
                assert row is not None
                pruned = await _prune(conn, spec.name, max_versions)
                await conn.execute(_NOTIFY, (f"version {spec.name} {allocated['version']}",))
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc
        return Allocation(version=_version(row), pruned=pruned)

    async def versions(self) -> list[VersionRecord]:
        rows = await self._fetch(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY name, version")
        return [_version(row) for row in rows]

    async def set_version_state(
        self, name: str, version: int, state: str, error: dict[str, Any] | None, max_versions: int
    ) -> list[int]:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "UPDATE versions SET state = %s, error = %s "
                    "WHERE name = %s AND version = %s AND (state <> %s OR error IS DISTINCT FROM %s)",
                    (state, _json(error), name, version, state, _json(error)),
                )
                if not cursor.rowcount:
                    return []
                pruned = await _prune(conn, name, max_versions)
                await conn.execute(_NOTIFY, (f"state {name} {version}",))
                return pruned
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    async def delete_versions(self, name: str, versions: list[int] | None = None) -> list[int]:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                if versions is None:
                    cursor = await conn.execute(
                        "DELETE FROM versions WHERE name = %s RETURNING version", (name,)
                    )
                else:
                    cursor = await conn.execute(
                        "DELETE FROM versions WHERE name = %s AND version = ANY(%s) RETURNING version",
                        (name, versions),
                    )
                removed = sorted(int(row[0]) for row in await cursor.fetchall())
                if removed:
                    await conn.execute(_NOTIFY, (f"delete {name}",))
                return removed
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    async def import_store(self, versions: list[VersionRecord], builds: list[ImportedBuild]) -> None:
        """Add a single-node store's versions (keeping their numbers) and committed
        engines, in one transaction. Raises ``ValueError`` naming the engines the
        catalog already has, and then adds nothing."""
        names = sorted({v.name for v in versions})
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute("SELECT name FROM engines WHERE name = ANY(%s)", (names,))
                taken = sorted(row[0] for row in await cursor.fetchall())
                if taken:
                    raise ValueError(f"the catalog already has engines named {', '.join(taken)}")
                for name in names:
                    top = max(v.version for v in versions if v.name == name)
                    await conn.execute(
                        "INSERT INTO engines (name, next_version) VALUES (%s, %s)", (name, top + 1)
                    )
                for v in versions:
                    await conn.execute(
                        "INSERT INTO versions (name, version, model_sha256, model_filename, options,"
                        " batching, state, error, created_at, progressive)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s)",
                        (
                            v.name,
                            v.version,
                            v.model_sha256,
                            v.model_filename,
                            Jsonb(v.options),
                            Jsonb(v.batching),
                            v.state,
                            _json(v.error),
                            v.created_at,
                            v.progressive,
                        ),
                    )
                for build in builds:
                    await conn.execute(
                        "INSERT INTO builds (cache_key, model_sha256, options, state, meta) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (cache_key) DO NOTHING",
                        (
                            build.cache_key,
                            build.model_sha256,
                            Jsonb(build.options),
                            BuildState.COMMITTED,
                            Jsonb(build.meta),
                        ),
                    )
                await conn.execute(_NOTIFY, ("import",))
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    # -- builds ----------------------------------------------------------------

    async def build_status(self, cache_key: str) -> BuildStatus | None:
        rows = await self._fetch(f"SELECT {_BUILD_COLUMNS} FROM builds WHERE cache_key = %s", (cache_key,))
        return _build(rows[0]) if rows else None

    async def acquire_build(
        self, cache_key: str, model_sha256: str, options: dict[str, Any]
    ) -> BuildLease | BuildStatus:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(
                    "INSERT INTO builds (cache_key, model_sha256, options, state) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (cache_key) DO NOTHING",
                    (cache_key, model_sha256, Jsonb(options), BuildState.RELEASED),
                )
                await cur.execute(
                    f"SELECT {_BUILD_COLUMNS}, expires_at < now() AS expired "
                    "FROM builds WHERE cache_key = %s FOR UPDATE",
                    (cache_key,),
                )
                row = await cur.fetchone()
                assert row is not None
                took_over = row["state"] == BuildState.BUILDING and bool(row["expired"])
                if row["state"] != BuildState.RELEASED and not took_over:
                    return _build(row)
                await cur.execute(
                    "UPDATE builds SET state = %s, holder = %s, generation = generation + 1, "
                    "expires_at = now() + make_interval(secs => %s), error = NULL, meta = NULL, "
                    "updated_at = now() WHERE cache_key = %s RETURNING generation",
                    (BuildState.BUILDING, self.replica_id, self.lease_ttl_s, cache_key),
                )
                taken = await cur.fetchone()
                assert taken is not None
                await conn.execute(_NOTIFY, (f"build {cache_key}",))
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc
        return BuildLease(cache_key, self.replica_id, int(taken["generation"]), took_over=took_over)

    async def renew_build(self, lease: BuildLease) -> bool:
        rows = await self._fetch(
            "UPDATE builds SET expires_at = now() + make_interval(secs => %s) "
            "WHERE cache_key = %s AND holder = %s AND generation = %s AND state = %s RETURNING 1",
            (self.lease_ttl_s, lease.cache_key, lease.holder, lease.generation, BuildState.BUILDING),
        )
        return bool(rows)

    async def commit_build(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        return await self._finish(lease, BuildState.COMMITTED, meta=meta)

    async def fail_build(self, lease: BuildLease, error: dict[str, Any], *, deterministic: bool) -> None:
        await self._finish(lease, BuildState.FAILED if deterministic else BuildState.RELEASED, error=error)

    async def _finish(
        self,
        lease: BuildLease,
        state: str,
        *,
        meta: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Set the build's outcome, fenced: only the holder of this generation may."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "UPDATE builds SET state = %s, meta = %s, error = %s, expires_at = NULL, "
                    "updated_at = now() "
                    "WHERE cache_key = %s AND holder = %s AND generation = %s AND state = %s",
                    (
                        state,
                        _json(meta),
                        _json(error),
                        lease.cache_key,
                        lease.holder,
                        lease.generation,
                        BuildState.BUILDING,
                    ),
                )
                if not cursor.rowcount:
                    return False
                await conn.execute(_NOTIFY, (f"build {lease.cache_key}",))
                return True
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    async def invalidate_build(self, cache_key: str, artifact_sha256: str) -> None:
        await self._fetch(
            "UPDATE builds SET state = %s, meta = NULL, updated_at = now() "
            "WHERE cache_key = %s AND state = %s AND meta->>'artifact_sha256' = %s",
            (BuildState.RELEASED, cache_key, BuildState.COMMITTED, artifact_sha256),
        )

    async def builds(self) -> list[BuildStatus]:
        rows = await self._fetch(f"SELECT {_BUILD_COLUMNS} FROM builds ORDER BY cache_key")
        return [_build(row) for row in rows]

    async def unreferenced_builds(self, grace_s: float = 0.0) -> list[BuildStatus]:
        """Builds of no existing version (by model and options), unchanged for ``grace_s``
        and not being built now."""
        rows = await self._fetch(
            f"SELECT {_BUILD_COLUMNS} FROM builds b WHERE NOT EXISTS ("
            " SELECT 1 FROM versions v WHERE v.model_sha256 = b.model_sha256 AND v.options = b.options)"
            " AND NOT (b.state = %s AND b.expires_at > now())"
            " AND b.updated_at < now() - make_interval(secs => %s) ORDER BY b.cache_key",
            (BuildState.BUILDING, grace_s),
        )
        return [_build(row) for row in rows]

    async def forget_build(self, cache_key: str) -> None:
        await self._fetch(
            "DELETE FROM builds WHERE cache_key = %s AND NOT (state = %s AND expires_at > now())",
            (cache_key, BuildState.BUILDING),
        )

    # -- replicas and named leases -------------------------------------------------

    async def heartbeat(self, device_key: str, loaded: dict[str, str]) -> None:
        """Say this replica is alive and what it holds (``"name/version": state``)."""
        await self._fetch(
            "INSERT INTO replicas (id, device_key, expires_at, loaded) "
            "VALUES (%s, %s, now() + make_interval(secs => %s), %s) ON CONFLICT (id) DO UPDATE SET "
            "expires_at = EXCLUDED.expires_at, loaded = EXCLUDED.loaded, device_key = EXCLUDED.device_key",
            (self.replica_id, device_key, self.lease_ttl_s, Jsonb(loaded)),
        )

    async def leave(self) -> None:
        await self._fetch("DELETE FROM replicas WHERE id = %s", (self.replica_id,))

    async def live_replicas(self) -> dict[str, dict[str, str]]:
        """Each live replica's loaded versions (``"name/version": state``)."""
        rows = await self._fetch("SELECT id, loaded FROM replicas WHERE expires_at > now()")
        return {row["id"]: dict(row["loaded"]) for row in rows}

    async def forget_expired_replicas(self) -> list[str]:
        rows = await self._fetch("DELETE FROM replicas WHERE expires_at < now() RETURNING id")
        return [row["id"] for row in rows]

    async def try_lease(self, name: str) -> bool:
        """Take or renew the named lease (``gc``) for ``lease_ttl_s``; False when another holds it."""
        rows = await self._fetch(
            "INSERT INTO leases (name, holder, generation, expires_at) "
            "VALUES (%s, %s, 1, now() + make_interval(secs => %s)) ON CONFLICT (name) DO UPDATE SET "
            "holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at, "
            "generation = leases.generation + (leases.holder <> EXCLUDED.holder)::int "
            "WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now() RETURNING 1",
            (name, self.replica_id, self.lease_ttl_s),
        )
        return bool(rows)

    # -- change feed -----------------------------------------------------------

    async def changes(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` on every notification, and once after each (re)connect,
        since anything may have changed meanwhile. Runs until cancelled; reconnects."""
        delay = 0.2
        while True:
            try:
                conn = await AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(1, int(self.timeout_s))
                )
            except _ERRORS as exc:
                log.debug("catalog LISTEN connection failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.2
                    on_change()
                    async for _ in conn.notifies():
                        on_change()
            except _ERRORS as exc:
                log.warning("catalog LISTEN connection lost (%s); reconnecting", _reason(exc))
                await asyncio.sleep(delay)


@dataclass(frozen=True)
class ImportedBuild:
    """A committed engine of a single-node store, as ``kiln catalog import`` brings it in."""

    cache_key: str
    model_sha256: str
    options: dict[str, Any]
    meta: dict[str, Any]


_VERSION_COLUMNS = (
    "name, version, model_sha256, model_filename, options, batching, state, error, progressive, "
    "extract(epoch FROM created_at) AS created_at"
)
_BUILD_COLUMNS = "cache_key, state, holder, generation, meta, error"


async def _prune(conn: AsyncConnection, name: str, max_versions: int) -> list[int]:
    """Keep the newest ``max_versions`` versions by number, and the newest ready one;
    delete the others once settled (ready or failed: a pending one may be building
    somewhere, and goes when it settles). The same rule as a single node's, decided
    here by version number alone, so every replica ends with the same versions."""
    cursor = await conn.execute(
        "SELECT version, state FROM versions WHERE name = %s ORDER BY version", (name,)
    )
    rows = [(int(version), state) for version, state in await cursor.fetchall()]
    keep = {version for version, _ in rows[-max_versions:]}
    newest_ready = max((v for v, state in rows if state == CatalogState.READY), default=None)
    if newest_ready is not None:
        keep.add(newest_ready)
    doomed = [v for v, state in rows if v not in keep and state != CatalogState.PENDING]
    if doomed:
        await conn.execute("DELETE FROM versions WHERE name = %s AND version = ANY(%s)", (name, doomed))
        await conn.execute(_NOTIFY, (f"delete {name}",))
    return doomed


def _json(value: dict[str, Any] | None) -> Jsonb | None:
    return Jsonb(value) if value is not None else None


def _version(row: dict[str, Any]) -> VersionRecord:
    return VersionRecord(
        name=row["name"],
        version=int(row["version"]),
        model_sha256=row["model_sha256"],
        model_filename=row["model_filename"],
        options=dict(row["options"]),
        batching=dict(row["batching"]),
        state=row["state"],
        error=row["error"],
        created_at=float(row["created_at"]),
        progressive=bool(row["progressive"]),
    )


def _build(row: dict[str, Any]) -> BuildStatus:
    return BuildStatus(
        cache_key=row["cache_key"],
        state=row["state"],
        holder=row["holder"],
        generation=int(row["generation"]),
        meta=row["meta"],
        error=row["error"],
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PoolTimeout):
        return "no database connection within the timeout"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"database error: {first_line}"
