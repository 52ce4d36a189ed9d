"""The catalog: what versions exist, what each replica holds, and which engines are built.

``VersionCatalog`` is the one interface the lifecycle calls. Two implementations:

- ``StoreCatalog`` (``service/catalog/store.py``): a single node. The records live
  in the store (``records/<name>/<version>.json``, each engine's ``meta.json`` as
  its commit point), under the store's exclusive lock; leases live in memory.
- ``PostgresCatalog`` (``service/catalog/postgres.py``): several replicas.
  PostgreSQL holds every mutable fact; leases are decided on the database clock.

Both keep the same contract (``tests/catalog/test_contract.py`` runs one suite
against each). The catalog records and leases; it never drives a version: the
lifecycle (``service/lifecycle``) does, and reports back what it holds. It knows
artifacts only by the names and digests builders give it; the store holds the bytes.

Version numbers are allocated by the catalog and never reused. A build of one
engine cache key is guarded by a ``BuildLease``: whoever holds it builds; its
``generation`` is a fencing token, so a builder whose lease was taken over cannot
commit. Calls raise ``CatalogUnavailable`` (503) when the catalog cannot be
reached or refuses a write, never a driver error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.types import BuildOptions
from service.errors import Unavailable

RETRY_AFTER_S = "2"


class CatalogUnavailable(Unavailable):
    """The catalog cannot be reached (or refuses writes); management calls answer 503."""

    kind = "catalog_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the catalog is unavailable ({reason}); engines already loaded keep serving, "
            "management calls work again when the database is back",
            headers={"Retry-After": RETRY_AFTER_S},
        )


class CatalogState:
    """A version's state in the catalog (cluster-wide; each replica reports its own)."""

    PENDING = "pending"  # no replica has served it yet
    READY = "ready"  # some replica served it (its optimized engine or its baseline)
    FAILED = "failed"  # its build failed for good: a failure the same inputs reproduce, or retries spent


class BuildState:
    BUILDING = "building"  # a holder builds under a lease
    COMMITTED = "committed"  # the artifact is published; ``meta`` names it
    FAILED = "failed"  # failed for good; not tried again until ``retry_version``
    RELEASED = "released"  # free to take (after ``retry_in_s`` when an attempt failed)


PERMANENT_FAILURES = frozenset(
    {"invalid_model", "unsupported_model", "invalid_calibration", "accuracy_rejected"}
)
"""Build failures the same inputs must reproduce: recorded, never retried on their own.
Everything else (a crash, a timeout, out of memory, a full disk, a backend that
returned no engine) is retried with backoff up to ``KILN_BUILD_RETRIES``."""

SERVING_STATES = frozenset({"ready", "fallback", "baseline"})
"""Replica-reported states in which a version answers requests there."""
WORKING_STATES = frozenset({"building", "loading", "baseline"})


def options_digest(options: dict[str, Any]) -> str:
    """One canonical digest of build options, stored on versions and builds alike.

    Fields at their default value are left out, so that a kiln which adds an
    option field (with a default) computes the same digest as one that did not
    have it: rows written before and after an upgrade still match."""
    parsed = BuildOptions.from_dict(options).to_dict()
    defaults = BuildOptions().to_dict()
    canonical = {key: value for key, value in parsed.items() if defaults.get(key, object()) != value}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    retries: int = 0  # bumped by ``retry_version``: replicas start what failed again
    options_digest: str = ""  # ``options_digest(options)``, as stored with the version

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class BuildLease:
    cache_key: str
    holder: str
    generation: int
    attempts: int = 0  # failed attempts before this one
    took_over: bool = False  # the previous holder's lease had expired mid-build


@dataclass(frozen=True)
class BuildStatus:
    cache_key: str
    state: str
    holder: str | None = None
    generation: int = 0
    meta: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    retry_in_s: float = 0.0  # released after a failed attempt: free to take after this
    expired: bool = False  # building, but its holder stopped renewing the lease
    model_sha256: str = ""
    options_digest: str = ""
    idle_s: float = 0.0  # since it last changed


@dataclass(frozen=True)
class VersionReport:
    """One replica's state of one version, as it reports it."""

    state: str
    error: dict[str, Any] | None = None
    attempts: int = 0  # failed local attempts (a load, say) since the last success or retry
    phase: str | None = None

    def details(self) -> dict[str, Any]:
        return {"error": self.error, "attempts": self.attempts, "phase": self.phase}


@dataclass(frozen=True)
class ReplicaReport:
    """A live replica and what it holds (``"name/version"`` → report)."""

    replica_id: str
    device_key: str = ""
    versions: dict[str, VersionReport] = field(default_factory=dict)

    def newest_serving(self, name: str) -> int | None:
        numbers = [
            int(label.rpartition("/")[2])
            for label, report in self.versions.items()
            if label.rpartition("/")[0] == name and report.state in SERVING_STATES
        ]
        return max(numbers, default=None)


