"""Taking in a model together with its external data files.

Exporters write large models, and by default ``torch.onnx.export(..., dynamo=True)``
every model, as a graph plus data files it names by relative path
(``model.onnx`` + ``model.onnx.data``). kiln takes them in one upload:

- the graph and one file per data file (the server's ``model`` and ``model_data``
  form parts, each data part's file name being the location the graph names), or
- one ``.zip``, ``.tar`` or ``.tar.gz`` archive holding exactly one ``.onnx`` graph
  and its data files, at their locations relative to it, or
- for ``kiln build``, the path of a graph whose data files lie beside it.

The files are laid out as a package directory in the store's ``tmp/`` holding
nothing else, checked by the upload gate (``load_model(..., external_data=True)``:
every reference confined to the package) and, when the model has external data,
published as ``models/<package sha256>/`` (``EngineStore.add_model_package``).
A model without external data is stored as one file, as before.

What an upload may hold: regular files and directories only (no symbolic or hard
links, devices or FIFOs), names that stay inside the package (no absolute paths,
no ``..``), every file referenced by the graph, at most ``MAX_PACKAGE_FILES``
files and ``max_bytes`` bytes unpacked (an archive bomb stops at the limit).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from engines.errors import InvalidModel
from engines.onnx_model import confined_path, external_locations, load_model, read_signature
from engines.store import PACKAGE_GRAPH, EngineStore, package_files, package_sha256, sha256_file
from engines.types import Signature

MAX_PACKAGE_FILES = 4096
"""The most files one model may come in (exporters can write one file per tensor)."""

_CHUNK = 1024 * 1024
_TAR_HEADER_SLACK = 16 * 1024 * 1024
"""Decompressed tar bytes allowed beyond ``max_bytes`` for headers and padding."""


@dataclass
class StagedModel:
    """An upload laid out in the store's ``tmp/`` and passed by the upload gate."""

    graph: Path
    """The graph file; inside ``package`` when the model has external data."""
    sha256: str
    """The content address: the file's sha256, or the package's (``package_sha256``)."""
    signature: Signature
    package: Path | None
    """The directory of the graph and its data files; None for a self-contained model."""
    workdir: Path

    def publish(self, store: EngineStore) -> Path:
        """Move the model into the store under its content address; returns the graph."""
        if self.package is None:
            return store.add_model(self.graph, self.sha256)
        return store.add_model_package(self.package, self.sha256)

    def discard(self) -> None:
        """Remove whatever of the upload was not published."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def stage_upload(
    store: EngineStore,
    model: Path,
    data_files: Sequence[tuple[str, Path]],
    max_bytes: int,
) -> StagedModel:
    """Take in an uploaded ``model`` (a graph or an archive) and the uploaded data
    files (the location each stands for, and its temp file; moved, not copied).
    Blocking. Raises ``InvalidModel`` or ``UnsupportedModel``."""
    kind = archive_kind(model)
    if kind is not None and data_files:
        raise InvalidModel("send either an archive or the graph with 'model_data' files, not both")
    with _workdir(store) as workdir:
        package = workdir / "package"
        package.mkdir()
        if kind is not None:
            graph = _extract(model, kind, package, max_bytes)
            model.unlink(missing_ok=True)
        else:
            intake = _Intake(max_bytes)
            graph = package / intake.add_file(PACKAGE_GRAPH, "the graph")
            os.replace(model, graph)
            intake.add_bytes(graph.stat().st_size)
            for name, path in data_files:
                target = package / intake.add_file(name, "the data file name")
                intake.add_bytes(path.stat().st_size)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        return _check(graph, package, workdir)


def stage_path(store: EngineStore, source: Path, max_bytes: int) -> StagedModel:
    """Take in a model from the local disk (for ``kiln build``): an archive, or a
    graph whose data files lie beside it (only the files it names are copied)."""
    kind = archive_kind(source)
    with _workdir(store) as workdir:
        package = workdir / "package"
        package.mkdir()
        if kind is not None:
            return _check(_extract(source, kind, package, max_bytes), package, workdir)
        intake = _Intake(max_bytes)
        graph = package / intake.add_file(PACKAGE_GRAPH, "the graph")
        shutil.copyfile(source, graph)
        intake.add_bytes(graph.stat().st_size)
        for location in sorted(named_files(graph)):
            original = source.parent / location
            if not original.is_file():
                continue  # the gate names the missing file
            target = package / intake.add_file(location, "the data file")
            intake.add_bytes(original.stat().st_size)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, target)
        return _check(graph, package, workdir)


def named_files(graph: Path) -> set[str]:
    """The data files a graph names; none when it does not parse (the gate says why).
    Raises ``InvalidModel`` for a location that would leave the graph's folder."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(graph), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return set()
    return external_locations(model)


