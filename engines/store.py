"""The on-disk engine store.

Layout under the root directory::

    models/<sha256>.onnx            uploaded models, by content hash
    models/<sha256>/model.onnx      a model with external data: the graph, and its data
    models/<sha256>/<location>      files at the locations it names (sha256: ``package_sha256``)
    data/<sha256>.npz               calibration and validation sets, by content hash
    engines/<cache key>/engine-<hash>/   one build's files, named by their hashes: the
                                    artifact (``engine.*``, backend-specific suffix) and
                                    the weights of a large ONNX artifact (``<name>.data``)
    engines/<cache key>/meta.json   what was built, how, how well; the artifact's path and sha256
    records/<name>/<version>.json   the served versions: options, state, error
    timing/<device key>.cache       TensorRT timing caches, one per device signature
    tmp/                            partial writes (``tmp/<owner>/`` per replica in a cluster)
    kiln.lock                       held (flock) by the one server that owns a single-node store

Every write goes to a temp directory first, is fsynced, then renamed into place,
so a crash never leaves a half-written file under a final name. A build's files
live in a directory named by their hashes, so two builders of one engine never
overwrite each other's files. On a single node ``meta.json`` is the commit point of an engine:
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
from typing import Any

from engines.errors import StoreCorrupted, StoreInUse

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024

PACKAGE_GRAPH = "model.onnx"
"""The graph's file name inside a stored model package."""


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def package_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (a model package), sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def package_sha256(root: Path) -> str:
    """A model package's content address: the sha256 of its ``sha256sum``-style
    listing (``<file sha256>  <relative path>`` per line, sorted by path), so that
    the same graph and data files always get the same address."""
    listing = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in package_files(root))
    return hashlib.sha256(listing.encode()).hexdigest()


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


