"""``kiln catalog retry`` on a single node's store: failed versions go back to pending,
so the next start builds them again; while a server holds the store, it says to ask
the server instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.store import EngineStore
from engines.types import BuildOptions
from service.batching import BatchingConfig
from service.cli.main import main


def failed_record(name: str, version: int) -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "model_sha256": "a" * 64,
        "model_filename": "m.onnx",
        "options": BuildOptions().to_dict(),
        "batching": BatchingConfig().to_dict(),
        "state": "failed",
        "error": {"type": "build_crashed", "message": "the build failed 4 times"},
        "created_at": 0.0,
        "progressive": False,
        "retries": 0,
    }


def test_retry_puts_a_stopped_single_node_s_failed_version_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = EngineStore(tmp_path / "store")
    store.save_record(failed_record("m", 1))
    assert main(["catalog", "retry", "m", "--store", str(store.root)]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "m", "retried_versions": [1]}
    (record,), _ = store.load_records()
    assert (record["state"], record["error"], record["retries"]) == ("pending", None, 1)
    assert main(["catalog", "retry", "nope", "--store", str(store.root)]) == 1
    assert "no engine named 'nope' in the catalog" in capsys.readouterr().err


def test_retry_while_a_server_holds_the_store_names_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = EngineStore(tmp_path / "store")
    store.save_record(failed_record("m", 1))
    store.lock_exclusive(hint="")
    try:
        assert main(["catalog", "retry", "m", "--version", "1", "--store", str(store.root)]) == 2
    finally:
        store.unlock()
    assert "POST /engines/m/versions/1/retry" in capsys.readouterr().err
