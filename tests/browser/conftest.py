"""Headless Chromium driven by selenium against real ``kiln serve`` processes.

Debian's ``chromium`` and ``chromium-driver`` are installed by ``make browser``
(which ``make test`` runs). Flags keep the browser offline and quiet: no
background networking, component updates, sync or QUIC, and a fresh profile.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.slow

BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
)

DESKTOP = (1366, 900)
NARROW = (390, 844)


def _driver(user_data_dir: Path, size: tuple[int, int]) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(*size)
    return driver


@pytest.fixture(scope="session")
def _chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One browser for the session (starting one costs seconds), with a fresh profile."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (run `make browser`)")
    driver = _driver(tmp_path_factory.mktemp("chromium-profile"), DESKTOP)
    yield driver
    driver.quit()


@pytest.fixture
def browser(_chromium: Any) -> Any:
    """The session's browser on a blank page at desktop size, its console log emptied.

    Tests use their own server (origin), so no storage is shared between them."""
    _chromium.get("about:blank")
    _chromium.set_window_size(*DESKTOP)
    _chromium.get_log("browser")
    return _chromium


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("ui") / "store") as process:
        yield process


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("ui-keys") / "store", KILN_API_KEYS="s3cret-key") as process:
        yield process


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Polls ``condition`` until it returns something truthy; its last error explains a timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
            last = value
        except Exception as exc:  # the page may be between renders
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")


def console_errors(driver: Any) -> list[str]:
    """Severe browser console entries (CSP violations and script errors land here)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
