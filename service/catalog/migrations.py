"""The catalog's schema, as numbered migrations applied in order at start-up.

A migration is never edited once released: a change is a new entry at the end.
``apply`` runs under a transaction-scoped advisory lock, so replicas that start
together apply each migration exactly once.
"""

from __future__ import annotations

from psycopg import AsyncConnection

ADVISORY_LOCK_KEY = 0x6B696C6E  # "kiln"

MIGRATIONS: list[str] = [
    # 1: versions, builds, replicas, leases
    """
    CREATE TABLE engines (
        name text PRIMARY KEY,
        next_version integer NOT NULL
    );
    CREATE TABLE versions (
        name text NOT NULL,
        version integer NOT NULL,
        model_sha256 text NOT NULL,
        model_filename text NOT NULL DEFAULT '',
        options jsonb NOT NULL,
        batching jsonb NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        error jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version)
    );
    CREATE TABLE builds (
        cache_key text PRIMARY KEY,
        model_sha256 text NOT NULL,
        options jsonb NOT NULL,
        state text NOT NULL,
        holder text,
        generation bigint NOT NULL DEFAULT 0,
        expires_at timestamptz,
        meta jsonb,
        error jsonb,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE replicas (
        id text PRIMARY KEY,
        device_key text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        loaded jsonb NOT NULL DEFAULT '{}'
    );
    CREATE TABLE leases (
        name text PRIMARY KEY,
        holder text NOT NULL,
        generation bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    """,
    # 2: progressive versions (served on a baseline engine while theirs builds)
    """
    ALTER TABLE versions ADD COLUMN progressive boolean NOT NULL DEFAULT false;
    """,
    # 3: one options digest on versions and builds (garbage collection matches them by
    # it); retries of failed builds with backoff; what each replica reports per version
    """
    ALTER TABLE versions ADD COLUMN options_digest text;
    ALTER TABLE versions ADD COLUMN retries integer NOT NULL DEFAULT 0;
    ALTER TABLE builds ADD COLUMN options_digest text;
    ALTER TABLE builds ADD COLUMN attempts integer NOT NULL DEFAULT 0;
    ALTER TABLE builds ADD COLUMN retry_at timestamptz;
    ALTER TABLE replicas ADD COLUMN details jsonb NOT NULL DEFAULT '{}';
    """,
]


async def apply(conn: AsyncConnection) -> list[int]:
    """Apply the migrations this database lacks; returns their numbers."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"the catalog's schema is version {current}, newer than this kiln knows "
                f"({len(MIGRATIONS)}); upgrade kiln"
            )
        for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
            await conn.execute(sql.encode())
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
            applied.append(number)
    return applied
