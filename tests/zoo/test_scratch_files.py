"""A build writes only inside the store: ONNX Runtime's quantization tools drop
``sym_shape_infer_temp.onnx`` and ``<uuid>.data`` into the working directory when their
symbolic shape inference gives up (it does on magika's tf2onnx graph)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.store import EngineStore
from tests.zoo.harness import build_cell
from tests.zoo.models import BY_NAME

pytestmark = pytest.mark.slow


@pytest.fixture
def read_only_cwd(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "cwd"
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    previous = os.getcwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(previous)
        directory.chmod(stat.S_IRWXU)


def test_int8_build_leaves_nothing_in_the_working_directory_or_the_store_tmp(
    read_only_cwd: Path, tmp_path: Path
) -> None:
    model = BY_NAME["magika"]
    cell = build_cell(model, model.make(tmp_path), "int8", tmp_path / "store")

    assert cell.state == "ready", cell.message
    assert "symbolic shape inference failed" in cell.report["transform"]["pre_process"]
    assert list(read_only_cwd.iterdir()) == []
    assert Path.cwd() == read_only_cwd
    assert list(EngineStore(tmp_path / "store").root.joinpath("tmp").iterdir()) == []