def publish(source: Path, destination: Path) -> None:
    """fsync ``source`` and rename it onto ``destination`` (same filesystem), then
    fsync the directory: after a crash, ``destination`` is the old file or the new
    one, never a partial one."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(source, destination)
    _fsync_dir(destination.parent)


@contextmanager
def atomic_output(destination: Path, *, temp_dir: Path | None = None) -> Iterator[Path]:
    """The one way kiln writes a file atomically: write to the yielded temp path (in
    ``temp_dir``, by default beside ``destination``); when the block ends without an
    error it is published onto ``destination``, otherwise removed."""
    directory = temp_dir or destination.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        publish(temp, destination)
    finally:
        temp.unlink(missing_ok=True)


class EngineStore:
    """Content-addressed models and engines plus the records of served versions.

    Safe to share between the server and build child processes: every file is
    published by an atomic rename, and readers never see partial files.
    """

    def __init__(self, root: Path, temp_owner: str | None = None) -> None:
        """``temp_owner`` gives this process its own ``tmp/<owner>/`` (one per replica
        of a cluster), so that one replica's sweep never touches another's writes."""
        self.root = Path(root).absolute()  # every path below stays valid if the process changes directory
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

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh, empty path under ``tmp/``; the caller publishes or deletes it."""
        fd, name = tempfile.mkstemp(dir=self.temp_dir, suffix=suffix)
        os.close(fd)
        return Path(name)

    def write_bytes(self, destination: Path, data: bytes) -> None:
        with atomic_output(destination, temp_dir=self.temp_dir) as path:
            path.write_bytes(data)

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
        """The stored graph: ``models/<sha>.onnx``, or a package's ``model.onnx``."""
        if self.is_package(sha256):
            return self._package_dir(sha256) / PACKAGE_GRAPH
        return self.root / "models" / f"{_checked_sha(sha256)}.onnx"

    def _package_dir(self, sha256: str) -> Path:
        return self.root / "models" / _checked_sha(sha256)

    def is_package(self, sha256: str) -> bool:
        """Whether this model is stored with external data files beside its graph."""
        return self._package_dir(sha256).is_dir()

    def stored_model_sha256(self, sha256: str) -> str | None:
        """The content address of what is stored under ``sha256`` now (None when absent):
        equal to ``sha256`` unless the stored bytes changed."""
        if self.is_package(sha256):
            return package_sha256(self._package_dir(sha256))
        path = self.model_path(sha256)
        return sha256_file(path) if path.is_file() else None

    def data_path(self, sha256: str) -> Path:
        return self.root / "data" / f"{_checked_sha(sha256)}.npz"

    def add_model(self, temp_path: Path, sha256: str) -> Path:
        """Publish an uploaded model already written to ``temp_path`` (moved, not copied)."""
        return self._add_blob(temp_path, self.model_path(sha256))

    def add_model_package(self, temp_dir: Path, sha256: str) -> Path:
        """Publish a package laid out in ``tmp/`` (moved, not copied): every file is
        fsynced, then the directory is renamed into place in one step. Returns the graph."""
        destination = self._package_dir(sha256)
        if not destination.exists():
            for path in package_files(temp_dir):
                with path.open("rb+") as handle:
                    os.fsync(handle.fileno())
            try:
                os.rename(temp_dir, destination)
            except OSError:
                if not destination.is_dir():  # not a concurrent publisher of the same package
                    raise
            _fsync_dir(destination.parent)
        shutil.rmtree(temp_dir, ignore_errors=True)
        return destination / PACKAGE_GRAPH

    def remove_model(self, sha256: str) -> None:
        self.root.joinpath("models", f"{_checked_sha(sha256)}.onnx").unlink(missing_ok=True)
        shutil.rmtree(self._package_dir(sha256), ignore_errors=True)

    def add_data(self, temp_path: Path, sha256: str) -> Path:
        return self._add_blob(temp_path, self.data_path(sha256))

    def _add_blob(self, temp_path: Path, destination: Path) -> Path:
        if destination.exists():
            temp_path.unlink(missing_ok=True)
        else:
            publish(temp_path, destination)
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

    def verify_artifact(self, cache_key: str, meta: dict[str, Any]) -> None:
        """Raise ``StoreCorrupted`` unless every file ``meta`` names exists with its sha256."""
        files = {meta["artifact"]: meta.get("artifact_sha256"), **meta.get("artifact_data", {})}
        for name, recorded in files.items():
            path = self.engine_dir(cache_key) / name
            if not path.exists():
                raise StoreCorrupted(f"engine {cache_key}: artifact {name} is missing")
            actual = sha256_file(path)
            if actual != recorded:
                raise StoreCorrupted(
                    f"engine {cache_key}: {name} checksum {actual[:12]} does not match "
                    f"the recorded {str(recorded)[:12]}"
                )

    def commit_engine(
        self,
        cache_key: str,
        artifact_temp: Path,
        suffix: str,
        meta: dict[str, Any],
        *,
        write_commit_point: bool = True,
    ) -> dict[str, Any]:
        """Publish an artifact (and its external weights, ``<artifact_temp name>.data``
        beside it, if the backend wrote them) in a directory named by their hashes, so
        that two builders of one engine never overwrite each other's files; then (single
        node) the metadata, the commit point. Returns the metadata. In a cluster the
        caller passes ``write_commit_point=False`` and commits the metadata to the catalog."""
        artifact_sha256 = sha256_file(artifact_temp)
        weights = artifact_temp.with_name(f"{artifact_temp.name}.data")
        weights_sha256 = sha256_file(weights) if weights.exists() else None
        build_hash = (
            hashlib.sha256(f"{artifact_sha256}:{weights_sha256}".encode()).hexdigest()
            if weights_sha256
            else artifact_sha256
        )
        folder = f"engine-{build_hash}"
        directory = self.engine_dir(cache_key) / folder
        directory.mkdir(parents=True, exist_ok=True)
        full_meta = dict(meta)
        full_meta["artifact"] = f"{folder}/engine{suffix}"
        full_meta["artifact_sha256"] = artifact_sha256
        full_meta["artifact_bytes"] = artifact_temp.stat().st_size
        full_meta["cache_key"] = cache_key
        if weights_sha256:  # the artifact names this file, so it keeps its name
            full_meta["artifact_data"] = {f"{folder}/{weights.name}": weights_sha256}
            publish(weights, directory / weights.name)
        publish(artifact_temp, directory / f"engine{suffix}")
        if write_commit_point:
            self.write_json(self.engine_dir(cache_key) / "meta.json", full_meta)
        return full_meta

    def remove_artifact(self, cache_key: str, artifact: str) -> None:
        """Remove one build's files (a fenced-out build's, or one no version uses);
        ``artifact`` is its ``engine-<hash>`` directory or a path inside it."""
        folder = artifact.split("/", 1)[0]
        if not re.match(r"^engine-[0-9a-f]{64}$", folder):
            raise ValueError(f"not an artifact name: {artifact!r}")
        shutil.rmtree(self.engine_dir(cache_key) / folder, ignore_errors=True)

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
