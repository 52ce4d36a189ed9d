"""``StoreCatalog``: the catalog of a single node, kept in the store itself.

Versions are ``records/<name>/<version>.json``; ``records/numbers.json`` keeps the
highest number each name ever had, so a deleted version's number is never given
again. An engine is committed when its ``engines/<key>/meta.json`` exists (it
names the artifact and its sha256). One process owns the store (``start`` takes
its exclusive lock), so build leases, failed attempts and the replica report
live in memory; a restart forgets failed attempts (its versions' records keep
their state).

``start`` also sweeps what an interrupted write left (the store's ``tmp/`` and
engine directories never committed): nobody else can be writing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engines.errors import StoreCorrupted
from engines.store import EngineStore
from service.catalog.base import (
    BuildLease,
    BuildState,
    BuildStatus,
    CatalogState,
    NewVersion,
    ReplicaReport,
    VersionRecord,
    VersionReport,
    options_digest,
    prune_decision,
)

log = logging.getLogger("kiln.catalog")

NUMBERS = "numbers.json"

# Records written before the catalog recorded catalog states held the server's own
# state; this is what each one means now (None: a delete the restart interrupted).
_LEGACY_STATES: dict[str, str | None] = {
    "ready": CatalogState.READY,
    "fallback": CatalogState.READY,
    "baseline": CatalogState.READY,
    "failed": CatalogState.FAILED,
    "building": CatalogState.PENDING,  # interrupted by a restart: built again
    "loading": CatalogState.PENDING,
    "unloading": None,
    CatalogState.PENDING: CatalogState.PENDING,
}


@dataclass
class _Build:
    """A build not (or no longer) committed: leased, released after a failure, or failed."""

    state: str
    generation: int
    holder: str | None = None
    attempts: int = 0
    retry_at: float = 0.0  # time.monotonic()
    error: dict[str, Any] | None = None
    model_sha256: str = ""
    digest: str = ""
    changed_at: float = field(default_factory=time.monotonic)

    def move(self, state: str, holder: str | None) -> None:
        self.state, self.holder, self.changed_at = state, holder, time.monotonic()


class StoreCatalog:
    shared = False

    def __init__(
        self,
        store: EngineStore,
        *,
        replica_id: str = "local",
        lease_ttl_s: float = 30.0,
        lock_hint: str = "stop the other process",
        default_progressive: bool = True,
    ) -> None:
        self.store = store
        self.replica_id = replica_id
        self.lease_ttl_s = lease_ttl_s
        self.lock_hint = lock_hint
        self.default_progressive = default_progressive
        self._records: dict[tuple[str, int], VersionRecord] = {}
        self._numbers: dict[str, int] = {}
        self._builds: dict[str, _Build] = {}
        self._generations: dict[str, int] = {}
        self._report: ReplicaReport | None = None
        self._changed: asyncio.Event | None = None
        self._legacy_keys: dict[str, tuple[str, dict[str, Any]]] = {}
        self.problems: list[str] = []  # records it could not read, and why

    # -- opening -----------------------------------------------------------------

    async def start(self) -> None:
        self.store.lock_exclusive(hint=self.lock_hint)
        removed = self.store.cleanup_tmp()
        if removed:
            log.info("removed %d leftover temporary files from the store", removed)
        self._load()

    async def close(self) -> None:
        self.store.unlock()

    def _load(self) -> None:
        records, problems = self.store.load_records()
        for problem in problems:
            log.warning("unreadable record in the store: %s", problem)
            self.problems.append(f"{problem} (unreadable)")
        for raw in records:
            try:
                state = _LEGACY_STATES[str(raw["state"])]
                name, number = str(raw["name"]), int(raw["version"])
                if state is None:  # its delete was interrupted: finish it
                    self.store.delete_record(name, number)
                    continue
                record = VersionRecord(
                    name=name,
                    version=number,
                    model_sha256=str(raw["model_sha256"]),
                    model_filename=str(raw.get("model_filename", "")),
                    options=dict(raw["options"]),
                    batching=dict(raw["batching"]),
                    state=state,
                    error=raw.get("error"),
                    created_at=float(raw.get("created_at", time.time())),
                    # Recorded before progressive engines existed: the server's setting.
                    progressive=bool(raw.get("progressive", self.default_progressive)),
                    retries=int(raw.get("retries", 0)),
                    options_digest=options_digest(dict(raw["options"])),  # refuses options it cannot read
                )
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping a malformed record %s: %s", raw.get("name"), exc)
                self.problems.append(f"{raw.get('name')} v{raw.get('version')} (malformed record: {exc})")
                continue
            self._records[record.key] = record
            if raw.get("state") != state or "retries" not in raw:
                self._save(record)  # in this catalog's format from now on
            if raw.get("cache_key"):  # older records name their engine
                self._legacy_keys[str(raw["cache_key"])] = (record.model_sha256, record.options)
        self._upgrade_engines()
        numbers = self.store.root / "records" / NUMBERS
        if numbers.exists():
            try:
                self._numbers = {str(k): int(v) for k, v in _read_json(numbers).items()}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("unreadable %s (%s); numbering continues from the records", numbers, exc)
        for name, number in self._records:
            self._numbers[name] = max(self._numbers.get(name, 0), number)

    def _upgrade_engines(self) -> None:
        """Engines committed before the catalog name only their options in ``meta.json``;
        their versions' older records name their key. Write the model and options digest
        in, so garbage collection matches them to versions as it does newer ones."""
        for cache_key, (model_sha256, options) in self._legacy_keys.items():
            try:
                meta = self.store.engine_meta(cache_key)
            except StoreCorrupted:
                continue  # rebuilt when a version needs it
            if meta is not None and not meta.get("model_sha256"):
                meta.update(model_sha256=model_sha256, options_digest=options_digest(options))
                self.store.write_json(self.store.engine_dir(cache_key) / "meta.json", meta)

    def highest(self, name: str) -> int:
        """The highest number ``name`` ever had here (0: none)."""
        return self._numbers.get(name, 0)

    # -- versions ------------------------------------------------------------------

    async def create_version(self, spec: NewVersion) -> VersionRecord:
        number = self._numbers.get(spec.name, 0) + 1
        self._numbers[spec.name] = number
        self.store.write_json(self.store.root / "records" / NUMBERS, self._numbers)
        record = VersionRecord(
            name=spec.name,
            version=number,
            model_sha256=spec.model_sha256,
            model_filename=spec.model_filename,
            options=dict(spec.options),
            batching=dict(spec.batching),
            created_at=time.time(),
            progressive=spec.progressive,
            options_digest=options_digest(spec.options),
        )
        self._save(record)
        return record

    async def versions(self) -> list[VersionRecord]:
        return [self._records[key] for key in sorted(self._records)]

    async def set_version_state(
        self, name: str, version: int, state: str, error: dict[str, Any] | None
    ) -> bool:
        record = self._records.get((name, version))
        if record is None or (record.state, record.error) == (state, error):
            return False
        self._save(replace(record, state=state, error=error))
        return True

    async def delete_versions(self, name: str, versions: list[int] | None = None) -> list[int]:
        removed = sorted(
            number for (n, number) in self._records if n == name and (versions is None or number in versions)
        )
        for number in removed:
            del self._records[(name, number)]
            self.store.delete_record(name, number)
        if removed:
            self._notify()
        return removed

    async def prune(self, max_versions: int) -> list[tuple[str, int]]:
        replicas = [self._report] if self._report is not None else []
        doomed = prune_decision(self._records.values(), replicas, max_versions)
        for name, number in doomed:
            await self.delete_versions(name, [number])
        return doomed

    async def retry_version(self, name: str, version: int | None = None) -> list[int]:
        chosen = [r for r in self._records.values() if r.name == name and version in (None, r.version)]
        for record in chosen:
            state = CatalogState.PENDING if record.state == CatalogState.FAILED else record.state
            error = None if record.state == CatalogState.FAILED else record.error
            self._save(replace(record, state=state, error=error, retries=record.retries + 1))
            for key, build in list(self._builds.items()):
                if (build.model_sha256, build.digest) == (
                    record.model_sha256,
                    record.options_digest,
                ) and build.state in (
                    BuildState.FAILED,
                    BuildState.RELEASED,
                ):
                    del self._builds[key]
        return sorted(r.version for r in chosen)

    def _save(self, record: VersionRecord) -> None:
        self._records[record.key] = record
        self.store.save_record(
            {
                "name": record.name,
                "version": record.version,
                "model_sha256": record.model_sha256,
                "model_filename": record.model_filename,
                "options": record.options,
                "batching": record.batching,
                "state": record.state,
                "error": record.error,
                "created_at": record.created_at,
                "progressive": record.progressive,
                "retries": record.retries,
            }
        )
        self._notify()

    # -- builds --------------------------------------------------------------------

    async def build_status(self, cache_key: str) -> BuildStatus | None:
        build = self._builds.get(cache_key)
        if build is not None:
            return self._status(cache_key, build)
        return self._committed(cache_key)

    def _committed(self, cache_key: str) -> BuildStatus | None:
        try:
            meta = self.store.engine_meta(cache_key)
        except StoreCorrupted as exc:
            log.warning("%s; rebuilding it from the stored model", exc.message)
            self.store.discard_engine(cache_key)
            return None
        if meta is None:
            return None
        model_sha256, digest = self._source(cache_key, meta)
        try:
            idle_s = time.time() - (self.store.engine_dir(cache_key) / "meta.json").stat().st_mtime
        except OSError:
            idle_s = 0.0
        return BuildStatus(
            cache_key,
            BuildState.COMMITTED,
            generation=self._generations.get(cache_key, 0),
            meta=meta,
            model_sha256=model_sha256,
            options_digest=digest,
            idle_s=idle_s,
        )

    def _source(self, cache_key: str, meta: dict[str, Any]) -> tuple[str, str]:
        """The model and options digest a committed engine was built from (older
        engines' metadata lacks them: their versions' records name the key)."""
        if meta.get("model_sha256") and meta.get("options_digest"):
            return str(meta["model_sha256"]), str(meta["options_digest"])
        legacy = self._legacy_keys.get(cache_key)
        if legacy is not None:
            return legacy[0], options_digest(legacy[1])
        return "", options_digest(meta["options"]) if isinstance(meta.get("options"), dict) else ""

    def _status(self, cache_key: str, build: _Build) -> BuildStatus:
        return BuildStatus(
            cache_key,
            build.state,
            holder=build.holder,
            generation=build.generation,
            error=build.error,
            attempts=build.attempts,
            retry_in_s=max(0.0, build.retry_at - time.monotonic()),
            model_sha256=build.model_sha256,
            options_digest=build.digest,
            idle_s=time.monotonic() - build.changed_at,
        )

    async def acquire_build(
        self, cache_key: str, model_sha256: str, options: dict[str, Any], *, take_over: int | None = None
    ) -> BuildLease | BuildStatus:
        # One process: a lease is never abandoned while this catalog lives, so
        # ``take_over`` never applies.
        status = await self.build_status(cache_key)
        if status is not None and not (status.state == BuildState.RELEASED and status.retry_in_s <= 0):
            return status
        generation = self._generations.get(cache_key, 0) + 1
        self._generations[cache_key] = generation
        attempts = status.attempts if status is not None else 0
        self._builds[cache_key] = _Build(
            BuildState.BUILDING,
            generation,
            self.replica_id,
            attempts,
            model_sha256=model_sha256,
            digest=options_digest(options),
        )
        self._notify()
        return BuildLease(cache_key, self.replica_id, generation, attempts)

    def _held(self, lease: BuildLease) -> _Build | None:
        build = self._builds.get(lease.cache_key)
        if (
            build is None
            or build.state != BuildState.BUILDING
            or (build.holder, build.generation) != (lease.holder, lease.generation)
        ):
            return None
        return build

    async def renew_build(self, lease: BuildLease) -> bool:
        return self._held(lease) is not None

    async def commit_build(self, lease: BuildLease, meta: dict[str, Any]) -> bool:
        build = self._held(lease)
        if build is None:
            return False
        committed = {**meta, "model_sha256": build.model_sha256, "options_digest": build.digest}
        self.store.write_json(self.store.engine_dir(lease.cache_key) / "meta.json", committed)
        del self._builds[lease.cache_key]
        self._notify()
        return True

    async def fail_build(
        self, lease: BuildLease, error: dict[str, Any], *, retry_after_s: float | None
    ) -> bool:
        build = self._held(lease)
        if build is None:
            return False
        build.error = error
        build.attempts += 1
        if retry_after_s is None:
            build.move(BuildState.FAILED, None)
        else:
            build.move(BuildState.RELEASED, None)
            build.retry_at = time.monotonic() + retry_after_s
        self._notify()
        return True

    async def release_build(self, lease: BuildLease) -> bool:
        build = self._held(lease)
        if build is None:
            return False
        build.move(BuildState.RELEASED, None)
        build.retry_at = 0.0
        self._notify()
        return True

    async def invalidate_build(self, cache_key: str, artifact_sha256: str) -> None:
        status = self._committed(cache_key)
        if status is not None and (status.meta or {}).get("artifact_sha256") == artifact_sha256:
            self.store.discard_engine(cache_key)
            self._notify()

    async def builds(self) -> list[BuildStatus]:
        statuses = {key: self._status(key, build) for key, build in self._builds.items()}
        for directory in sorted((self.store.root / "engines").iterdir()):
            if directory.name not in statuses and (directory / "meta.json").exists():
                committed = self._committed(directory.name)
                if committed is not None:
                    statuses[directory.name] = committed
        return [statuses[key] for key in sorted(statuses)]

    async def forget_build(self, cache_key: str) -> None:
        self._builds.pop(cache_key, None)

    # -- this replica ---------------------------------------------------------------

    async def heartbeat(self, device_key: str, report: dict[str, VersionReport]) -> None:
        self._report = ReplicaReport(self.replica_id, device_key, dict(report))

    async def leave(self) -> None:
        self._report = None

    async def live_replicas(self) -> dict[str, ReplicaReport]:
        return {self.replica_id: self._report} if self._report is not None else {}

    async def forget_expired_replicas(self, older_than_s: float) -> list[str]:
        return []

    async def try_lease(self, name: str) -> bool:
        return True

    async def changes(self, on_change: Callable[[], None]) -> None:
        changed = self._event()
        on_change()
        while True:
            await changed.wait()
            changed.clear()
            on_change()

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()


def _read_json(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value
