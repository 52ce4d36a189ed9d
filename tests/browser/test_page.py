"""The page at ``/`` in a real headless Chromium against real ``kiln serve`` processes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser.conftest import console_errors, wait_until
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.slow

KEY = "s3cret-key"


def ready_engine(server: ServerProcess, model: Path, name: str, **fields: Any) -> None:
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        upload(client, model, name, **fields)
        assert wait_for_state(client, name)["state"] == "ready"


def text(driver: Any, selector: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, selector).text)


def live_value(driver: Any, chart: str) -> float | None:
    """The newest value a live chart shows beside its title (None before the first point)."""
    value = driver.find_element(By.CSS_SELECTOR, f"#{chart} .chart-now").get_attribute("data-value")
    return float(value) if value else None


def test_page_lists_an_uploaded_engine(
    server: ServerProcess, browser: Any, model_files: dict[str, Path]
) -> None:
    ready_engine(server, model_files["mlp"], "listed")
    browser.get(server.url + "/")
    row = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-engine="listed"]'), what="the engine's row"
    )
    assert "listed" in row.text
    assert wait_until(lambda: "ready" in row.find_element(By.CSS_SELECTOR, ".state").text)
    assert console_errors(browser) == []  # a CSP violation or a script error would be here


def test_upload_form_shows_the_build_to_ready_and_its_report(
    server: ServerProcess, browser: Any, model_files: dict[str, Path]
) -> None:
    browser.get(server.url + "/")
    browser.find_element(By.ID, "open-upload").click()
    browser.find_element(By.ID, "upload-model").send_keys(str(model_files["mlp"]))
    name = browser.find_element(By.ID, "upload-name")
    assert name.get_property("value") == "mlp"  # suggested from the file name
    name.clear()
    name.send_keys("formed")
    Select(browser.find_element(By.ID, "upload-precision")).select_by_value("fp16")
    browser.find_element(By.ID, "upload-submit").click()

    wait_until(lambda: browser.current_url.endswith("#/engines/formed/versions/1"), what="the engine view")
    assert browser.find_element(By.ID, "upload-progress").get_property("value") == 100
    seen: list[str] = []

    def state() -> bool:
        badge = browser.find_element(By.CSS_SELECTOR, 'tr[data-version="1"] .state')
        seen.append(f"{badge.get_attribute('data-state')}:{badge.text}")
        return badge.get_attribute("data-state") in ("ready", "fallback", "failed")

    wait_until(state, timeout_s=90, what="the build to finish")
    assert seen[-1].startswith("ready"), seen
    # It was watched progressing (on its baseline engine while the FP16 engine built).
    assert any(s.startswith(("building", "loading", "baseline")) for s in seen), seen

    # The report: fp16's accuracy against the FP32 model, and its latency per batch size.
    table = wait_until(lambda: browser.find_element(By.ID, "accuracy-table"), what="the accuracy table")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, "td").text for r in rows] == ["y", "y"]  # batch 1 and 8
    assert "cosine (mean)" in table.text.lower() and "✓ pass" in table.text
    chart = browser.find_element(By.ID, "latency-chart")
    assert chart.find_elements(By.TAG_NAME, "canvas")
    legend = chart.find_element(By.CLASS_NAME, "u-legend").text
    assert "fp16" in legend, legend
    assert "fp16 was requested" in text(browser, "#report .choice")
    assert console_errors(browser) == []


def test_a_build_that_fails_the_gate_shows_why(
    server: ServerProcess, browser: Any, model_files: dict[str, Path]
) -> None:
    with server.client() as client:
        # Without a baseline engine, which would go on serving: the version fails.
        upload(
            client,
            model_files["mlp"],
            "strict",
            precision="fp16",
            tolerance='{"max_abs_error": 0}',
            progressive="false",
        )
        assert wait_for_state(client, "strict")["error"]["type"] == "accuracy_rejected"
    browser.get(server.url + "/#/engines/strict")
    callout = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, "#report .callout.error"), what="the error"
    )
    assert "outside tolerance" in callout.text
    table = browser.find_element(By.ID, "accuracy-table")
    assert "≤ 0" in table.text and "✕ fail" in table.text  # the rule that failed, in words
    assert "failed" in text(browser, 'tr[data-version="1"] .state')


@pytest.fixture
def load(server: ServerProcess) -> Iterator[Callable[[str], None]]:
    """Sends predictions to an engine from a background thread until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(engine: str) -> None:
        def run() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not stop.is_set():
                    client.post("/predict", json={"engine": engine, "inputs": {"x": [[0.5] * 16]}})

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


