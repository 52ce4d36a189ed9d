from __future__ import annotations

from pathlib import Path

import pytest

from engines.errors import StoreCorrupted
from engines.store import EngineStore, sha256_file


def _commit(store: EngineStore, key: str, payload: bytes) -> dict:
    temp = store.temp_path()
    temp.write_bytes(payload)
    return store.commit_engine(key, temp, ".onnx", {"backend": "test"})


def test_commit_publishes_artifact_and_checksum(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    meta = _commit(store, "ab" * 16, b"engine bytes")
    artifact = store.artifact_path("ab" * 16, meta)
    assert artifact.read_bytes() == b"engine bytes"
    assert meta["artifact_sha256"] == sha256_file(artifact)
    assert store.verify_engine("ab" * 16) == meta
    assert list((tmp_path / "tmp").iterdir()) == []


def test_uncommitted_engine_is_absent(tmp_path: Path) -> None:
    assert EngineStore(tmp_path).verify_engine("cd" * 16) is None


def test_corrupt_artifact_is_detected(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    meta = _commit(store, "ab" * 16, b"engine bytes")
    store.artifact_path("ab" * 16, meta).write_bytes(b"engine bytez")
    with pytest.raises(StoreCorrupted, match="checksum"):
        store.verify_engine("ab" * 16)


def test_missing_artifact_is_detected(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    meta = _commit(store, "ab" * 16, b"engine bytes")
    store.artifact_path("ab" * 16, meta).unlink()
    with pytest.raises(StoreCorrupted, match="missing"):
        store.verify_engine("ab" * 16)


def test_cleanup_removes_partial_writes(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    (tmp_path / "tmp" / "half-written").write_bytes(b"partial")
    assert store.cleanup_tmp() == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_records_round_trip_and_unreadable_ones_are_reported(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    store.save_record({"name": "a", "version": 1, "state": "ready"})
    (tmp_path / "records" / "a" / "2.json").write_text("{not json")
    records, problems = store.load_records()
    assert records == [{"name": "a", "version": 1, "state": "ready"}]
    assert len(problems) == 1 and "2.json" in problems[0]


def test_keys_cannot_escape_the_store(tmp_path: Path) -> None:
    store = EngineStore(tmp_path)
    with pytest.raises(ValueError):
        store.engine_dir("../../etc")
    with pytest.raises(ValueError):
        store.model_path("../x")
