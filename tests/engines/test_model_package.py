"""Models with external data: intake from parts, archives and paths; confinement of
every file and reference to the upload; the content-addressed package in the store;
engines whose weights stay external (the >2 GB path)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import engines.backends.onnxruntime as ort_backend
from engines import model_package
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.build import BuildJob, run_build
from engines.errors import InvalidModel, StoreCorrupted
from engines.model_package import StagedModel, stage_path, stage_upload
from engines.onnx_model import DEFAULT_MAX_MODEL_BYTES, external_data_bytes, load_model, read_signature
from engines.store import EngineStore, package_sha256
from engines.types import BuildOptions, Precision, Signature, engine_cache_key
from tests.external_data_models import package_members, reference, tar_bytes, with_location, zip_bytes

LIMIT = 1024 * 1024


def stage_bytes(store: EngineStore, data: bytes, max_bytes: int = LIMIT) -> StagedModel:
    upload = store.temp_path(".upload")
    upload.write_bytes(data)
    return stage_upload(store, upload, [], max_bytes)


def stage_parts(store: EngineStore, graph: bytes, parts: dict[str, bytes]) -> StagedModel:
    upload = store.temp_path(".upload")
    upload.write_bytes(graph)
    files = []
    for name, data in parts.items():
        path = store.temp_path(".upload")
        path.write_bytes(data)
        files.append((name, path))
    return stage_upload(store, upload, files, LIMIT)


def leftovers(store: EngineStore) -> list[str]:
    """What staging left in ``tmp/`` besides the uploaded files (the form's to remove)."""
    return sorted(p.name for p in (store.root / "tmp").iterdir() if p.suffix != ".upload")


# -- one content address, whatever way the files came ---------------------------------


def test_parts_archives_and_paths_give_one_stored_package(tmp_path: Path, dynamo_model: Path) -> None:
    store = EngineStore(tmp_path / "store")
    members = package_members(dynamo_model)
    assert set(members) == {"model.onnx", "model.onnx.data"}
    staged = [
        stage_parts(store, members["model.onnx"], {"model.onnx.data": members["model.onnx.data"]}),
        stage_bytes(store, zip_bytes(members)),
        stage_bytes(store, tar_bytes(list(members.items()))),
        stage_bytes(store, tar_bytes(list(members.items()), gzip=True)),
        # an archive of the export folder itself
        stage_bytes(store, zip_bytes({f"export/{name}": data for name, data in members.items()})),
        stage_path(store, dynamo_model, LIMIT),
    ]
    shas = {s.sha256 for s in staged}
    assert len(shas) == 1
    assert staged[0].signature.inputs[0].name == "image"
    for s in staged:
        graph = s.publish(store)
        s.discard()
    sha = shas.pop()
    assert graph == store.model_path(sha) == store.root / "models" / sha / "model.onnx"
    assert sorted(p.name for p in graph.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert store.is_package(sha) and store.stored_model_sha256(sha) == sha == package_sha256(graph.parent)
    assert leftovers(store) == []
    # the stored package is self-contained: ONNX Runtime loads it from the store
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_array_equal(reference(graph, feeds)["logits"], reference(dynamo_model, feeds)["logits"])
    (graph.parent / "model.onnx.data").write_bytes(b"\0" * len(members["model.onnx.data"]))
    assert store.stored_model_sha256(sha) != sha  # a changed data file changes the address
    store.remove_model(sha)
    assert not (store.root / "models" / sha).exists()


def test_an_archive_of_a_self_contained_model_is_stored_as_one_file(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    store = EngineStore(tmp_path)
    staged = stage_bytes(store, zip_bytes({"mlp.onnx": model_files["mlp"].read_bytes()}))
    staged.publish(store)
    staged.discard()
    assert staged.package is None
    assert store.model_path(staged.sha256) == store.root / "models" / f"{staged.sha256}.onnx"
    assert store.model_path(staged.sha256).read_bytes() == model_files["mlp"].read_bytes()


def test_kiln_build_path_copies_only_the_files_the_graph_names(tmp_path: Path, dynamo_model: Path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(dynamo_model.parent, folder)
    (folder / "notes.txt").write_text("not part of the model")
    staged = stage_path(EngineStore(tmp_path / "store"), folder / "model.onnx", LIMIT)
    assert staged.package is not None
    assert sorted(p.name for p in staged.package.iterdir()) == ["model.onnx", "model.onnx.data"]
    staged.discard()


# -- confinement: each refusal names the problem ----------------------------------------


def _link(name: str, kind: bytes, target: str = "model.onnx.data") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def _zip_symlink(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("model.onnx", members["model.onnx"])
        info = zipfile.ZipInfo("model.onnx.data")
        info.create_system = 3
        info.external_attr = (0o120777) << 16  # a symbolic link
        bundle.writestr(info, "/etc/passwd")
    return buffer.getvalue()


MALICIOUS_ARCHIVES = {
    "absolute member": (
        lambda m: tar_bytes(
            [("model.onnx", m["model.onnx"]), ("/etc/model.onnx.data", m["model.onnx.data"])]
        ),
        r"'/etc/model.onnx.data' is an absolute path",
    ),
    "dot-dot member": (
        lambda m: zip_bytes({"model.onnx": m["model.onnx"], "../model.onnx.data": m["model.onnx.data"]}),
        r"'\.\./model.onnx.data' climbs out of its directory",
    ),
    "tar symlink": (
        lambda m: tar_bytes(
            [("model.onnx", m["model.onnx"]), _link("model.onnx.data", tarfile.SYMTYPE, "/etc")]
        ),
        r"'model.onnx.data' is a symbolic link",
    ),
    "zip symlink": (_zip_symlink, r"'model.onnx.data' is a symbolic link"),
    "hard link": (
        lambda m: tar_bytes(
            [("model.onnx", m["model.onnx"]), _link("model.onnx.data", tarfile.LNKTYPE, "x")]
        ),
        r"'model.onnx.data' is a hard link",
    ),
    "device file": (
        lambda m: tar_bytes([("model.onnx", m["model.onnx"]), _device("model.onnx.data")]),
        r"'model.onnx.data' is a device file",
    ),
    "missing data file": (
        lambda m: zip_bytes({"model.onnx": m["model.onnx"]}),
        r"keeps its data in 'model.onnx.data', which is not in the upload",
    ),
    "file the graph does not name": (
        lambda m: zip_bytes({**m, "extra.bin": b"1234"}),
        r"files the model does not reference: 'extra.bin'",
    ),
    "two graphs": (
        lambda m: zip_bytes({**m, "other.onnx": m["model.onnx"]}),
        r"exactly one .onnx graph; it holds 2 .onnx files",
    ),
    "member twice": (
        lambda m: tar_bytes([*m.items(), ("model.onnx.data", b"x")]),
        r"'model.onnx.data' clashes with another file",
    ),
    "not an archive nor a model": (lambda m: b"PK\x03\x04 truncated", r"the archive cannot be read"),
    "truncated tar.gz": (
        lambda m: tar_bytes(list(m.items()), gzip=True)[:-100],
        r"the archive cannot be read",
    ),
}


@pytest.mark.parametrize("case", MALICIOUS_ARCHIVES)
def test_malicious_archives_are_refused(tmp_path: Path, dynamo_model: Path, case: str) -> None:
    make, message = MALICIOUS_ARCHIVES[case]
    store = EngineStore(tmp_path)
    with pytest.raises(InvalidModel, match=message):
        stage_bytes(store, make(package_members(dynamo_model)))
    assert leftovers(store) == [] and list((store.root / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("/etc/passwd", r"'/etc/passwd' is an absolute path"),
        ("../../secret.bin", r"'\.\./\.\./secret\.bin' climbs out of its directory"),
        ("sub/../../secret.bin", r"climbs out of its directory"),
        ("C:/weights.bin", r"is an absolute path"),
        ("..\\secret.bin", r"contains a backslash"),
        ("other.bin", r"keeps its data in 'other.bin', which is not in the upload"),
    ],
)
def test_references_outside_the_upload_are_refused(
    tmp_path: Path, dynamo_model: Path, location: str, message: str
) -> None:
    store = EngineStore(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 100_000)
    data = (dynamo_model.parent / "model.onnx.data").read_bytes()
    with pytest.raises(InvalidModel, match=message):
        stage_parts(store, with_location(dynamo_model, location), {"model.onnx.data": data})
    assert leftovers(store) == []


def test_data_part_names_must_stay_in_the_upload(tmp_path: Path, dynamo_model: Path) -> None:
    store = EngineStore(tmp_path)
    members = package_members(dynamo_model)
    with pytest.raises(InvalidModel, match=r"data file name '\.\./model.onnx.data' climbs out"):
        stage_parts(store, members["model.onnx"], {"../model.onnx.data": members["model.onnx.data"]})
    with pytest.raises(InvalidModel, match=r"exactly one .onnx graph|either an archive or the graph"):
        stage_parts(store, zip_bytes(members), {"model.onnx.data": members["model.onnx.data"]})


def test_a_data_file_reached_through_a_link_is_refused(tmp_path: Path, dynamo_model: Path) -> None:
    """The gate itself, on a package directory holding a symbolic or a hard link."""
    outside = tmp_path / "outside.data"
    shutil.copyfile(dynamo_model.parent / "model.onnx.data", outside)
    for link, message in ((os.symlink, "is a symbolic link"), (os.link, "has several hard links")):
        package = tmp_path / f"package-{link.__name__}"
        package.mkdir()
        shutil.copyfile(dynamo_model, package / "model.onnx")
        link(outside, package / "model.onnx.data")
        with pytest.raises(InvalidModel, match=message):
            load_model(package / "model.onnx", external_data=True)


def _external_model(tmp_path: Path, entries: dict[str, str], data: bytes) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tmp_path.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    (tmp_path / "w.bin").write_bytes(data)
    return tmp_path / "model.onnx"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"location": "w.bin", "offset": "32", "length": "64"},
            r"reads bytes 32 to 96 of 'w.bin', which has 64",
        ),
        (
            {"location": "w.bin", "length": "32"},
            r"needs 64 bytes but its external data in 'w.bin' is 32 bytes",
        ),
        ({"location": "w.bin", "offset": "-1"}, r"external offset '-1' that is not a size"),
        ({"location": "w.bin", "basepath": "/etc"}, r"unknown external data key 'basepath'"),
        ({"offset": "0"}, r"names no file"),
    ],
)
def test_extents_and_keys_of_external_data_are_checked(
    tmp_path: Path, entries: dict[str, str], message: str
) -> None:
    graph = _external_model(tmp_path / "pkg", entries, np.ones(16, np.float32).tobytes())
    with pytest.raises(InvalidModel, match=message):
        load_model(graph, external_data=True)


# -- archive bombs ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_bombs_stop_at_the_upload_limit(tmp_path: Path, dynamo_model: Path, kind: str) -> None:
    store = EngineStore(tmp_path)
    members = package_members(dynamo_model)
    members["model.onnx.data"] = members["model.onnx.data"] + b"\0" * (16 * 1024 * 1024)
    data = zip_bytes(members) if kind == "zip" else tar_bytes(list(members.items()), gzip=True)
    assert len(data) < LIMIT / 10  # small on the wire, 16 MiB unpacked
    with pytest.raises(InvalidModel, match=rf"more than {LIMIT} bytes \(unpacked\), the upload limit"):
        stage_bytes(store, data)
    assert leftovers(store) == []


def test_a_huge_tar_header_does_not_fill_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GNU long-name header larger than the limit (tarfile reads such headers whole)."""
    monkeypatch.setattr(model_package, "_TAR_HEADER_SLACK", 64 * 1024)
    data = tar_bytes([("a" * (4 * 1024 * 1024), b"x")], gzip=True)
    with pytest.raises(InvalidModel, match=r"more than 66560 bytes, the upload limit"):
        stage_bytes(EngineStore(tmp_path), data, max_bytes=1024)


# -- models above protobuf's 2 GB ------------------------------------------------------------


def test_a_model_with_more_than_2_gb_of_weights_passes_the_gate_without_being_read(tmp_path: Path) -> None:
    """A real 2.5 GB data file (sparse on disk): the gate checks the graph and the
    references only, and the ONNX Runtime backend would keep the weights external."""
    rows = 2 * 1024**3 // 4 // 1024 + 128 * 1024  # > 2 GiB of float32 with 1024 columns
    weight = numpy_helper.from_array(np.ones((1, 1024), np.float32), "w")
    weight.ClearField("raw_data")
    weight.dims[:] = [rows, 1024]
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="weights.bin")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["y"])],
        "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1024])],
        initializer=[weight],
    )
    package = tmp_path / "package"
    package.mkdir()
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(package / "m.onnx")
    )
    with (package / "weights.bin").open("wb") as handle:
        handle.truncate(rows * 1024 * 4)
    model = load_model(package / "m.onnx", external_data=True)
    assert external_data_bytes(model) == rows * 1024 * 4 > DEFAULT_MAX_MODEL_BYTES
    assert external_data_bytes(model) > ort_backend.INLINE_WEIGHTS_LIMIT
    assert read_signature(model).inputs[0].name == "ids"


def test_engine_keeps_weights_external_above_the_inline_limit(
    tmp_path: Path, dynamo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path a model above 2 GB takes, with the limit lowered so that a small
    model takes it: built from the stored package without ever being serialised
    as one message, the artifact's weights in a checksummed file beside it."""
    monkeypatch.setattr(ort_backend, "INLINE_WEIGHTS_LIMIT", 0)
    store = EngineStore(tmp_path)
    staged = stage_path(store, dynamo_model, LIMIT)
    staged.publish(store)
    staged.discard()
    options = BuildOptions(max_batch_size=4)
    backend = OnnxRuntimeBackend()
    key = engine_cache_key(staged.sha256, options, backend.device_signature())
    meta = run_build(BuildJob(str(store.root), staged.sha256, options.to_dict(), "onnxruntime", key, (1, 4)))
    assert list(meta["artifact_data"]) == ["fp32.engine.data"]
    directory = store.engine_dir(key)
    assert sorted(p.name for p in directory.iterdir()) == ["engine.onnx", "fp32.engine.data", "meta.json"]
    assert store.verify_engine(key) == meta
    runner = backend.load(store.artifact_path(key, meta), Signature.from_dict(meta["signature"]), options)
    try:
        feeds = {"image": np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)}
        np.testing.assert_allclose(
            runner.infer(feeds)["logits"], reference(dynamo_model, feeds)["logits"], atol=1e-5, rtol=0
        )
    finally:
        runner.close()
    (directory / "fp32.engine.data").write_bytes(b"\0" * (directory / "fp32.engine.data").stat().st_size)
    with pytest.raises(StoreCorrupted, match=r"fp32\.engine\.data checksum"):
        store.verify_engine(key)


