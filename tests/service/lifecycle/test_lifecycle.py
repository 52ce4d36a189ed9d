"""Pure asyncio tests of the engine lifecycle's state machine: the real manager,
registry, store, single-node catalog and reconciler, with a build runner and a
backend whose every step the test releases by hand (no child processes, no real
engines)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.errors import StoreCorrupted, UnsupportedModel
from engines.store import EngineStore
from engines.types import BuildOptions, DeviceSignature, Signature, TensorSpec, engine_cache_key
from service.batching import BatchingConfig
from service.catalog.store import StoreCatalog
from service.lifecycle.garbage import collect_garbage
from service.lifecycle.jobs import BuildFailure
from service.lifecycle.manager import EngineManager
from service.lifecycle.reconcile import Reconciler
from service.lifecycle.registry import EngineVersion, Registry
from service.lifecycle.states import ALLOWED, WORKING, IllegalTransition, VersionState
from service.metrics import KilnMetrics
from service.settings import Settings

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "float32", (-1, 4)),),
    outputs=(TensorSpec("y", "float32", (-1, 4)),),
    batchable=True,
)
MODEL_SHA = "a" * 64
OTHER_SHA = "b" * 64


class FakeBuilds:
    """The ``BuildRunner`` interface; each build waits until the test finishes or
    fails it, and a finished build publishes a real artifact into the store (the
    catalog commits it)."""

    def __init__(self, store: EngineStore, workers: int = 4) -> None:
        self.store = store
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self._slots = asyncio.Semaphore(workers)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

    async def run(self, job: Any, on_progress: Any, *, job_id: str) -> dict[str, Any]:
        assert job_id not in self.pending, f"job id {job_id} reused while running"
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[job_id] = gate
        self.started.append(job_id)
        on_progress("build", 0.5)
        try:
            await gate
        finally:
            del self.pending[job_id]
        artifact = self.store.temp_path(".bin")
        artifact.write_bytes(b"engine " + job.cache_key.encode())
        meta = {"signature": SIGNATURE.to_dict(), "max_batch_size": 8, "backend": "fake", "precision": "fp32"}
        return self.store.commit_engine(
            job.cache_key, artifact, ".bin", meta, write_commit_point=job.write_commit_point
        )

    def finish(self, job_id: str) -> None:
        self.pending[job_id].set_result(None)

    def fail(self, job_id: str, kind: str = "accuracy_rejected") -> None:
        self.pending[job_id].set_exception(BuildFailure(kind, f"the fake build failed ({kind})"))

    def cancel(self, job_id: str) -> None:
        if job_id in self.pending and not self.pending[job_id].done():
            self.cancelled.append(job_id)
            self.pending[job_id].set_exception(BuildFailure("cancelled", "the build was cancelled"))

    async def shutdown(self) -> None:
        for job_id in list(self.pending):
            self.cancel(job_id)


class FakeRunner:
    def __init__(self) -> None:
        self.closed = False

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(feeds["x"])}

    infer_prechecked = infer

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Loads wait on a gate per ``instances`` value (a tag the test gives each
    version); ``failures`` maps a tag to the error its load raises."""

    name = "fake"

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.failures: dict[int, Exception] = {}
        self.loads = 0

    def device_signature(self) -> DeviceSignature:
        return DeviceSignature("fake", "1")

    def gate(self, tag: int) -> threading.Event:
        return self.gates.setdefault(tag, threading.Event())

    def load(
        self, artifact: Path, signature: Signature, options: BuildOptions, *, instances: int
    ) -> FakeRunner:
        self.loads += 1
        if not self.gate(instances).wait(10):
            raise AssertionError(f"load {instances} was never released")
        failure = self.failures.pop(instances, None)
        if failure is not None:
            raise failure
        return FakeRunner()


