"""``engines.s3`` against a real S3 server (SeaweedFS ``weed mini``): parallel ranged
downloads hashed on the way, conditional writes that never overwrite, listing, and
failures as kiln's errors (an unreachable endpoint: tests/service/lifecycle/test_sources_api.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from engines import s3 as s3_module
from engines.errors import InvalidSource, ObjectAccessDenied, ObjectNotFound, ObjectStoreUnavailable, TooLarge
from engines.s3 import ObjectInfo, S3Client, parse_s3_uri
from tests.s3server import SeaweedS3

MIB = 1024 * 1024


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


async def download(key: str, target: Path, **options: int) -> s3_module.Fetched:
    async with S3Client.connect() as client:
        return await client.download("kiln-test", key, target, **options)


def test_a_download_in_parts_is_the_object_with_its_sha256(
    s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "PART_BYTES", MIB)  # 4 ranged GETs, the last one short
    monkeypatch.setattr(s3_module, "CONNECTIONS", 2)
    data = os.urandom(3 * MIB + 12345)
    key = unique("parts")
    s3.put(key, data)
    fetched = asyncio.run(download(key, tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data
    assert fetched.size == len(data)
    assert fetched.sha256 == hashlib.sha256(data).hexdigest()


def test_an_empty_object_downloads_as_an_empty_file(s3: SeaweedS3, tmp_path: Path) -> None:
    key = unique("empty")
    s3.put(key, b"")
    fetched = asyncio.run(download(key, tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == b""
    assert fetched.sha256 == hashlib.sha256(b"").hexdigest()


def test_an_object_over_the_limit_is_refused_before_any_byte_is_fetched(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    key = unique("big")
    s3.put(key, b"x" * 2048)
    with pytest.raises(TooLarge, match="2048 bytes, more than the limit of 1024"):
        asyncio.run(download(key, tmp_path / "out", max_bytes=1024))
    assert not (tmp_path / "out").exists()


def test_an_object_replaced_between_parts_is_not_mixed(
    s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ranged GET carries the ETag the HEAD saw (If-Match): parts of another
    version of the object fail the download instead of being stitched in."""
    key = unique("replaced")
    s3.put(key, b"version 1")
    real_head = S3Client.head

    async def head_then_replace(self: S3Client, bucket: str, key: str) -> ObjectInfo:
        info = await real_head(self, bucket, key)
        await asyncio.to_thread(s3.put, key, b"version 2")
        return info

    monkeypatch.setattr(S3Client, "head", head_then_replace)
    with pytest.raises(ObjectStoreUnavailable, match="replaced while being read"):
        asyncio.run(download(key, tmp_path / "out"))


def test_missing_objects_and_denied_access_are_kiln_errors(
    s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("present", b"here")
    with pytest.raises(ObjectNotFound, match=r"s3://kiln-test/absent does not exist"):
        asyncio.run(download("absent", tmp_path / "out"))

    async def from_other_bucket() -> None:
        async with S3Client.connect() as client:
            await client.download("no-such-bucket", "key", tmp_path / "out")

    with pytest.raises(ObjectNotFound):
        asyncio.run(from_other_bucket())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(ObjectAccessDenied, match="refused access to s3://kiln-test/present"):
        asyncio.run(download("present", tmp_path / "out"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ObjectAccessDenied, match="no usable S3 credentials"):
        asyncio.run(download("present", tmp_path / "out"))


@pytest.mark.parametrize("size", [1000, 11 * MIB], ids=["single PUT", "multipart"])
def test_put_if_absent_never_overwrites(
    s3: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(s3_module, "PART_BYTES", 5 * MIB)  # S3's smallest part
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(os.urandom(size))
    second.write_bytes(os.urandom(size))
    key = unique("conditional")

    async def scenario() -> tuple[bool, bool]:
        async with S3Client.connect() as client:
            created = await client.put_if_absent("kiln-test", key, first)
            return created, await client.put_if_absent("kiln-test", key, second)

    assert asyncio.run(scenario()) == (True, False)
    assert s3.unfinished_uploads(key) == []  # the refused multipart upload was aborted
    asyncio.run(download(key, tmp_path / "kept"))
    assert (tmp_path / "kept").read_bytes() == first.read_bytes()


def test_of_writers_racing_for_one_key_exactly_one_wins(s3: SeaweedS3, tmp_path: Path) -> None:
    key = unique("race")
    sources = []
    for index in range(3):  # SeaweedFS makes each loser wait about a second
        sources.append(tmp_path / f"writer-{index}")
        sources[-1].write_bytes(f"writer {index}".encode() * 100)

    async def race() -> list[bool]:
        async with S3Client.connect() as client:
            return list(
                await asyncio.gather(*(client.put_if_absent("kiln-test", key, path) for path in sources))
            )

    outcomes = asyncio.run(race())
    assert outcomes.count(True) == 1, outcomes
    asyncio.run(download(key, tmp_path / "kept"))
    assert (tmp_path / "kept").read_bytes() == sources[outcomes.index(True)].read_bytes()


def test_list_objects_names_every_object_under_a_prefix(s3: SeaweedS3) -> None:
    prefix = unique("listing")
    for name, body in (("b", b"22"), ("a", b"1"), ("c/d", b"333")):
        s3.put(f"{prefix}/{name}", body)
    s3.put(f"{prefix}-sibling", b"not under the prefix")

    async def listing() -> list[tuple[str, int]]:
        async with S3Client.connect() as client:
            return [(o.key, o.size) async for o in client.list_objects("kiln-test", prefix + "/")]

    assert asyncio.run(listing()) == [(f"{prefix}/a", 1), (f"{prefix}/b", 2), (f"{prefix}/c/d", 3)]


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://bucket", "is not an s3://bucket/key URI"),
        ("s3:///key", "is not an s3://bucket/key URI"),
        ("s3://bucket/models/", "names a folder"),
        ("gs://bucket/key", "is not an s3://bucket/key URI"),
    ],
)
def test_s3_uris_name_exactly_one_object(uri: str, problem: str) -> None:
    with pytest.raises(InvalidSource, match=problem):
        parse_s3_uri(uri)
    assert parse_s3_uri("s3://b/m/model.onnx").sibling("w/part1.bin") == parse_s3_uri("s3://b/m/w/part1.bin")
    assert str(parse_s3_uri("s3://b/model.onnx").sibling("model.onnx.data")) == "s3://b/model.onnx.data"
