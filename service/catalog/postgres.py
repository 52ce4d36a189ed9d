"""``PostgresCatalog``: the catalog of a cluster of replicas, in PostgreSQL (13+).

Every mutation runs in one transaction and sends ``pg_notify`` in it, so the
notification goes out only if the change committed. Each replica LISTENs on a
dedicated connection (``changes``, with TCP keepalives so a silently dead peer is
noticed) and resyncs fully every few seconds, which covers whatever was missed
while reconnecting. Lease expiry is decided on the database clock (``now()``),
never on a replica's.

Any driver error becomes ``CatalogUnavailable`` (503): the database down, a
demoted primary refusing writes (``ReadOnlySqlTransaction``), a connection cut.
A connection that saw such an error is closed, so the pool opens a new one (to
the new primary, after a failover). psycopg's pool reconnects on its own; while
the database is away every call raises after ``timeout_s`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from service.catalog import migrations
from service.catalog.base import (
    BuildLease,
    BuildState,
    BuildStatus,
    CatalogState,
    CatalogUnavailable,
    NewVersion,
    ReplicaReport,
    VersionRecord,
    VersionReport,
    options_digest,
    prune_decision,
)

log = logging.getLogger("kiln.catalog")

CHANNEL = "kiln_catalog"
_NOTIFY = "SELECT pg_notify('kiln_catalog', %s)"
_ERRORS = (psycopg.Error, PoolTimeout)
_PRUNE_LOCK = 0x6B696C6E + 1
# libpq keepalives: a peer that vanished without closing (a partition, a dead node)
# is noticed within about idle + interval x count seconds.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def new_replica_id() -> str:
    """Unique per process start: a restarted pod is a new replica (its old row expires)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class PostgresCatalog:
    shared = True

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
            kwargs={"autocommit": True, **self._connect_args()},
            name="kiln-catalog",
            reconnect_timeout=0,  # keep retrying for as long as the database is away
        )

    def _connect_args(self) -> dict[str, Any]:
        return {"connect_timeout": max(1, int(self.timeout_s)), **KEEPALIVES}

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

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection; driver errors become ``CatalogUnavailable``."""
        try:
            async with self._pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    if not isinstance(exc, psycopg.OperationalError):
                        log.warning("catalog query refused (%s): %s", exc.sqlstate, _first_line(exc))
                    # Discarded rather than reused: after a failover it may still point
                    # at the old primary, which now refuses writes.
                    await conn.close()
                    raise
        except _ERRORS as exc:
            raise CatalogUnavailable(_reason(exc)) from exc

    async def _fetch(self, sql: Any, params: Any = None) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            cursor = await conn.cursor(row_factory=dict_row).execute(sql, params)
            return await cursor.fetchall() if cursor.description else []

    # -- versions --------------------------------------------------------------

    async def create_version(self, spec: NewVersion) -> VersionRecord:
        async with self._connection() as conn, conn.transaction():
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
                f" progressive, options_digest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                f" RETURNING {_VERSION_COLUMNS}",
                (
                    spec.name,
                    allocated["version"],
                    spec.model_sha256,
                    spec.model_filename,
                    Jsonb(spec.options),
                    Jsonb(spec.batching),
                    spec.progressive,
                    options_digest(spec.options),
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            await conn.execute(_NOTIFY, (f"version {spec.name} {allocated['version']}",))
        return _version(row)

    async def versions(self) -> list[VersionRecord]:
        rows = await self._fetch(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY name, version")
        return [_version(row) for row in rows]

    async def set_version_state(
        self, name: str, version: int, state: str, error: dict[str, Any] | None
    ) -> bool:
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE versions SET state = %s, error = %s "
                "WHERE name = %s AND version = %s AND (state <> %s OR error IS DISTINCT FROM %s)",
                (state, _json(error), name, version, state, _json(error)),
            )
            if not cursor.rowcount:
                return False
            await conn.execute(_NOTIFY, (f"state {name} {version}",))
            return True

    async def delete_versions(self, name: str, versions: list[int] | None = None) -> list[int]:
        async with self._connection() as conn, conn.transaction():
            if versions is None:
                cursor = await conn.execute("DELETE FROM versions WHERE name = %s RETURNING version", (name,))
            else:
                cursor = await conn.execute(
                    "DELETE FROM versions WHERE name = %s AND version = ANY(%s) RETURNING version",
                    (name, versions),
                )
            removed = sorted(int(row[0]) for row in await cursor.fetchall())
            if removed:
                await conn.execute(_NOTIFY, (f"delete {name}",))
            return removed

    async def prune(self, max_versions: int) -> list[tuple[str, int]]:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PRUNE_LOCK,))
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {_VERSION_COLUMNS} FROM versions")
            versions = [_version(row) for row in await cur.fetchall()]
            await cur.execute(f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE expires_at > now()")
            replicas = [_replica(row) for row in await cur.fetchall()]
            doomed = prune_decision(versions, replicas, max_versions)
            for name in sorted({name for name, _ in doomed}):
                numbers = [number for n, number in doomed if n == name]
                await conn.execute(
                    "DELETE FROM versions WHERE name = %s AND version = ANY(%s)", (name, numbers)
                )
                await conn.execute(_NOTIFY, (f"delete {name}",))
        return doomed

    async def retry_version(self, name: str, version: int | None = None) -> list[int]:
        async with self._connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "UPDATE versions SET retries = retries + 1, "
                "error = CASE WHEN state = %s THEN NULL ELSE error END, "
                "state = CASE WHEN state = %s THEN %s ELSE state END "
                f"WHERE name = %s AND (%s::int IS NULL OR version = %s) RETURNING {_VERSION_COLUMNS}",
                (
                    CatalogState.FAILED,
                    CatalogState.FAILED,
                    CatalogState.PENDING,
                    name,
                    version,
                    version,
                ),
            )
            chosen = [_version(row) for row in await cur.fetchall()]
            for record in chosen:
                await conn.execute(
                    "UPDATE builds SET state = %s, attempts = 0, retry_at = NULL, error = NULL, "
                    "updated_at = now() WHERE model_sha256 = %s "
                    "AND coalesce(options_digest, '') IN (%s, '') AND state IN (%s, %s)",
                    (
                        BuildState.RELEASED,
                        record.model_sha256,
                        record.options_digest,
                        BuildState.FAILED,
                        BuildState.RELEASED,
                    ),
                )
            if chosen:
                await conn.execute(_NOTIFY, (f"retry {name}",))
        return sorted(record.version for record in chosen)

    async def import_store(
        self, versions: list[VersionRecord], builds: list[ImportedBuild], numbers: dict[str, int]
    ) -> None:
        """Add a single-node store's versions (keeping their numbers; ``numbers``: the
        highest each name ever had) and committed engines, in one transaction. Raises
        ``ValueError`` naming the engines the catalog already has, and then adds nothing."""
        names = sorted({v.name for v in versions})
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute("SELECT name FROM engines WHERE name = ANY(%s)", (names,))
            taken = sorted(row[0] for row in await cursor.fetchall())
            if taken:
                raise ValueError(f"the catalog already has engines named {', '.join(taken)}")
            for name in names:
                top = max([numbers.get(name, 0), *(v.version for v in versions if v.name == name)])
                await conn.execute(
                    "INSERT INTO engines (name, next_version) VALUES (%s, %s)", (name, top + 1)
                )
            for v in versions:
                await conn.execute(
                    "INSERT INTO versions (name, version, model_sha256, model_filename, options,"
                    " batching, state, error, created_at, progressive, options_digest)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s, %s)",
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
                        options_digest(v.options),
                    ),
                )
            for build in builds:
                await conn.execute(
                    "INSERT INTO builds (cache_key, model_sha256, options, options_digest, state, meta) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (cache_key) DO NOTHING",
                    (
                        build.cache_key,
                        build.model_sha256,
                        Jsonb(build.options),
                        options_digest(build.options),
                        BuildState.COMMITTED,
                        Jsonb(build.meta),
                    ),
                )
            await conn.execute(_NOTIFY, ("import",))

    # -- builds ----------------------------------------------------------------

    async def build_status(self, cache_key: str) -> BuildStatus | None:
        rows = await self._fetch(f"SELECT {_BUILD_COLUMNS} FROM builds WHERE cache_key = %s", (cache_key,))
        return _build(rows[0]) if rows else None

    async def acquire_build(
        self, cache_key: str, model_sha256: str, options: dict[str, Any], *, take_over: int | None = None
    ) -> BuildLease | BuildStatus:
        async with self._connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "INSERT INTO builds (cache_key, model_sha256, options, options_digest, state) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (cache_key) DO NOTHING",
                (cache_key, model_sha256, Jsonb(options), options_digest(options), BuildState.RELEASED),
            )
            await cur.execute(
                f"SELECT {_BUILD_COLUMNS} FROM builds WHERE cache_key = %s FOR UPDATE", (cache_key,)
            )
            row = await cur.fetchone()
            assert row is not None
            status = _build(row)
            took_over = (
                status.state == BuildState.BUILDING and status.expired and take_over == status.generation
            )
            free = status.state == BuildState.RELEASED and status.retry_in_s <= 0
            if not (free or took_over):
                return status
            await cur.execute(
                "UPDATE builds SET state = %s, holder = %s, generation = generation + 1, "
                "expires_at = now() + make_interval(secs => %s), error = NULL, meta = NULL, "
                "retry_at = NULL, updated_at = now() WHERE cache_key = %s RETURNING generation, attempts",
                (BuildState.BUILDING, self.replica_id, self.lease_ttl_s, cache_key),
            )
            taken = await cur.fetchone()
            assert taken is not None
            await conn.execute(_NOTIFY, (f"build {cache_key}",))
        return BuildLease(
            cache_key, self.replica_id, int(taken["generation"]), int(taken["attempts"]), took_over=took_over
        )

    async def renew_build(self, lease: BuildLease) -> bool:
        rows = await self._fetch(
            "UPDATE builds SET expires_at = now() + make_interval(secs => %s) "
            "WHERE cache_key = %s AND holder = %s AND generation = %s AND state = %s RETURNING 1",
            (self.lease_ttl_s, lease.cache_key, lease.holder, lease.generation, BuildState.BUILDING),
        )
        return bool(rows)

    async def commit_build(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        return await self._finish(lease, "state = %s, meta = %s", (BuildState.COMMITTED, Jsonb(meta)))

    async def fail_build(
        self, lease: BuildLease, error: dict[str, Any], *, retry_after_s: float | None
    ) -> bool:
        if retry_after_s is None:
            return await self._finish(
                lease, "state = %s, error = %s, attempts = attempts + 1", (BuildState.FAILED, Jsonb(error))
            )
        return await self._finish(
            lease,
            "state = %s, error = %s, attempts = attempts + 1, retry_at = now() + make_interval(secs => %s)",
            (BuildState.RELEASED, Jsonb(error), retry_after_s),
        )

    async def release_build(self, lease: BuildLease) -> bool:
        return await self._finish(lease, "state = %s, retry_at = NULL", (BuildState.RELEASED,))

    async def _finish(self, lease: BuildLease, assignments: str, values: tuple[Any, ...]) -> bool:
        """Set the build's outcome, fenced: only the holder of this generation may,
        whether or not its lease expired meanwhile (nobody took it over, then)."""
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"UPDATE builds SET {assignments}, expires_at = NULL, updated_at = now() "
                "WHERE cache_key = %s AND holder = %s AND generation = %s AND state = %s",
                (*values, lease.cache_key, lease.holder, lease.generation, BuildState.BUILDING),
            )
            if not cursor.rowcount:
                return False
            await conn.execute(_NOTIFY, (f"build {lease.cache_key}",))
            return True

    async def invalidate_build(self, cache_key: str, artifact_sha256: str) -> None:
        await self._fetch(
            "UPDATE builds SET state = %s, meta = NULL, updated_at = now() "
            "WHERE cache_key = %s AND state = %s AND meta->>'artifact_sha256' = %s",
            (BuildState.RELEASED, cache_key, BuildState.COMMITTED, artifact_sha256),
        )

    async def builds(self) -> list[BuildStatus]:
        rows = await self._fetch(f"SELECT {_BUILD_COLUMNS} FROM builds ORDER BY cache_key")
        return [_build(row) for row in rows]

    async def forget_build(self, cache_key: str) -> None:
        await self._fetch(
            "DELETE FROM builds WHERE cache_key = %s AND NOT (state = %s AND expires_at > now())",
            (cache_key, BuildState.BUILDING),
        )

    # -- replicas and named leases -------------------------------------------------

    async def heartbeat(self, device_key: str, report: dict[str, VersionReport]) -> None:
        loaded = {label: r.state for label, r in report.items()}
        details = {label: r.details() for label, r in report.items()}
        await self._fetch(
            "INSERT INTO replicas (id, device_key, expires_at, loaded, details) "
            "VALUES (%s, %s, now() + make_interval(secs => %s), %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "expires_at = EXCLUDED.expires_at, loaded = EXCLUDED.loaded, details = EXCLUDED.details, "
            "device_key = EXCLUDED.device_key",
            (self.replica_id, device_key, self.lease_ttl_s, Jsonb(loaded), Jsonb(details)),
        )

    async def leave(self) -> None:
        await self._fetch("DELETE FROM replicas WHERE id = %s", (self.replica_id,))

    async def live_replicas(self) -> dict[str, ReplicaReport]:
        rows = await self._fetch(
            f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE expires_at > now() ORDER BY id"
        )
        return {row["id"]: _replica(row) for row in rows}

    async def forget_expired_replicas(self, older_than_s: float) -> list[str]:
        rows = await self._fetch(
            "DELETE FROM replicas WHERE expires_at < now() - make_interval(secs => %s) RETURNING id",
            (older_than_s,),
        )
        return [row["id"] for row in rows]

    async def try_lease(self, name: str) -> bool:
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
        since anything may have changed meanwhile. Runs until cancelled; reconnects
        after any error (the caller restarts it should it ever return)."""
        delay = 0.2
        while True:
            try:
                conn = await AsyncConnection.connect(self.url, autocommit=True, **self._connect_args())
            except psycopg.Error as exc:
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
                log.warning("catalog LISTEN connection closed; reconnecting")
            except psycopg.Error as exc:
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
    "retries, options_digest, extract(epoch FROM created_at) AS created_at"
)
_BUILD_COLUMNS = (
    "cache_key, state, holder, generation, meta, error, attempts, model_sha256, options, options_digest, "
    "coalesce(expires_at < now(), false) AS expired, "
    "greatest(0, coalesce(extract(epoch FROM retry_at - now()), 0)) AS retry_in_s, "
    "extract(epoch FROM now() - updated_at) AS idle_s"
)
_REPLICA_COLUMNS = "id, device_key, loaded, details"


