"""The catalog: the one place that says which versions exist and which engines are built.

Two implementations share this contract: ``EmbeddedCatalog`` (one server, the
store's own records, nothing to install) and ``PostgresCatalog`` (several
replicas on one store; PostgreSQL holds every mutable fact). Every method is a
coroutine that runs on the event loop; a catalog that cannot be reached raises
``CatalogUnavailable`` (503), never a driver error.

Version numbers are allocated by the catalog and never reused. A build of one
engine cache key is guarded by a ``BuildLease``: whoever holds it builds; its
``generation`` is a fencing token, so a builder whose lease expired and was
taken over cannot commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from service.errors import Unavailable

RETRY_AFTER_S = "2"


class CatalogUnavailable(Unavailable):
    """The catalog database cannot be reached; management calls answer 503."""

    kind = "catalog_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the catalog is unavailable ({reason}); engines already loaded keep serving, "
            "management calls work again when the database is back",
            headers={"Retry-After": RETRY_AFTER_S},
        )


class CatalogState:
    """A version's state in the catalog (cluster-wide; each replica adds its own)."""

    PENDING = "pending"  # no replica has served it yet
    READY = "ready"  # at least one replica served it
    FAILED = "failed"  # its build failed for a reason that would fail anywhere


class BuildState:
    BUILDING = "building"  # a holder builds under a lease
    COMMITTED = "committed"  # the artifact is published; ``meta`` names it
    FAILED = "failed"  # deterministic failure, stored so nobody retries it
    RELEASED = "released"  # the holder gave up (crash, cancel, timeout): free to take


@dataclass(frozen=True)
class NewVersion:
    """What an upload asks the catalog to register."""

    name: str
    model_sha256: str
    model_filename: str
    options: dict[str, Any]
    batching: dict[str, Any]


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: int
    model_sha256: str
    model_filename: str
    options: dict[str, Any]
    batching: dict[str, Any]
    state: str = CatalogState.PENDING
    error: dict[str, Any] | None = None
    created_at: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


@dataclass(frozen=True)
class Allocation:
    """The result of ``create_version``: the new version and the ones pruned with it."""

    version: VersionRecord
    pruned: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class BuildLease:
    cache_key: str
    holder: str
    generation: int
    took_over: bool = False  # the previous holder's lease had expired mid-build


@dataclass(frozen=True)
class BuildStatus:
    cache_key: str
    state: str
    holder: str | None = None
    generation: int = 0
    meta: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Catalog(Protocol):
    """What the lifecycle needs from the source of truth (see the module docstring)."""

    replica_id: str

    async def start(self) -> None:
        """Connect (and migrate); raise ``CatalogUnavailable`` when it cannot."""

    async def close(self) -> None: ...

    async def create_version(self, spec: NewVersion, max_versions: int) -> Allocation:
        """Allocate the next number of ``spec.name``, insert it and prune the oldest
        versions beyond ``max_versions``, in one transaction."""

    async def versions(self) -> list[VersionRecord]:
        """Every version that exists, ordered by name and number."""

    async def set_version_state(
        self, name: str, version: int, state: str, error: dict[str, Any] | None, max_versions: int
    ) -> list[int]:
        """Record a version's catalog state; returns the versions this let it prune."""

    async def delete_versions(self, name: str, versions: list[int] | None = None) -> list[int]:
        """Remove versions (all of ``name`` when None); returns the numbers removed."""

    async def build_status(self, cache_key: str) -> BuildStatus | None: ...

    async def acquire_build(
        self, cache_key: str, model_sha256: str, options: dict[str, Any]
    ) -> BuildLease | BuildStatus:
        """The lease when this replica may build; otherwise the build's status."""

    async def renew_build(self, lease: BuildLease) -> bool:
        """Extend the lease; False when it was lost (the build must stop)."""

    async def commit_build(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        """Publish the built engine's metadata; False when fenced out by a newer lease."""

    async def fail_build(self, lease: BuildLease, error: dict[str, Any], *, deterministic: bool) -> None:
        """Record a failure (kept when ``deterministic``, else the lease is released)."""

    async def invalidate_build(self, cache_key: str, artifact_sha256: str) -> None:
        """Forget a committed artifact that turned out missing or corrupt, so it is rebuilt."""
