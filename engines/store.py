"""The on-disk engine store.

Layout under the root directory::

    models/<sha256>.onnx            uploaded models, by content hash
    data/<sha256>.npz               calibration and validation sets, by content hash
    engines/<cache key>/engine-<sha256>.*   built artifacts, named by their own hash
    engines/<cache key>/meta.json   what was built, how, how well; the artifact's name and sha256
    records/<name>/<version>.json   the served versions: options, state, error
    timing/<device key>.cache       TensorRT timing caches, one per device signature
    tmp/                            partial writes (``tmp/<owner>/`` per replica in a cluster)
    kiln.lock                       held (flock) by the one server that owns a single-node store

Every write goes to a temp directory first, is fsynced, then renamed into place,
so a crash never leaves a half-written file under a final name. An artifact's
name contains its sha256, so two builders of one engine never overwrite each
other's file. On a single node ``meta.json`` is the commit point of an engine:
it is written last and names the artifact, whose sha256 is verified whenever
the engine is loaded. In a cluster the catalog is the commit point instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from engines.errors import StoreCorrupted, StoreInUse

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class EngineStore:
    """Content-addressed models and engines plus the records of served versions.

    Safe to share between the server and build child processes: every file is
    published by an atomic rename, and readers never see partial files.
    """

    def __init__(self, root: Path, temp_owner: str | None = None) -> None:
        """``temp_owner`` gives this process its own ``tmp/<owner>/`` (one per replica
        of a cluster), so that one replica's sweep never touches another's writes."""
        self.root = Path(root)
        for sub in ("models", "data", "engines", "records", "timing", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.temp_owner = temp_owner
        self.temp_dir = self.root / "tmp" / _checked_owner(temp_owner) if temp_owner else self.root / "tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    # -- ownership ---------------------------------------------------------------

    def lock_exclusive(self, hint: str) -> None:
        """Take the store for this process alone until ``unlock`` or exit (``flock``,
        released by the kernel when the process dies). Raises ``StoreInUse`` with
        ``hint`` when another process holds it."""
        fd = os.open(self.root / "kiln.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreInUse(f"the store {self.root} is in use by {holder}; {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- atomic writes -------------------------------------------------------

    @contextmanager
    def temp_file(self, suffix: str = "") -> Iterator[tuple[BinaryIO, Path]]:
        """A file in ``tmp/`` that is removed unless the caller moves it away."""
        fd, name = tempfile.mkstemp(dir=self.temp_dir, suffix=suffix)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, path
        finally:
            path.unlink(missing_ok=True)

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh, empty path under ``tmp/``; the caller publishes or deletes it."""
        fd, name = tempfile.mkstemp(dir=self.temp_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    def publish(self, source: Path, destination: Path) -> None:
        """fsync ``source`` and rename it to ``destination`` (same filesystem)."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(source, destination)
        _fsync_dir(destination.parent)

    def write_bytes(self, destination: Path, data: bytes) -> None:
        path = self.temp_path()
        try:
            path.write_bytes(data)
            self.publish(path, destination)
        finally:
            path.unlink(missing_ok=True)

    def write_json(self, destination: Path, value: Any) -> None:
        self.write_bytes(destination, json.dumps(value, indent=2, sort_keys=True).encode())

    def cleanup_tmp(self) -> int:
        """Remove leftovers of interrupted writes: entries of this process's temp
        directory, and engine directories that were never committed (a crash between
        publishing the artifact and its ``meta.json``). Returns how many were removed.

        Single node only, at start-up, under ``lock_exclusive``: in a cluster another
        replica may be writing; there the catalog decides what is garbage."""
        removed = 0
        for entry in self.temp_dir.iterdir():
            _remove(entry)
            removed += 1
        for entry in (self.root / "engines").iterdir():
            if entry.is_dir() and not (entry / "meta.json").exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def remove_temp_dir(self, owner: str) -> None:
        """Remove another process's ``tmp/<owner>/`` (a replica known to be gone)."""
        shutil.rmtree(self.root / "tmp" / _checked_owner(owner), ignore_errors=True)

    def temp_owners(self) -> list[str]:
        return sorted(entry.name for entry in (self.root / "tmp").iterdir() if entry.is_dir())

    # -- models and data sets -------------------------------------------------

    def model_path(self, sha256: str) -> Path:
        return self.root / "models" / f"{_checked_sha(sha256)}.onnx"

    def data_path(self, sha256: str) -> Path:
        return self.root / "data" / f"{_checked_sha(sha256)}.npz"

    def add_model(self, temp_path: Path, sha256: str) -> Path:
        """Publish an uploaded model already written to ``temp_path`` (moved, not copied)."""
        return self._add_blob(temp_path, self.model_path(sha256))

    def add_data(self, temp_path: Path, sha256: str) -> Path:
        return self._add_blob(temp_path, self.data_path(sha256))

    def _add_blob(self, temp_path: Path, destination: Path) -> Path:
        if destination.exists():
            temp_path.unlink(missing_ok=True)
        else:
            self.publish(temp_path, destination)
        return destination

    # -- engines ---------------------------------------------------------------

    def engine_dir(self, cache_key: str) -> Path:
        return self.root / "engines" / _checked_key(cache_key)

    def engine_meta(self, cache_key: str) -> dict[str, Any] | None:
        """The committed metadata of an engine, or None if it was never committed."""
        path = self.engine_dir(cache_key) / "meta.json"
        if not path.exists():
            return None
        try:
            meta: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreCorrupted(f"engine {cache_key}: unreadable metadata ({exc})") from exc
        return meta

    def artifact_path(self, cache_key: str, meta: dict[str, Any]) -> Path:
        return self.engine_dir(cache_key) / meta["artifact"]

    def verify_engine(self, cache_key: str) -> dict[str, Any] | None:
        """Metadata of a committed engine whose artifact matches its checksum.

        Returns None when the engine was never committed; raises ``StoreCorrupted``
        when the artifact is missing or its bytes changed.
        """
        meta = self.engine_meta(cache_key)
        if meta is None:
            return None
        self.verify_artifact(cache_key, meta)
        return meta

    def commit_engine(
        self,
        cache_key: str,
        artifact_temp: Path,
        suffix: str,
        meta: dict[str, Any],
        *,
        write_commit_point: bool = True,
    ) -> dict[str, Any]:
        """Publish an artifact under a name holding its sha256, then (single node) its
        metadata, the commit point. Returns the metadata. In a cluster the caller
        passes ``write_commit_point=False`` and commits the metadata to the catalog."""
        directory = self.engine_dir(cache_key)
        directory.mkdir(parents=True, exist_ok=True)
        sha256 = sha256_file(artifact_temp)
        name = f"engine-{sha256}{suffix}"
        full_meta = dict(meta)
        full_meta["artifact"] = name
        full_meta["artifact_sha256"] = sha256
        full_meta["artifact_bytes"] = artifact_temp.stat().st_size
        full_meta["cache_key"] = cache_key
        self.publish(artifact_temp, directory / name)
        if write_commit_point:
            self.write_json(directory / "meta.json", full_meta)
        return full_meta

    def verify_artifact(self, cache_key: str, meta: dict[str, Any]) -> None:
        """Raise ``StoreCorrupted`` unless the artifact ``meta`` names exists with its sha256."""
        artifact = self.artifact_path(cache_key, meta)
        if not artifact.exists():
            raise StoreCorrupted(f"engine {cache_key}: artifact {artifact.name} is missing")
        actual = sha256_file(artifact)
        if actual != meta.get("artifact_sha256"):
            raise StoreCorrupted(
                f"engine {cache_key}: artifact checksum {actual[:12]} does not match "
                f"the recorded {str(meta.get('artifact_sha256'))[:12]}"
            )

    def remove_artifact(self, cache_key: str, artifact: str) -> None:
        """Remove one artifact file (a fenced-out build's, or one no version uses)."""
        if "/" in artifact or not artifact.startswith("engine-"):
            raise ValueError(f"not an artifact name: {artifact!r}")
        (self.engine_dir(cache_key) / artifact).unlink(missing_ok=True)

    def discard_engine(self, cache_key: str) -> None:
        """Remove an engine (metadata first, so a crash leaves it uncommitted)."""
        directory = self.engine_dir(cache_key)
        (directory / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def timing_cache_path(self, device_key: str) -> Path:
        return self.root / "timing" / f"{_checked_key(device_key)}.cache"

    # -- records of served versions -------------------------------------------

    def record_path(self, name: str, version: int) -> Path:
        return self.root / "records" / name / f"{int(version)}.json"

    def save_record(self, record: dict[str, Any]) -> None:
        self.write_json(self.record_path(record["name"], record["version"]), record)

    def delete_record(self, name: str, version: int) -> None:
        self.record_path(name, version).unlink(missing_ok=True)
        directory = self.root / "records" / name
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()

    def load_records(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Every readable record, and a message for each unreadable one."""
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        for path in sorted((self.root / "records").glob("*/*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                problems.append(f"{path.relative_to(self.root)}: {exc}")
        return records, problems

    def referenced_engines(self) -> set[str]:
        records, _ = self.load_records()
        return {r["cache_key"] for r in records if r.get("cache_key")}


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _checked_owner(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value) or value in (".", ".."):
        raise ValueError(f"not a temp owner name: {value!r}")
    return value


def _checked_sha(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"not a sha256 hex digest: {value!r}")
    return value


def _checked_key(value: str) -> str:
    if not re.match(r"^[0-9a-f]{8,64}$", value):
        raise ValueError(f"not a store key: {value!r}")
    return value
