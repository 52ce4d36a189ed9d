"""One directory of exported zoo models per test session: a model trained for the zoo
(the language model, the detector) is trained once, whichever test asks first."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")