def _json(value: dict[str, Any] | None) -> Jsonb | None:
    return Jsonb(value) if value is not None else None


def _version(row: dict[str, Any]) -> VersionRecord:
    options = dict(row["options"])
    return VersionRecord(
        name=row["name"],
        version=int(row["version"]),
        model_sha256=row["model_sha256"],
        model_filename=row["model_filename"],
        options=options,
        batching=dict(row["batching"]),
        state=row["state"],
        error=row["error"],
        created_at=float(row["created_at"]),
        progressive=bool(row["progressive"]),
        retries=int(row["retries"]),
        # Rows written by a kiln older than the digest column get it from their options.
        options_digest=row["options_digest"] or options_digest(options),
    )


def _build(row: dict[str, Any]) -> BuildStatus:
    return BuildStatus(
        cache_key=row["cache_key"],
        state=row["state"],
        holder=row["holder"],
        generation=int(row["generation"]),
        meta=row["meta"],
        error=row["error"],
        attempts=int(row["attempts"]),
        retry_in_s=float(row["retry_in_s"]),
        expired=bool(row["expired"]),
        model_sha256=row["model_sha256"],
        options_digest=row["options_digest"] or options_digest(dict(row["options"])),
        idle_s=float(row["idle_s"]),
    )


def _replica(row: dict[str, Any]) -> ReplicaReport:
    details = dict(row["details"] or {})
    versions = {
        label: VersionReport(
            str(state),
            (details.get(label) or {}).get("error"),
            int((details.get(label) or {}).get("attempts", 0)),
            (details.get(label) or {}).get("phase"),
        )
        for label, state in dict(row["loaded"] or {}).items()
    }
    return ReplicaReport(row["id"], row["device_key"], versions)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PoolTimeout):
        return "no database connection within the timeout"
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return f"the database refuses writes (a standby, or a demoted primary): {_first_line(exc)}"
    return f"database error: {_first_line(exc)}"