class Lifecycle:
    """A manager on a real store, single-node catalog and registry (and, once started,
    its reconciler), with the fakes above."""

    def __init__(self, root: Path, **settings: Any) -> None:
        defaults: dict[str, Any] = {"catalog_resync_s": 0.1, "build_retry_backoff_s": 0.05}
        self.settings = Settings(store=root, backend="onnxruntime", **{**defaults, **settings})
        self.store = EngineStore(root)
        self.builds = FakeBuilds(self.store)
        self.backend = FakeBackend()
        self.catalog = StoreCatalog(self.store)
        self.registry = Registry()
        self.manager = EngineManager(
            self.settings,
            self.store,
            self.registry,
            self.backend,  # type: ignore[arg-type]
            KilnMetrics(),
            self.builds,  # type: ignore[arg-type]
            self.catalog,
        )
        self.reconciler = Reconciler(self.catalog, self.manager)

    async def start(self) -> Lifecycle:
        """Open the catalog and follow it (the first pass restores what it holds)."""
        await self.reconciler.start()
        return self

    async def upload(self, name: str = "m", *, tag: int = 1, sha: str = MODEL_SHA) -> EngineVersion:
        self.store.model_path(sha).write_bytes(b"model")
        return await self.manager.register(
            name, sha, "m.onnx", BuildOptions(), BatchingConfig(max_batch_size=8, instances=tag)
        )

    async def delete(self, version: EngineVersion) -> None:
        """What ``DELETE /engines/{name}/versions/{v}`` does."""
        assert await self.catalog.delete_versions(version.name, [version.version]) == [version.version]
        await self.reconciler.sync()
        await self.manager.unload(version)

    def release(self, tag: int = 1) -> None:
        self.backend.gate(tag).set()

    def records(self, name: str = "m") -> dict[int, str]:
        return {int(p.stem): _state_of(p) for p in (self.store.root / "records" / name).glob("*.json")}

    def versions(self, name: str = "m") -> list[int]:
        return [v.version for v in self.registry.all_versions() if v.name == name]

    async def close(self) -> None:
        await self.reconciler.stop()
        await self.manager.shutdown(0)
        await self.catalog.close()


def _state_of(path: Path) -> str:
    match = re.search(r'"state": "(\w+)"', path.read_text())
    assert match is not None
    return match.group(1)


async def until(condition: Any, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def settled(version: EngineVersion) -> VersionState:
    await until(lambda: version.state not in WORKING, f"v{version.version} to settle")
    return version.state


@pytest.fixture
async def life(tmp_path: Path) -> Any:
    # No retries: a failure stays (tests of retries make their own).
    lifecycle = await Lifecycle(tmp_path / "store", max_versions_per_engine=2, build_retries=0).start()
    yield lifecycle
    for gate in lifecycle.backend.gates.values():
        gate.set()
    await lifecycle.close()


# -- the table -----------------------------------------------------------------


MOVES = list(itertools.product(VersionState, VersionState))


@pytest.mark.parametrize(("current", "new"), MOVES, ids=[f"{a}->{b}" for a, b in MOVES])
def test_every_allowed_move_is_made_and_every_other_refused(
    tmp_path: Path, current: VersionState, new: VersionState
) -> None:
    life = Lifecycle(tmp_path / "store")  # not following a catalog: only the table acts
    woken: list[int] = []
    life.manager.changed = lambda: woken.append(1)
    version = EngineVersion(
        "m", 1, MODEL_SHA, BuildOptions(), BatchingConfig(), cache_key="c" * 64, _state=current
    )
    life.registry.index(version)
    if new in ALLOWED[current]:
        life.manager.transition(
            version, new, error={"type": "x", "message": "y"} if new == "failed" else None
        )
        assert version.state == new
        assert woken == [1]  # whoever follows the catalog hears of every change
    else:
        with pytest.raises(IllegalTransition, match=f"from {current} to {new}"):
            life.manager.transition(version, new)
        assert version.state == current and woken == []


def test_only_the_state_machine_assigns_a_state() -> None:
    root = Path(__file__).parents[3] / "service"
    writes = [
        f"{path.relative_to(root)}: {line.strip()}"
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"\bmove_to\(|\._state\s*=(?!=)|version\.state\s*=(?!=)", line)
        and not line.strip().startswith(("def ", '"""'))
    ]
    assert sorted(writes) == [
        "lifecycle/manager.py: version.move_to(state)",
        "lifecycle/registry.py: self._state = state",
    ]