def test_live_request_rate_rises_under_load(
    server: ServerProcess, browser: Any, model_files: dict[str, Path], load: Callable[[str], None]
) -> None:
    ready_engine(server, model_files["mlp"], "busy")
    browser.get(server.url + "/#/engines/busy")
    wait_until(lambda: live_value(browser, "live-rps") == 0, what="an idle rate of 0")
    load("busy")
    wait_until(lambda: (live_value(browser, "live-rps") or 0) > 0, timeout_s=20, what="a rate above 0")
    assert browser.find_elements(By.CSS_SELECTOR, "#live-rps canvas")
    wait_until(lambda: (live_value(browser, "live-latency") or 0) > 0, what="a latency above 0")


def test_with_keys_the_page_needs_one(
    keyed_server: ServerProcess, browser: Any, model_files: dict[str, Path]
) -> None:
    ready_engine(keyed_server, model_files["mlp"], "secret-engine")
    browser.get(keyed_server.url + "/")
    prompt = wait_until(lambda: browser.find_element(By.ID, "key-required"), what="the key prompt")
    wait_until(prompt.is_displayed, what="the key prompt to show")
    assert "needs an API key" in prompt.text
    assert "secret-engine" not in browser.page_source
    assert httpx.get(keyed_server.url + "/ui/api/overview").status_code == 401

    # Uploading without a key fails with the API's own message.
    browser.find_element(By.ID, "open-upload").click()
    browser.find_element(By.ID, "upload-model").send_keys(str(model_files["mlp"]))
    browser.find_element(By.ID, "upload-submit").click()
    status = wait_until(
        lambda: text(browser, "#upload-status") if "refused" in text(browser, "#upload-status") else None,
        what="the refusal",
    )
    assert "401" in status and "this endpoint needs an API key" in status
    browser.find_element(By.ID, "upload-cancel").click()

    # A wrong key is refused; the right one shows the engines and stays in this tab only.
    browser.find_element(By.ID, "key-required-input").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "#key-required-form button").click()
    wait_until(lambda: "not valid" in text(browser, "#key-required-message"), what="the 403 message")
    browser.find_element(By.ID, "key-required-input").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-required-form button").click()
    wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-engine="secret-engine"]'), what="engines"
    )
    assert not browser.find_element(By.ID, "key-required").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('kiln.apiKey')") == KEY
    assert browser.execute_script("return localStorage.length") == 0


def test_delete_asks_for_confirmation_and_removes_the_engine(
    server: ServerProcess, browser: Any, model_files: dict[str, Path]
) -> None:
    ready_engine(server, model_files["mlp"], "doomed")
    browser.get(server.url + "/#/engines/doomed")
    wait_until(lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-version="1"]'), what="the versions")
    dialog = browser.find_element(By.ID, "confirm-dialog")

    browser.find_element(By.ID, "delete-engine").click()
    wait_until(dialog.is_displayed, what="the confirmation")
    assert "doomed" in dialog.text and "cannot be undone" in dialog.text
    browser.find_element(By.ID, "confirm-cancel").click()
    wait_until(lambda: not dialog.is_displayed(), what="the dialog to close")
    assert httpx.get(f"{server.url}/engines/doomed").status_code == 200

    # Deleting one version asks too, and leaves the others.
    with server.client() as client:
        upload(client, model_files["mlp"], "doomed")
        wait_for_state(client, "doomed", 2)
    row = wait_until(lambda: browser.find_element(By.CSS_SELECTOR, 'tr[data-version="2"]'), what="version 2")
    row.find_element(By.TAG_NAME, "button").click()
    wait_until(dialog.is_displayed, what="the confirmation")
    assert "doomed version 2" in dialog.text
    browser.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, 'tr[data-version="2"]'), what="v2 to go")
    assert [v["version"] for v in httpx.get(f"{server.url}/engines/doomed").json()["versions"]] == [1]

    browser.find_element(By.ID, "delete-engine").click()
    wait_until(dialog.is_displayed, what="the confirmation")
    browser.find_element(By.ID, "confirm-ok").click()
    wait_until(lambda: browser.current_url.endswith("#/"), what="the overview")
    assert "Deleted engine doomed" in text(browser, "#banner")
    assert httpx.get(f"{server.url}/engines/doomed").status_code == 404
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#engines-table tbody tr"), what="the table")
    assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-engine="doomed"]')


def test_docs_work_offline(server: ServerProcess, browser: Any) -> None:
    browser.get(server.url + "/docs")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"), what="Swagger UI")
    assert "/engines" in browser.find_element(By.ID, "swagger-ui").text
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(server.url) for url in resources), resources
    assert console_errors(browser) == []
