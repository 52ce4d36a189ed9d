"""Run a real ``kiln serve`` process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import free_port


class ServerProcess:
    def __init__(self, store: Path, **env: str) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "KILN_BACKEND": "onnxruntime", "PYTHONUNBUFFERED": "1", **env}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"server-{self.port}.log"

    def start(self, timeout_s: float = 60.0, wait_for: str = "/health/ready") -> ServerProcess:
        """Start ``kiln serve`` and wait until ``wait_for`` answers 200."""
        kiln = Path(sys.executable).with_name("kiln")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(kiln),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--store",
                    str(self.store),
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}{wait_for}", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout_s} s:\n{self.log.read_text()}")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return int(self.process.returncode)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_children(server: ServerProcess) -> list[psutil.Process]:
    """The server's build child processes now."""
    assert server.process is not None
    children = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing" in command and "resource_tracker" not in command:
            children.append(child)
    return children


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
