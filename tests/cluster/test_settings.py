"""The catalog settings: a URL or a file holding it, checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings

URL = "postgresql://kiln:pw@db:5432/kiln"


def test_the_url_comes_from_the_variable_or_the_mounted_file(tmp_path: Path) -> None:
    assert Settings().catalog_url is None
    assert Settings(catalog_url=URL).catalog_url == URL
    secret = tmp_path / "uri"
    secret.write_text(URL + "\n")
    assert Settings(catalog_url_file=secret).catalog_url == URL
    settings = Settings(catalog_url_file=secret)
    assert (settings.catalog_lease_ttl_s, settings.catalog_resync_s) == (30.0, 5.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"catalog_url": "mysql://db/kiln"}, "KILN_CATALOG_URL must be a postgresql://"),
        ({"catalog_url_file": Path("/nonexistent/uri")}, "KILN_CATALOG_URL_FILE cannot be read"),
        ({"catalog_lease_ttl_s": 0}, "greater than or equal to 0.5"),
        # A resync that is not well under the ttl: a replica's view of the others
        # (and theirs of it) would be older than the leases it decides on.
        (
            {"catalog_lease_ttl_s": 30, "catalog_resync_s": 30},
            "KILN_CATALOG_RESYNC_S .30. must be at most a third",
        ),
        (
            {"catalog_lease_ttl_s": 2, "catalog_resync_s": 0.7},
            "at most a third of KILN_CATALOG_LEASE_TTL_S .2.",
        ),
    ],
)
def test_bad_catalog_settings_stop_start_up_naming_the_variable(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**fields)


def test_a_resync_of_a_third_of_the_ttl_is_accepted() -> None:
    assert Settings(catalog_lease_ttl_s=3, catalog_resync_s=1).catalog_resync_s == 1
