"""Fixtures of the catalog tests (PostgreSQL itself, ``postgres`` and ``catalog_url``,
is in tests/conftest.py: the browser tests use it too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.replicas import Replicas


@pytest.fixture
def replicas(catalog_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """``kiln serve`` processes on one store and one catalog; all killed at the end."""
    group = Replicas(tmp_path / "store", catalog_url)
    try:
        yield group
    finally:
        group.kill_all()
