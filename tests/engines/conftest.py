"""The fake GPU stack for the TensorRT backend's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.install import TENSORRT_10, TENSORRT_11, FakeGpu, install_fake_gpu


@pytest.fixture(params=[TENSORRT_10, TENSORRT_11], ids=["trt10", "trt11"])
def gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGpu]:
    """A fake TensorRT (10.x, then 11.x) on a fake CUDA runtime; fails a test that broke a rule."""
    fake = install_fake_gpu(monkeypatch, tensorrt_version=request.param)
    yield fake
    assert fake.violations() == []
