"""What the catalog holds, and the error it raises when it cannot be reached.

The catalog is the one place that says which versions exist and which engines
are built. On a single node that is the store itself: the records the
registry keeps through its ``RecordStore`` and each engine's ``meta.json``
commit point, under the store's exclusive lock. With several replicas it is
``PostgresCatalog``: PostgreSQL holds every mutable fact. Its calls raise
``CatalogUnavailable`` (503) when the database cannot be reached, never a
driver error.

Version numbers are allocated by the catalog and never reused. A build of one
engine cache key is guarded by a ``BuildLease``: whoever holds it builds; its
``generation`` is a fencing token, so a builder whose lease expired and was
taken over cannot commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    progressive: bool = False


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
    progressive: bool = False

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