# -- uploads, builds, loads ------------------------------------------------------------


async def test_upload_builds_loads_and_serves(life: Lifecycle) -> None:
    version = await life.upload()
    assert version.state == "building" and life.records() == {1: "pending"}
    await until(lambda: life.builds.pending, "the build to start")
    assert version.progress > 0 and version.phase == "build"
    life.builds.finish(life.builds.started[0])
    await until(lambda: version.state == "loading", "loading")
    assert not version.servable
    life.release()
    assert await settled(version) == "ready"
    assert version.servable and version.progress == 1.0 and version.phase is None
    assert life.registry.servable("m") is version
    await until(lambda: life.records() == {1: "ready"}, "the catalog to record it ready")


async def test_a_failed_build_fails_for_good_and_a_failed_load_is_tried_again(tmp_path: Path) -> None:
    life = await Lifecycle(tmp_path / "store", build_retries=1).start()
    try:
        await _fail_a_build_and_a_load(life)
    finally:
        await life.close()


async def _fail_a_build_and_a_load(life: Lifecycle) -> None:
    first = await life.upload(sha=MODEL_SHA)
    second = await life.upload(sha=OTHER_SHA, tag=2)
    await until(lambda: len(life.builds.pending) == 2, "two builds")
    life.builds.fail(life.builds.started[0])
    assert await settled(first) == "failed"
    assert first.error == {
        "type": "accuracy_rejected",
        "message": "the fake build failed (accuracy_rejected)",
    }
    assert first.final and first.retry_in_s is None  # the same inputs would fail again
    # A load that fails is this process's problem (out of memory, say): tried again.
    life.backend.failures[2] = UnsupportedModel("cannot load this")
    life.builds.finish(life.builds.started[1])
    life.release(2)
    await until(lambda: second.state == "failed", "the failed load")
    assert second.error == {"type": "unsupported_model", "message": "cannot load this"}
    assert not second.final and second.attempts == 1
    assert await settled(second) == "failed"
    await until(lambda: second.state == "ready", "the load tried again")
    assert second.attempts == 0 and life.backend.loads == 2
    assert len(life.builds.started) == 2  # the engine was committed: loaded again, not rebuilt
    await until(lambda: life.records() == {1: "failed", 2: "ready"}, "the catalog states")


async def test_a_transient_build_failure_is_retried_until_the_retries_are_spent(tmp_path: Path) -> None:
    life = await Lifecycle(tmp_path / "store", build_retries=2).start()
    try:
        version = await life.upload()
        for attempt in range(3):
            await until(
                lambda a=attempt: len(life.builds.pending) == 1 and len(life.builds.started) == a + 1, "a try"
            )
            life.builds.fail(life.builds.started[attempt], "build_crashed")
        assert await settled(version) == "failed"
        assert version.final and version.error is not None
        assert version.error["type"] == "build_crashed"
        assert version.error["message"].startswith("the build failed 3 times; the last time: ")
        await until(lambda: life.records() == {1: "failed"}, "the catalog to record the failure")
        # kiln catalog retry: the build is tried afresh.
        assert await life.catalog.retry_version("m") == [1]
        await until(lambda: len(life.builds.started) == 4, "the build tried again")
        assert life.records() == {1: "pending"}
        life.builds.finish(life.builds.started[3])
        life.release()
        assert await settled(version) == "ready"
        await until(lambda: life.records() == {1: "ready"}, "the catalog states")
    finally:
        await life.close()


async def test_a_failure_the_same_inputs_reproduce_is_not_retried(life: Lifecycle) -> None:
    version = await life.upload()
    await until(lambda: life.builds.pending, "the build")
    life.builds.fail(life.builds.started[0], "invalid_model")
    assert await settled(version) == "failed"
    again = await life.upload()  # the same model and options: failed at once, not built
    assert await settled(again) == "failed"
    assert again.error == version.error and len(life.builds.started) == 1


