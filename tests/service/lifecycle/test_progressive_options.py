"""The progressive option: per upload, defaulting to KILN_PROGRESSIVE."""

from __future__ import annotations

import pytest

from service.errors import BadRequest
from service.lifecycle.options import parse_upload_fields, progressive_of
from service.settings import Settings


@pytest.mark.parametrize(
    ("server", "field", "expected"),
    [
        (True, None, True),
        (False, None, False),
        (True, "false", False),
        (False, "true", True),
        (True, "0", False),
    ],
)
def test_the_upload_field_overrides_the_server_setting(
    server: bool, field: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILN_PROGRESSIVE", str(server).lower())
    fields = {"name": "m"} | ({"progressive": field} if field is not None else {})
    assert progressive_of(parse_upload_fields(fields), Settings()) is expected


def test_progressive_defaults_to_true() -> None:
    assert Settings().progressive is True


def test_a_progressive_value_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(BadRequest, match="progressive"):
        parse_upload_fields({"name": "m", "progressive": "sometimes"})
