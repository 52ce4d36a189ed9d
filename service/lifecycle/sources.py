"""Uploads that name their files by URI instead of sending them.

``POST /engines`` and ``kiln build`` take ``source`` (the model: ``s3://bucket/key``
or ``https://…``) instead of a ``model`` file, ``calibration_source`` and
``validation_source`` instead of the data files, and ``sha256``, the model's
expected sha256 (of the object ``source`` names, or of the uploaded ``model``
file). ``fetch_sources`` fetches them into the store's ``tmp/`` (through
``engines.sources``, off the event loop, hashed, within the upload limits) and
hands them back as if they had been uploaded, so ``register_version`` and
everything after it is the same for both. Nothing is registered when a fetch
fails: the fetched files are removed and the error answers the request.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engines import sources
from engines.errors import ObjectStoreUnavailable, TooLarge
from engines.store import EngineStore
from service.errors import BadRequest, PayloadTooLarge, ServiceError
from service.lifecycle.options import parse_upload_fields
from service.lifecycle.registry import check_name
from service.lifecycle.uploads import UploadedFile
from service.settings import Settings

SOURCE_FIELDS = ("source", "sha256", "calibration_source", "validation_source")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class SourceUnavailable(ServiceError):
    """The object store or web server holding a source cannot be reached: retry later."""

    status, kind = 503, "source_unavailable"


@dataclass
class FetchedSources:
    files: dict[str, UploadedFile] = field(default_factory=dict)
    """``model``, ``calibration``, ``validation``: what was fetched, as uploads."""
    model_data: list[tuple[str, Path]] = field(default_factory=list)
    workdir: Path | None = None

    def discard(self) -> None:
        """Remove whatever ``register_version`` did not publish."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def check_sha256(actual: str, expected: str, what: str) -> None:
    """``expected`` (a request's text) checked as a sha256, then against ``actual``."""
    sources.check_sha256(actual, _sha256_field(expected), what)


def _sha256_field(text: str) -> str:
    if not _SHA256.match(text):
        raise BadRequest("sha256 must be 64 hexadecimal digits (what sha256sum prints for the model file)")
    return text.lower()


async def fetch_sources(
    fields: dict[str, str],
    files: dict[str, UploadedFile],
    has_model_data: bool,
    store: EngineStore,
    settings: Settings,
) -> FetchedSources:
    """Take the source fields out of ``fields`` and fetch what they name. ``files``
    are the upload's own files (to refuse a file and a URI for the same thing);
    ``has_model_data``: the upload has ``model_data`` parts. Checks an uploaded
    model against ``sha256`` too."""
    named = {name: fields.pop(name) for name in SOURCE_FIELDS if name in fields}
    expected = _sha256_field(named["sha256"]) if "sha256" in named else None
    if "source" in named and ("model" in files or has_model_data):
        raise BadRequest("send the model either as a 'model' file or as a 'source' URI, not both")
    if "calibration_source" in named and ("calibration" in files or "calibration" in fields):
        raise BadRequest("send calibration data as a file, a calibration_source URI or calibration=synthetic")
    if "validation_source" in named and "validation" in files:
        raise BadRequest("send validation data either as a file or as a validation_source URI, not both")
    if expected is not None and "source" not in named:
        if "model" not in files:
            raise BadRequest("sha256 checks the model: send it with a 'model' file or a 'source' URI")
        check_sha256(files["model"].sha256, expected, "the uploaded model")
    fetched = FetchedSources()
    if not {"source", "calibration_source", "validation_source"} & named.keys():
        return fetched
    # What can be refused without the files is refused before fetching them.
    if "name" not in fields:
        raise BadRequest("the upload needs a 'name' field")
    check_name(parse_upload_fields(fields).name)
    fetched.workdir = Path(tempfile.mkdtemp(dir=store.temp_dir, prefix="fetch-"))
    fetcher = sources.Fetcher(allow_http=settings.source_allow_http)
    limit = "KILN_MAX_UPLOAD_BYTES"
    try:
        if "source" in named:
            model = await fetcher.fetch_model(
                named["source"],
                fetched.workdir,
                max_bytes=settings.max_upload_bytes,
                sha256=expected,
            )
            fetched.files["model"] = UploadedFile(
                "model", model.filename, model.model.path, model.model.size, model.model.sha256
            )
            fetched.model_data = model.data_files
        limit = "KILN_MAX_DATA_BYTES"
        for purpose in ("calibration", "validation"):
            uri = named.get(f"{purpose}_source")
            if uri is not None:
                data = await fetcher.fetch_file(
                    uri, fetched.workdir / purpose, max_bytes=settings.max_data_bytes
                )
                name = uri.split("?", 1)[0].rsplit("/", 1)[-1]
                fetched.files[purpose] = UploadedFile(purpose, name, data.path, data.size, data.sha256)
    except ObjectStoreUnavailable as exc:
        fetched.discard()
        raise SourceUnavailable(exc.message, headers={"Retry-After": "10"}) from None
    except TooLarge as exc:
        fetched.discard()
        raise PayloadTooLarge(f"{exc.message} ({limit})") from None
    except BaseException:
        fetched.discard()
        raise
    return fetched