def test_graph_files_above_protobufs_limit_are_refused_with_advice(
    tmp_path: Path, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import engines.onnx_model as onnx_model

    size = model_files["mlp"].stat().st_size
    monkeypatch.setattr(onnx_model, "DEFAULT_MAX_MODEL_BYTES", size - 1)
    with pytest.raises(InvalidModel, match=r"save the weights as external data"):
        load_model(model_files["mlp"], max_bytes=10 * size)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_builds_of_a_model_with_external_data(
    tmp_path: Path, dynamo_model: Path, precision: str
) -> None:
    """The converters read the data files beside the stored graph and write a
    self-contained candidate (small models: weights inline)."""
    store = EngineStore(tmp_path)
    staged = stage_path(store, dynamo_model, LIMIT)
    staged.publish(store)
    staged.discard()
    options = BuildOptions(precision=Precision(precision), max_batch_size=4, synthetic_calibration=True)
    backend = OnnxRuntimeBackend()
    key = engine_cache_key(staged.sha256, options, backend.device_signature())
    meta = run_build(BuildJob(str(store.root), staged.sha256, options.to_dict(), "onnxruntime", key, (1, 4)))
    assert meta["precision"] == precision and "artifact_data" not in meta
    runner = backend.load(store.artifact_path(key, meta), Signature.from_dict(meta["signature"]), options)
    try:
        feeds = {"image": np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)}
        got = runner.infer(feeds)["logits"].ravel()
        want = reference(dynamo_model, feeds)["logits"].ravel()
        assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.99
    finally:
        runner.close()
    assert leftovers(store) == []