async def test_delete_during_a_build_then_upload_again(life: Lifecycle) -> None:
    first = await life.upload()
    await until(lambda: life.builds.pending, "the build to start")
    await life.delete(first)
    assert life.builds.cancelled == [life.builds.started[0]]
    assert life.versions() == [] and life.records() == {}
    again = await life.upload()
    assert again.version == 2  # a number is never given twice
    await until(lambda: len(life.builds.started) == 2, "a new build")
    assert life.builds.started[1] != life.builds.started[0]  # job ids are unique per build
    life.builds.finish(life.builds.started[1])
    life.release()
    assert await settled(again) == "ready", again.error
    assert life.builds.cancelled == [life.builds.started[0]]


async def test_version_numbers_are_never_reused_even_across_restarts(tmp_path: Path) -> None:
    life = await Lifecycle(tmp_path / "store").start()
    versions = [await life.upload(sha=sha) for sha in (MODEL_SHA, OTHER_SHA, "d" * 64)]
    await life.delete(versions[2])
    assert (await life.upload(sha="e" * 64)).version == 4
    for version in list(life.registry.all_versions()):
        await life.delete(version)
    await life.close()
    life = await Lifecycle(tmp_path / "store").start()
    try:
        assert (await life.upload()).version == 5
    finally:
        await life.close()


async def test_deleting_one_of_two_identical_uploads_keeps_their_shared_build(life: Lifecycle) -> None:
    first, second = await life.upload(tag=1), await life.upload(tag=2)
    await until(lambda: life.builds.pending, "the build")
    # One build; both versions follow its progress.
    await until(lambda: first.phase == second.phase == "build", "both to follow the build")
    assert len(life.builds.started) == 1
    await life.delete(first)
    assert life.builds.cancelled == []
    life.builds.finish(life.builds.started[0])
    life.release(2)
    assert await settled(second) == "ready"
    assert life.versions() == [2]


async def test_delete_while_loading_closes_the_runner_and_garbage_collection_takes_the_files(
    life: Lifecycle,
) -> None:
    version = await life.upload()
    await until(lambda: life.builds.pending, "the build")
    life.builds.finish(life.builds.started[0])
    await until(lambda: version.state == "loading", "loading")
    deleting = asyncio.ensure_future(life.delete(version))
    await until(lambda: version.state == "unloading", "unloading")
    assert not version.servable
    life.release()
    await deleting
    assert await life.manager.wait_idle(5)
    assert life.versions() == [] and version.runner is None
    engine = life.store.root / "engines" / version.cache_key
    assert engine.exists()  # deletes never remove files inline
    assert await collect_garbage(life.catalog, life.store, grace_s=0) == 2  # the engine and the model
    assert not engine.exists() and not life.store.model_path(MODEL_SHA).exists()


# -- pruning -----------------------------------------------------------------------------


BURST = 4
ORDERS = list(itertools.permutations(range(1, BURST + 1)))


@pytest.mark.parametrize("failing", [(), (3, 4)], ids=["all-ready", "newest-two-fail"])
@pytest.mark.parametrize("order", ORDERS, ids=["".join(map(str, o)) for o in ORDERS])
async def test_a_burst_of_identical_uploads_prunes_to_the_same_versions_in_every_order(
    life: Lifecycle, order: tuple[int, ...], failing: tuple[int, ...]
) -> None:
    versions = [await life.upload(tag=n) for n in range(1, BURST + 1)]
    await until(lambda: life.builds.pending, "the shared build")
    assert len(life.builds.started) == 1
    life.builds.finish(life.builds.started[0])
    for n in failing:
        life.backend.failures[n] = UnsupportedModel("no")
    ever_served = False
    for n in order:
        life.release(n)
        await settled(versions[n - 1])
        await life.reconciler.sync()
        serving = any(v.servable for v in life.registry.all_versions())
        # Once a version served, one always does: pruning never leaves a gap.
        assert serving or not ever_served
        ever_served |= serving
    want = [3, 4] if not failing else [2, 3, 4]  # the newest servable version is always kept
    await until(lambda: life.versions() == want and sorted(life.records()) == want, f"versions {want}")


