"""``engines.sources``: models by URL over real HTTPS (a local server with a
certificate from a test CA, trusted as an operator trusts a private CA, through
``SSL_CERT_FILE``) and plain HTTP (only when allowed), and the rules every URI
follows."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from engines.errors import ChecksumMismatch, InvalidModel, InvalidSource, ObjectNotFound, TooLarge
from engines.sources import Fetcher
from tests.external_data_models import package_members, with_location
from tests.http_files import serve_files


def test_a_graph_by_https_url_brings_the_data_files_it_names_from_beside_it(
    dynamo_model: Path, tmp_path: Path, trusted_ca: Any
) -> None:
    members = package_members(dynamo_model)
    with serve_files(trusted_ca) as web:
        assert web.url.startswith("https://")
        web.files = {f"/exports/cnn/{name}": data for name, data in members.items()}
        web.files["/exports/cnn/unrelated.bin"] = b"never fetched"
        fetched = asyncio.run(
            Fetcher().fetch_model(
                f"{web.url}/exports/cnn/model.onnx?token=abc",
                tmp_path,
                max_bytes=10**7,
                sha256=hashlib.sha256(members["model.onnx"]).hexdigest().upper(),
            )
        )
    assert fetched.filename == "model.onnx"
    assert fetched.model.path.read_bytes() == members["model.onnx"]
    assert fetched.model.sha256 == hashlib.sha256(members["model.onnx"]).hexdigest()
    assert [(location, path.read_bytes()) for location, path in fetched.data_files] == [
        ("model.onnx.data", members["model.onnx.data"])
    ]
    # The query string signs one object: data files are asked for without it.
    assert web.requests == ["/exports/cnn/model.onnx?token=abc", "/exports/cnn/model.onnx.data"]


def test_a_wrong_sha256_stops_before_the_data_files_are_fetched(dynamo_model: Path, tmp_path: Path) -> None:
    members = package_members(dynamo_model)
    with serve_files() as web:
        web.files = {f"/{name}": data for name, data in members.items()}
        with pytest.raises(
            ChecksumMismatch, match=f"has sha256 {hashlib.sha256(members['model.onnx']).hexdigest()}"
        ):
            asyncio.run(
                Fetcher(allow_http=True).fetch_model(
                    f"{web.url}/model.onnx", tmp_path, max_bytes=10**7, sha256="0" * 64
                )
            )
        assert web.requests == ["/model.onnx"]


def test_a_missing_data_file_and_the_size_limit_are_named(dynamo_model: Path, tmp_path: Path) -> None:
    members = package_members(dynamo_model)
    with serve_files() as web:
        web.files = {"/model.onnx": members["model.onnx"]}
        fetcher = Fetcher(allow_http=True)
        with pytest.raises(
            ObjectNotFound, match=r"names the data file 'model\.onnx\.data', but .* does not exist"
        ):
            asyncio.run(fetcher.fetch_model(f"{web.url}/model.onnx", tmp_path, max_bytes=10**7))
        web.files["/model.onnx.data"] = members["model.onnx.data"]
        limit = len(members["model.onnx"]) + len(members["model.onnx.data"]) - 1
        with pytest.raises(TooLarge, match=f"and its data files are more than {limit} bytes"):
            asyncio.run(fetcher.fetch_model(f"{web.url}/model.onnx", tmp_path, max_bytes=limit))
        with pytest.raises(ObjectNotFound, match="does not exist \\(HTTP 404\\)"):
            asyncio.run(fetcher.fetch_file(f"{web.url}/nothing.npz", tmp_path / "x", max_bytes=100))


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://127.0.0.1:9/model.onnx", "plain http:// only with KILN_SOURCE_ALLOW_HTTP=true"),
        ("ftp://host/model.onnx", "is not a URI kiln fetches"),
        ("https:///model.onnx", "names no host"),
        ("s3://bucket/", "is not an s3://bucket/key URI"),
    ],
)
def test_uris_kiln_does_not_fetch_are_refused_before_any_connection(
    uri: str, problem: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidSource, match=problem):
        asyncio.run(Fetcher().fetch_model(uri, tmp_path, max_bytes=100))


def test_a_redirect_to_plain_http_is_refused_before_it_is_followed(trusted_ca: Any, tmp_path: Path) -> None:
    with serve_files(trusted_ca) as secure, serve_files() as plain:
        plain.files["/model.onnx"] = b"not fetched"
        secure.redirects["/model.onnx"] = f"{plain.url}/model.onnx"
        with pytest.raises(InvalidSource, match="redirects to the plain http:// URL"):
            asyncio.run(Fetcher().fetch_model(f"{secure.url}/model.onnx", tmp_path, max_bytes=100))
        assert secure.requests == ["/model.onnx"] and plain.requests == []


def test_a_certificate_kiln_does_not_trust_is_named(test_ca: Any, tmp_path: Path) -> None:
    with (
        serve_files(test_ca) as web,
        pytest.raises(InvalidSource, match=r"TLS certificate .* is not trusted"),
    ):
        web.files["/model.onnx"] = b"x"
        asyncio.run(Fetcher().fetch_model(f"{web.url}/model.onnx", tmp_path, max_bytes=100))


def test_a_graph_naming_a_file_outside_its_folder_fetches_nothing_more(
    dynamo_model: Path, tmp_path: Path
) -> None:
    with serve_files() as web:
        web.files["/m/model.onnx"] = with_location(dynamo_model, "../secret.bin")
        web.files["/secret.bin"] = b"outside the model's folder"
        with pytest.raises(InvalidModel, match="climbs out of its directory"):
            asyncio.run(
                Fetcher(allow_http=True).fetch_model(f"{web.url}/m/model.onnx", tmp_path, max_bytes=10**7)
            )
        assert web.requests == ["/m/model.onnx"]