@contextmanager
def _workdir(store: EngineStore) -> Iterator[Path]:
    """A fresh directory in the store's temp directory, removed if staging fails."""
    workdir = Path(tempfile.mkdtemp(dir=store.temp_dir, prefix="upload-"))
    try:
        yield workdir
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _check(graph: Path, package: Path, workdir: Path) -> StagedModel:
    """Run the upload gate on a laid-out package; a model without external data
    leaves its package as a single file."""
    model = load_model(graph, external_data=True)
    signature = read_signature(model)
    referenced = external_locations(model)
    del model
    extra = [
        p.relative_to(package).as_posix()
        for p in package_files(package)
        if p != graph and p.relative_to(package).as_posix() not in referenced
    ]
    if extra:
        shown = ", ".join(f"'{name}'" for name in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise InvalidModel(
            f"the upload holds files the model does not reference: {shown}; send only the graph "
            "and the data files it names"
        )
    if not referenced:
        single = workdir / "model.onnx"
        os.replace(graph, single)
        return StagedModel(single, sha256_file(single), signature, None, workdir)
    return StagedModel(graph, package_sha256(package), signature, package, workdir)


# -- archives ---------------------------------------------------------------------


def archive_kind(path: Path) -> str | None:
    """'zip', 'tar' or 'gztar' by the file's first bytes; None for anything else
    (an ONNX graph)."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gztar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
)
"""What the archive libraries raise on a corrupt or truncated archive."""


def _extract(archive: Path, kind: str, package: Path, max_bytes: int) -> Path:
    """Unpack ``archive`` into ``package`` and return its one graph, moved to
    ``package/model.onnx``; the files must lie in the graph's folder or below it."""
    raw = package.parent / "archive"
    raw.mkdir()
    try:
        names = _unzip(archive, raw, max_bytes) if kind == "zip" else _untar(archive, raw, kind, max_bytes)
    except _UNREADABLE as exc:
        raise InvalidModel(f"the archive cannot be read: {str(exc)[:300] or type(exc).__name__}") from exc
    except NotImplementedError as exc:  # a zip compression method Python does not have
        raise InvalidModel(f"the archive cannot be read: {str(exc)[:300]}; use deflate") from exc
    graphs = [name for name in names if name.lower().endswith(".onnx")]
    if len(graphs) != 1:
        found = "no .onnx file" if not graphs else f"{len(graphs)} .onnx files ({', '.join(graphs[:5])})"
        raise InvalidModel(f"the archive must hold exactly one .onnx graph; it holds {found}")
    folder = graphs[0].rpartition("/")[0]
    for name in names:
        relative = name[len(folder) + 1 :] if folder else name
        if folder and not name.startswith(folder + "/"):
            raise InvalidModel(
                f"the archive member '{name}' lies outside the graph's folder '{folder}'; "
                "the model does not reference it"
            )
        target = package / (PACKAGE_GRAPH if name == graphs[0] else relative)
        if target.exists():
            raise InvalidModel(f"the archive member '{name}' clashes with the graph's name in the store")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(raw / name, target)
    shutil.rmtree(raw, ignore_errors=True)
    return package / PACKAGE_GRAPH


class _Intake:
    """The files of one upload so far, against its limits: names that stay inside
    the package and never clash, at most ``MAX_PACKAGE_FILES`` files and
    ``max_bytes`` bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.files: set[str] = set()
        self.folders: set[str] = set()

    def add_file(self, name: str, what: str) -> str:
        relative = confined_path(name, what)
        parents = ["/".join(relative.split("/")[:i]) for i in range(1, relative.count("/") + 1)]
        if relative in self.files or relative in self.folders or any(p in self.files for p in parents):
            raise InvalidModel(f"{what} '{name[:200]}' clashes with another file of the upload")
        self.files.add(relative)
        self.folders.update(parents)
        if len(self.files) > MAX_PACKAGE_FILES:
            raise InvalidModel(f"the upload holds more than {MAX_PACKAGE_FILES} files")
        return relative

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise InvalidModel(
                f"the model and its data files are more than {self.max_bytes} bytes "
                "(unpacked), the upload limit"
            )


def _copy_member(source: IO[bytes], target: Path, budget: _Intake) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            budget.add_bytes(len(chunk))
            out.write(chunk)


def _unzip(archive: Path, raw: Path, max_bytes: int) -> list[str]:
    budget = _Intake(max_bytes)
    names = []
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        if len(members) > 2 * MAX_PACKAGE_FILES:
            raise InvalidModel(f"the archive holds more than {MAX_PACKAGE_FILES} files")
        for info in members:
            # Unix zips keep the file type in the high bits; 0 means not recorded.
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
            if info.is_dir() and kind in (0, stat.S_IFDIR):
                confined_path(info.filename, "the archive member")
                continue
            if kind not in (0, stat.S_IFREG):
                what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file"
                raise InvalidModel(f"the archive member '{info.filename[:200]}' is {what}")
            if info.flag_bits & 0x1:
                raise InvalidModel(f"the archive member '{info.filename[:200]}' is encrypted")
            relative = budget.add_file(info.filename, "the archive member")
            with bundle.open(info) as source:
                _copy_member(source, raw / relative, budget)
            names.append(relative)
    return names


class _CappedReader:
    """A decompressed stream that ends in ``InvalidModel`` past ``cap`` bytes, so a
    gzip bomb or a huge tar header cannot fill memory or disk."""

    def __init__(self, inner: io.BufferedIOBase, cap: int) -> None:
        self.inner = inner
        self.cap = cap

    def read(self, size: int = -1) -> bytes:
        if size < 0 or self.inner.tell() + size > self.cap:
            size = self.cap + 1 - self.inner.tell()
        data = self.inner.read(max(size, 0))
        if self.inner.tell() > self.cap:
            raise InvalidModel(f"the archive unpacks to more than {self.cap} bytes, the upload limit")
        return data


def _untar(archive: Path, raw: Path, kind: str, max_bytes: int) -> list[str]:
    budget = _Intake(max_bytes)
    names = []
    with archive.open("rb") as compressed:
        stream: io.BufferedIOBase = gzip.GzipFile(fileobj=compressed) if kind == "gztar" else compressed
        capped = _CappedReader(stream, max_bytes + _TAR_HEADER_SLACK)
        # Stream mode: members are read once, in order, and nothing seeks back.
        with tarfile.open(fileobj=capped, mode="r|") as bundle:  # type: ignore[call-overload]
            for member in bundle:
                if member.isdir():
                    confined_path(member.name, "the archive member")
                    continue
                if not member.isreg() or member.issparse():
                    what = (
                        "a symbolic link"
                        if member.issym()
                        else "a hard link"
                        if member.islnk()
                        else "a device file"
                        if member.isdev()
                        else "not a regular file"
                    )
                    raise InvalidModel(f"the archive member '{member.name[:200]}' is {what}")
                relative = budget.add_file(member.name, "the archive member")
                if budget.bytes + member.size > max_bytes:
                    budget.add_bytes(member.size)  # refused before reading what cannot fit
                source = bundle.extractfile(member)
                assert source is not None
                _copy_member(source, raw / relative, budget)
                names.append(relative)
    return names