async def test_pruning_keeps_what_serves_and_what_is_still_being_built(life: Lifecycle) -> None:
    versions = [
        await life.upload(sha=sha, tag=n) for n, sha in ((1, MODEL_SHA), (2, OTHER_SHA), (3, "d" * 64))
    ]
    await until(lambda: len(life.builds.pending) == 3, "three builds")
    assert life.versions() == [1, 2, 3]  # v1 is past the limit but still building
    life.builds.finish(life.builds.started[0])
    life.release(1)
    await settled(versions[0])
    await life.reconciler.sync()
    assert life.versions() == [1, 2, 3]  # the only servable version is kept
    life.builds.finish(life.builds.started[2])
    life.release(3)
    await settled(versions[2])
    await until(lambda: life.versions() == [2, 3], "v1 pruned")  # v2 is still building: kept
    life.builds.fail(life.builds.started[1])
    assert await settled(versions[1]) == "failed"
    await life.reconciler.sync()
    assert life.versions() == [2, 3]


# -- restart ---------------------------------------------------------------------------


def record(name: str, number: int, state: str) -> dict[str, Any]:
    """A record as a single node wrote it before the catalog (its server's state, a cache key)."""
    return {
        "name": name,
        "version": number,
        "model_sha256": MODEL_SHA,
        "model_filename": "m.onnx",
        "options": BuildOptions().to_dict(),
        "batching": BatchingConfig(instances=number).to_dict(),
        "cache_key": "e" * 64,
        "state": state,
        "error": {"type": "x", "message": "y"} if state == "failed" else None,
        "created_at": 0.0,
        "progressive": False,
    }


def commit_engine(store: EngineStore) -> str:
    key = engine_cache_key(MODEL_SHA, BuildOptions(), FakeBackend().device_signature())
    artifact = store.temp_path()
    artifact.write_bytes(b"engine")
    store.commit_engine(key, artifact, ".bin", {"signature": SIGNATURE.to_dict(), "max_batch_size": 8})
    return key


