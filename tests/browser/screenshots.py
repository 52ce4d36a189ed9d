"""Screenshots of the page for the docs: ``python -m tests.browser.screenshots docs/images``.

Starts a real server on a fresh store, builds a few small engines, sends traffic for
a while so the live charts have something to show, and photographs the main views on
a desktop and a phone-sized screen.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from selenium.webdriver.common.by import By

from tests import models
from tests.browser.conftest import DESKTOP, NARROW, _driver, wait_until
from tests.conftest import upload, wait_for_state
from tests.e2e.server import ServerProcess

TRAFFIC_S = 40


def _traffic(url: str, engine: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            rows = [[0.1 * (i % 7)] * 16 for i in range(1 + int(time.monotonic()) % 4)]
            client.post("/predict", json={"engine": engine, "inputs": {"x": rows}})


def _shoot(driver: Any, url: str, path: Path, size: tuple[int, int], ready: str, full: bool = True) -> None:
    driver.set_window_size(*size)
    driver.get(url)
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, ready), what=ready)
    time.sleep(2.5)  # one more poll, and the charts' first draw
    if full:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size[0], max(size[1], height))
        time.sleep(0.5)
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        mlp = models.mlp(root / "models" / "fraud-mlp.onnx")
        cnn = models.cnn(root / "models" / "digits-cnn.onnx")
        with ServerProcess(root / "store") as server, server.client() as client:
            upload(client, mlp, "fraud-scorer", precision="auto", calibration="synthetic", max_batch_size="8")
            upload(client, cnn, "digits-cnn", precision="fp16")
            for name in ("fraud-scorer", "digits-cnn"):
                wait_for_state(client, name, timeout_s=180)
            # Version 2 in INT8, so the report shown has an accuracy table whatever auto chose for v1.
            upload(client, mlp, "fraud-scorer", precision="int8", calibration="synthetic", max_batch_size="8")
            wait_for_state(client, "fraud-scorer", 2, timeout_s=180)
            stop = threading.Event()
            workers = [
                threading.Thread(target=_traffic, args=(server.url, "fraud-scorer", stop)) for _ in range(3)
            ]
            for worker in workers:
                worker.start()
            time.sleep(TRAFFIC_S)
            # A second version starts building, so the overview shows a build in progress.
            upload(client, cnn, "digits-cnn", precision="auto", calibration="synthetic")
            driver = _driver(root / "profile", DESKTOP)
            try:
                _shoot(driver, server.url + "/", out / "overview-desktop.png", DESKTOP, "tr[data-engine]")
                engine = server.url + "/#/engines/fraud-scorer"
                _shoot(driver, engine, out / "engine-desktop.png", DESKTOP, "#latency-chart canvas")
                _shoot(driver, server.url + "/", out / "overview-narrow.png", NARROW, "tr[data-engine]")
                phone = (NARROW[0], 1400)
                _shoot(driver, engine, out / "engine-narrow.png", phone, "#live-rps canvas", full=False)
            finally:
                stop.set()
                driver.quit()
                for worker in workers:
                    worker.join(10)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
