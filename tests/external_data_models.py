"""Models with external data, as real exporters write them, and archives of them
(well-formed and malicious) for the upload tests."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx


def dynamo_cnn(directory: Path) -> Path:
    """A small CNN (Conv + BatchNorm + residual add + Linear) exported by
    ``torch.onnx.export(..., dynamo=True)``, which writes ``model.onnx`` and its
    weights in ``model.onnx.data`` beside it. Returns the graph's path."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(image)))
            y = y + torch.relu(self.conv2(y))
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 16, 16),),
        str(path),
        dynamo=True,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", max=64)}},
    )
    assert (directory / "model.onnx.data").is_file(), "the dynamo exporter wrote no external data"
    return path


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], *, gzip: bool = False) -> bytes:
    """A tar (or tar.gz) of regular files given as (name, bytes), and of prepared
    ``TarInfo`` entries (links, devices) without data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as bundle:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                bundle.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def package_members(graph: Path) -> dict[str, bytes]:
    """The graph and the data files it names, as archive members by location."""
    model = onnx.load_model(str(graph), load_external_data=False)
    members = {"model.onnx": graph.read_bytes()}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                members[entry.value] = (graph.parent / entry.value).read_bytes()
    return members


def with_location(graph: Path, location: str) -> bytes:
    """The graph's bytes with every external reference pointing at ``location``."""
    model = onnx.load_model(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString()


def reference(graph: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime's outputs on the original exported files."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