async def test_restart_with_versions_recorded_in_every_state(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = EngineStore(root)
    commit_engine(store)
    for number, state in enumerate(VersionState, 1):
        store.save_record(record("m", number, str(state)))
    store.model_path(MODEL_SHA).write_bytes(b"model")
    by_state = {str(s): n for n, s in enumerate(VersionState, 1)}

    life = Lifecycle(root)
    assert not life.manager.restored
    await life.start()
    try:
        assert life.manager.restored
        states = {v.version: str(v.state) for v in life.registry.all_versions()}
        # Builds a restart interrupted are built again; a delete it interrupted is finished.
        assert states == {
            by_state["building"]: "building",
            by_state["loading"]: "building",
            by_state["baseline"]: "building",
            by_state["ready"]: "building",
            by_state["fallback"]: "building",  # its requested engine is tried again
            by_state["failed"]: "failed",
        }
        assert life.registry.get("m", by_state["failed"]).error == {"type": "x", "message": "y"}
        restoring = life.registry.get("m", by_state["ready"])
        # A version that served (on its baseline, or in fallback, too) makes readiness
        # wait until it serves again.
        on_baseline = life.registry.get("m", by_state["baseline"])
        in_fallback = life.registry.get("m", by_state["fallback"])
        assert life.manager.pending_restores() == [on_baseline, restoring, in_fallback]
        await until(lambda: restoring.state == "loading", "the restored version to load")
        assert life.builds.started == []  # its engine was in the store
        for number in states:
            life.release(number)
        assert await settled(restoring) == "ready"
        assert await settled(on_baseline) == "ready"
        assert await settled(in_fallback) == "ready"  # the stored engine is the requested one
        assert life.manager.pending_restores() == []
        want = {n: "failed" if s == "failed" else "ready" for n, s in states.items()}
        await until(lambda: life.records() == want, "the records in catalog states")
        assert life.builds.started == []
    finally:
        await life.close()


async def test_a_restored_version_that_fails_to_load_ends_the_wait_too(tmp_path: Path) -> None:
    life = Lifecycle(tmp_path / "store", build_retries=0)
    life.store.save_record(record("m", 1, "ready"))
    life.store.model_path(MODEL_SHA).write_bytes(b"model")
    await life.start()
    try:
        version = life.registry.get("m", 1)
        assert life.manager.pending_restores() == [version]
        await until(lambda: life.builds.pending, "a rebuild (no engine in the store)")
        life.builds.fail(life.builds.started[0])
        assert await settled(version) == "failed"
        assert life.manager.pending_restores() == []
    finally:
        await life.close()


@pytest.mark.parametrize("how", ["checksum", "unloadable"])
async def test_a_corrupt_artifact_is_rebuilt(tmp_path: Path, how: str) -> None:
    life = Lifecycle(tmp_path / "store")
    key = commit_engine(life.store)
    meta = life.store.engine_meta(key)
    assert meta is not None
    if how == "checksum":
        life.store.artifact_path(key, meta).write_bytes(b"flipped bits")
    else:
        life.backend.failures[1] = StoreCorrupted("the plan was built for another device")
        life.release(1)
    life.store.save_record(record("m", 1, "ready"))
    life.store.model_path(MODEL_SHA).write_bytes(b"model")
    await life.start()
    try:
        version = life.registry.get("m", 1)
        await until(lambda: life.builds.pending, "the rebuild")
        assert version.state == "building" and version.phase in ("restore", "rebuild", "build")
        life.builds.finish(life.builds.started[0])
        life.release(1)
        assert await settled(version) == "ready", version.error
        assert life.store.verify_engine(key) is not None  # a sound engine is in the store again
        assert len(life.builds.started) == 1
    finally:
        await life.close()


# -- following the catalog ---------------------------------------------------------------


class FlakyFeed(StoreCatalog):
    """A catalog whose change feed fails once, unexpectedly (a driver error no one
    foresaw), then works."""

    def __init__(self, store: EngineStore) -> None:
        super().__init__(store)
        self.feeds = 0

    async def changes(self, on_change: Any) -> None:
        self.feeds += 1
        if self.feeds == 1:
            raise RuntimeError("the feed broke")
        await super().changes(on_change)


async def test_a_feed_that_fails_is_started_again(tmp_path: Path) -> None:
    life = Lifecycle(tmp_path / "store")
    life.catalog = FlakyFeed(life.store)
    life.manager.catalog = life.manager.source.catalog = life.catalog
    life.reconciler = Reconciler(life.catalog, life.manager)
    await life.start()
    try:
        await until(lambda: life.catalog.feeds == 2, "the feed started again", timeout_s=5)
    finally:
        await life.close()


async def test_a_version_the_catalog_cannot_give_does_not_stop_the_others(tmp_path: Path) -> None:
    life = Lifecycle(tmp_path / "store")
    broken = record("broken", 1, "ready")
    broken["options"] = {"precision": "fp99"}  # written by some other kiln
    life.store.save_record(broken)
    life.store.save_record(record("m", 1, "ready"))
    life.store.model_path(MODEL_SHA).write_bytes(b"model")
    commit_engine(life.store)
    await life.start()
    try:
        assert life.registry.names() == ["m"]
        life.release(1)
        assert await settled(life.registry.get("m", 1)) == "ready"
    finally:
        await life.close()


def test_the_lifecycle_knows_one_catalog_and_the_catalog_knows_no_lifecycle() -> None:
    """One code path for a single node and a cluster: the lifecycle calls the
    ``VersionCatalog`` interface and never asks which catalog it has; the catalog
    records and leases, and never reaches into the lifecycle."""
    service = Path(__file__).parents[3] / "service"
    branches = [
        f"{path.name}: {line.strip()}"
        for path in (service / "lifecycle").glob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"cluster is (not )?None|\.cluster\b|isinstance\([^)]*Catalog\)", line)
    ]
    assert branches == []
    imports = [
        f"{path.name}: {line.strip()}"
        for path in (service / "catalog").glob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"^\s*(from|import) service\.lifecycle", line)
    ]
    assert imports == []