def prune_decision(
    versions: Iterable[VersionRecord], replicas: Iterable[ReplicaReport], max_versions: int
) -> list[tuple[str, int]]:
    """The versions to remove: the one pruning rule, applied the same by every catalog.

    Per name, kept: the newest ``max_versions`` by number; the newest ``ready`` in
    the catalog; on every live replica the newest version it serves (or, where it
    serves none yet, every version it is loading), so a rollout never removes
    what a replica still answers with. Of the rest, settled versions (``ready``,
    ``failed``) go; a ``pending`` one goes only once every live replica reports it
    ``failed`` (a failure that stays pending everywhere would otherwise be kept
    forever). Decided by version numbers and reports alone: every replica decides alike."""
    replicas = list(replicas)
    by_name: dict[str, list[VersionRecord]] = {}
    for record in versions:
        by_name.setdefault(record.name, []).append(record)
    doomed: list[tuple[str, int]] = []
    for name, records in sorted(by_name.items()):
        records.sort(key=lambda r: r.version)
        keep = {r.version for r in records[-max_versions:]}
        ready = [r.version for r in records if r.state == CatalogState.READY]
        if ready:
            keep.add(ready[-1])
        for replica in replicas:
            serving = replica.newest_serving(name)
            if serving is not None:
                keep.add(serving)
                continue
            keep.update(
                r.version
                for r in records
                if replica.versions.get(r.label, VersionReport("")).state in WORKING_STATES
            )
        for record in records:
            if record.version in keep:
                continue
            if record.state != CatalogState.PENDING or (
                replicas and all(_reported(replica, record) == "failed" for replica in replicas)
            ):
                doomed.append(record.key)
    return doomed


def _reported(replica: ReplicaReport, record: VersionRecord) -> str | None:
    report = replica.versions.get(record.label)
    return report.state if report is not None else None


class VersionCatalog(Protocol):
    """What the lifecycle asks of the catalog. Every call may raise ``CatalogUnavailable``."""

    replica_id: str
    lease_ttl_s: float

    @property
    def shared(self) -> bool:
        """Whether other replicas share this catalog (a version may be served elsewhere)."""
        ...

    async def start(self) -> None:
        """Open (a single node: take the store's lock and sweep its leftovers;
        PostgreSQL: connect and migrate)."""

    async def close(self) -> None: ...

    # -- versions: allocate, record state, prune, delete, retry --------------------

    async def create_version(self, spec: NewVersion) -> VersionRecord:
        """The next version of ``spec.name``: a number never used for that name before."""
        ...

    async def versions(self) -> list[VersionRecord]:
        """Every version, ordered by name and number."""
        ...

    async def set_version_state(
        self, name: str, version: int, state: str, error: dict[str, Any] | None
    ) -> bool:
        """Record a version's catalog state; False when it is gone or already so."""
        ...

    async def delete_versions(self, name: str, versions: list[int] | None = None) -> list[int]: ...

    async def prune(self, max_versions: int) -> list[tuple[str, int]]:
        """Remove what ``prune_decision`` says, from the live replicas' reports."""
        ...

    async def retry_version(self, name: str, version: int | None = None) -> list[int]:
        """Start failed versions (and their failed builds) again: their state goes
        back to ``pending`` and ``retries`` goes up, so replicas try them afresh."""
        ...

    # -- builds: lease, renew, commit, fail ---------------------------------------------

    async def build_status(self, cache_key: str) -> BuildStatus | None: ...

    async def acquire_build(
        self, cache_key: str, model_sha256: str, options: dict[str, Any], *, take_over: int | None = None
    ) -> BuildLease | BuildStatus:
        """The lease when the build is free (never built, released and due); with
        ``take_over``, also when it is building under that generation with an
        expired lease. Otherwise its status."""
        ...

    async def renew_build(self, lease: BuildLease) -> bool: ...

    async def commit_build(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        """Publish ``meta`` as the build's outcome, fenced: only this generation's
        holder may, however late (False: the lease passed to another)."""
        ...

    async def fail_build(
        self, lease: BuildLease, error: dict[str, Any], *, retry_after_s: float | None
    ) -> bool:
        """Record a failed attempt: released for another try after ``retry_after_s``,
        or failed for good (``None``)."""
        ...

    async def release_build(self, lease: BuildLease) -> bool:
        """Give the lease up without an outcome (a cancelled build): free at once."""
        ...

    async def invalidate_build(self, cache_key: str, artifact_sha256: str) -> None:
        """Forget a committed artifact that turned out corrupt (once: by its sha256)."""

    async def builds(self) -> list[BuildStatus]: ...

    async def forget_build(self, cache_key: str) -> None: ...

    # -- replicas, named leases, the change feed ---------------------------------------

    async def heartbeat(self, device_key: str, report: dict[str, VersionReport]) -> None:
        """Say this replica is alive and what it holds, for ``lease_ttl_s``."""

    async def leave(self) -> None: ...

    async def live_replicas(self) -> dict[str, ReplicaReport]: ...

    async def forget_expired_replicas(self, older_than_s: float) -> list[str]:
        """Remove the rows of replicas whose heartbeat expired ``older_than_s`` ago."""
        ...

    async def try_lease(self, name: str) -> bool:
        """Take or renew a named lease (``gc``) for ``lease_ttl_s``."""
        ...

    async def changes(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` on every change, and once on (re)connecting; runs until
        cancelled."""
