"""Pure asyncio tests of the engine lifecycle's state machine: the real manager,
registry and store, with a build runner and a backend whose every step the test
releases by hand (no child processes, no real engines)."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines.errors import StoreCorrupted, UnsupportedModel
from engines.store import EngineStore
from engines.types import BuildOptions, DeviceSignature, Signature, TensorSpec
from service.batching import BatchingConfig
from service.lifecycle.jobs import BuildFailure
from service.lifecycle.manager import EngineManager
from service.lifecycle.registry import EngineVersion, Registry
from service.lifecycle.states import (
    ALLOWED,
    RECORDED,
    WORKING,
    IllegalTransition,
    VersionState,
)
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
    fails it, and a finished build commits a real engine into the store."""

    def __init__(self, store: EngineStore) -> None:
        self.store = store
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []

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
        return self.store.commit_engine(job.cache_key, artifact, ".bin", meta)

    def finish(self, job_id: str) -> None:
        self.pending[job_id].set_result(None)

    def fail(self, job_id: str) -> None:
        self.pending[job_id].set_exception(BuildFailure("build_failed", "the fake build failed"))

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
    """A manager on a real store and registry, with the fakes above."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.settings = Settings(store=root, backend="onnxruntime", **settings)
        self.store = EngineStore(root)
        self.registry = Registry(self.store)
        self.builds = FakeBuilds(self.store)
        self.backend = FakeBackend()
        self.manager = EngineManager(
            self.settings,
            self.store,
            self.registry,
            self.backend,  # type: ignore[arg-type]
            KilnMetrics(),
            self.builds,  # type: ignore[arg-type]
        )

    def upload(self, name: str = "m", *, tag: int = 1, sha: str = MODEL_SHA) -> EngineVersion:
        self.store.model_path(sha).write_bytes(b"model")
        return self.manager.create(
            name, sha, "m.onnx", BuildOptions(), BatchingConfig(max_batch_size=8, instances=tag)
        )

    def release(self, tag: int = 1) -> None:
        self.backend.gate(tag).set()

    def records(self, name: str = "m") -> dict[int, str]:
        return {int(p.stem): _state_of(p) for p in (self.store.root / "records" / name).glob("*.json")}

    def versions(self, name: str = "m") -> list[int]:
        return [v.version for v in self.registry.all_versions() if v.name == name]

    async def close(self) -> None:
        await self.manager.shutdown(0)


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
    lifecycle = Lifecycle(tmp_path / "store", max_versions_per_engine=2)
    yield lifecycle
    for gate in lifecycle.backend.gates.values():
        gate.set()
    await lifecycle.close()


# -- the table -----------------------------------------------------------------


MOVES = list(itertools.product(VersionState, VersionState))


@pytest.mark.parametrize(("current", "new"), MOVES, ids=[f"{a}->{b}" for a, b in MOVES])
async def test_every_allowed_move_is_made_and_every_other_refused(
    life: Lifecycle, current: VersionState, new: VersionState
) -> None:
    version = EngineVersion(
        "m", 1, MODEL_SHA, BuildOptions(), BatchingConfig(), cache_key="c" * 64, _state=current
    )
    life.registry.index(version)
    if new in ALLOWED[current]:
        life.manager.transition(
            version, new, error={"type": "x", "message": "y"} if new == "failed" else None
        )
        assert version.state == new
        # Settled and servable states are persisted; others leave the record as it was.
        assert (life.records().get(1) == str(new)) is (new in RECORDED)
    else:
        with pytest.raises(IllegalTransition, match=f"from {current} to {new}"):
            life.manager.transition(version, new)
        assert version.state == current
        assert life.records() == {}


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
    version = life.upload()
    assert version.state == "building" and life.records() == {1: "building"}
    await until(lambda: life.builds.pending, "the build to start")
    assert version.progress > 0 and version.phase == "build"
    life.builds.finish(life.builds.started[0])
    await until(lambda: version.state == "loading", "loading")
    assert not version.servable
    life.release()
    assert await settled(version) == "ready"
    assert version.servable and version.progress == 1.0 and version.phase is None
    assert life.registry.servable("m") is version and life.records() == {1: "ready"}


async def test_a_failed_build_and_a_failed_load_fail_only_their_version(life: Lifecycle) -> None:
    first = life.upload(sha=MODEL_SHA)
    second = life.upload(sha=OTHER_SHA, tag=2)
    await until(lambda: len(life.builds.pending) == 2, "two builds")
    life.builds.fail(life.builds.started[0])
    assert await settled(first) == "failed"
    assert first.error == {"type": "build_failed", "message": "the fake build failed"}
    life.backend.failures[2] = UnsupportedModel("cannot load this")
    life.builds.finish(life.builds.started[1])
    life.release(2)
    assert await settled(second) == "failed"
    assert second.error == {"type": "unsupported_model", "message": "cannot load this"}
    assert life.records() == {1: "failed", 2: "failed"}


async def test_delete_during_a_build_then_upload_again(life: Lifecycle) -> None:
    first = life.upload()
    await until(lambda: life.builds.pending, "the build to start")
    await life.manager.delete(first)
    assert life.builds.cancelled == [life.builds.started[0]]
    assert life.versions() == [] and life.records() == {}
    again = life.upload()  # numbered 1 again: the name is free
    assert again.version == 1
    await until(lambda: len(life.builds.started) == 2, "a new build")
    assert life.builds.started[1] != life.builds.started[0]  # job ids are unique per build
    life.builds.finish(life.builds.started[1])
    life.release()
    assert await settled(again) == "ready", again.error
    assert life.builds.cancelled == [life.builds.started[0]]


async def test_deleting_one_of_two_identical_uploads_keeps_their_shared_build(life: Lifecycle) -> None:
    first, second = life.upload(tag=1), life.upload(tag=2)
    await until(lambda: second.phase == "waiting for an identical build", "the second to wait")
    assert len(life.builds.started) == 1
    await life.manager.delete(first)
    assert life.builds.cancelled == []
    life.builds.finish(life.builds.started[0])
    life.release(2)
    assert await settled(second) == "ready"
    assert life.versions() == [2]


async def test_delete_while_loading_closes_the_runner_and_leaves_nothing(life: Lifecycle) -> None:
    version = life.upload()
    await until(lambda: life.builds.pending, "the build")
    life.builds.finish(life.builds.started[0])
    await until(lambda: version.state == "loading", "loading")
    deleting = asyncio.ensure_future(life.manager.delete(version))
    await asyncio.sleep(0)
    assert version.state == "unloading" and not version.servable
    life.release()
    await deleting
    assert await life.manager.wait_idle(5)
    assert life.versions() == [] and version.runner is None
    assert not (life.store.root / "engines" / version.cache_key).exists()


# -- pruning -----------------------------------------------------------------------------


BURST = 4
ORDERS = list(itertools.permutations(range(1, BURST + 1)))


@pytest.mark.parametrize("failing", [(), (3, 4)], ids=["all-ready", "newest-two-fail"])
@pytest.mark.parametrize("order", ORDERS, ids=["".join(map(str, o)) for o in ORDERS])
async def test_a_burst_of_identical_uploads_prunes_to_the_same_versions_in_every_order(
    life: Lifecycle, order: tuple[int, ...], failing: tuple[int, ...]
) -> None:
    versions = [life.upload(tag=n) for n in range(1, BURST + 1)]
    await until(lambda: life.builds.pending, "the shared build")
    assert len(life.builds.started) == 1
    life.builds.finish(life.builds.started[0])
    for n in failing:
        life.backend.failures[n] = UnsupportedModel("no")
    ever_served = False
    for n in order:
        life.release(n)
        await settled(versions[n - 1])
        serving = any(v.servable for v in life.registry.all_versions())
        # Once a version served, one always does: pruning never leaves a gap.
        assert serving or not ever_served
        ever_served |= serving
    assert await life.manager.wait_idle(5)
    want = [3, 4] if not failing else [2, 3, 4]  # the newest servable version is always kept
    assert life.versions() == want and sorted(life.records()) == want


async def test_pruning_waits_for_versions_to_settle(life: Lifecycle) -> None:
    versions = [life.upload(sha=sha, tag=n) for n, sha in ((1, MODEL_SHA), (2, OTHER_SHA), (3, "d" * 64))]
    await until(lambda: len(life.builds.pending) == 3, "three builds")
    assert life.versions() == [1, 2, 3]  # v1 is past the limit but still building
    life.builds.finish(life.builds.started[0])
    life.release(1)
    await settled(versions[0])
    assert life.versions() == [1, 2, 3]  # the only servable version is kept
    life.builds.finish(life.builds.started[2])
    life.release(3)
    await settled(versions[2])
    assert await life.manager.wait_idle(0.5) is False  # v2 still building
    assert life.versions() == [2, 3]
    life.builds.fail(life.builds.started[1])
    assert await settled(versions[1]) == "failed"
    assert life.versions() == [2, 3]


# -- restart ---------------------------------------------------------------------------


def record(name: str, number: int, state: str, cache_key: str, sha: str = MODEL_SHA) -> dict[str, Any]:
    return {
        "name": name,
        "version": number,
        "model_sha256": sha,
        "model_filename": "m.onnx",
        "options": BuildOptions().to_dict(),
        "batching": BatchingConfig(instances=number).to_dict(),
        "cache_key": cache_key,
        "state": state,
        "error": None,
        "created_at": 0.0,
    }


async def test_restart_with_versions_in_every_state(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = Lifecycle(root)
    key = first.manager.cache_key(MODEL_SHA, BuildOptions())
    artifact = first.store.temp_path()
    artifact.write_bytes(b"engine")
    first.store.commit_engine(key, artifact, ".bin", {"signature": SIGNATURE.to_dict(), "max_batch_size": 8})
    for number, state in enumerate(VersionState, 1):
        first.store.save_record(record("m", number, str(state), key))
    first.store.model_path(MODEL_SHA).write_bytes(b"model")

    life = Lifecycle(root)
    try:
        assert not life.manager.restored
        await life.manager.restore()
        assert life.manager.restored
        by_state = {str(s): n for n, s in enumerate(VersionState, 1)}
        states = {v.version: str(v.state) for v in life.registry.all_versions()}
        assert states == {
            by_state["building"]: "failed",
            by_state["loading"]: "failed",
            by_state["baseline"]: "building",
            by_state["ready"]: "building",
            by_state["fallback"]: "building",  # its requested engine is tried again
            by_state["failed"]: "failed",
        }
        interrupted = life.registry.get("m", by_state["building"])
        assert interrupted.error is not None and interrupted.error["type"] == "interrupted"
        restoring = life.registry.get("m", by_state["ready"])
        # A version that served on its baseline when the server stopped comes back too.
        on_baseline = life.registry.get("m", by_state["baseline"])
        in_fallback = life.registry.get("m", by_state["fallback"])
        assert life.manager.pending_restores() == [on_baseline, restoring, in_fallback]
        # Until it has loaded, the ready record stays "ready": a crash now retries it.
        await until(lambda: restoring.state == "loading", "the restored version to load")
        assert life.records()[by_state["ready"]] == "ready"
        assert life.builds.started == []  # its engine was in the store
        life.release(by_state["ready"])
        life.release(by_state["baseline"])
        life.release(by_state["fallback"])
        assert await settled(restoring) == "ready"
        assert await settled(on_baseline) == "ready"
        assert await settled(in_fallback) == "ready"  # the stored engine is the requested one
        assert life.manager.pending_restores() == []
        assert by_state["unloading"] not in life.records()
        assert life.records() == {n: s for n, s in states.items() if s == "failed"} | {
            by_state["ready"]: "ready",
            by_state["baseline"]: "ready",
            by_state["fallback"]: "ready",
        }
    finally:
        await life.close()


async def test_a_restored_version_that_fails_to_load_ends_the_wait_too(tmp_path: Path) -> None:
    life = Lifecycle(tmp_path / "store")
    life.store.save_record(record("m", 1, "ready", "e" * 64))
    await life.manager.restore()
    version = life.registry.get("m", 1)
    assert life.manager.pending_restores() == [version]
    await until(lambda: life.builds.pending, "a rebuild (no engine in the store)")
    life.builds.fail(life.builds.started[0])
    assert await settled(version) == "failed"
    assert life.manager.pending_restores() == []
    await life.close()


@pytest.mark.parametrize("how", ["checksum", "unloadable"])
async def test_a_corrupt_artifact_is_rebuilt(tmp_path: Path, how: str) -> None:
    life = Lifecycle(tmp_path / "store")
    key = life.manager.cache_key(MODEL_SHA, BuildOptions())
    artifact = life.store.temp_path()
    artifact.write_bytes(b"engine")
    meta = life.store.commit_engine(
        key, artifact, ".bin", {"signature": SIGNATURE.to_dict(), "max_batch_size": 8}
    )
    if how == "checksum":
        life.store.artifact_path(key, meta).write_bytes(b"flipped bits")
    else:
        life.backend.failures[1] = StoreCorrupted("the plan was built for another device")
        life.release(1)
    life.store.save_record(record("m", 1, "ready", key))
    await life.manager.restore()
    version = life.registry.get("m", 1)
    await until(lambda: life.builds.pending, "the rebuild")
    assert version.state == "building" and version.phase in ("restore", "rebuild", "build")
    life.builds.finish(life.builds.started[0])
    life.release(1)
    assert await settled(version) == "ready", version.error
    assert life.store.verify_engine(key) is not None  # a sound engine is in the store again
    assert len(life.builds.started) == 1
    await life.close()
