"""Does watching the web page slow serving? The tiny MLP under hey, with and without
open pages polling their JSON views.

Each simulated page asks for the overview and the engine view every ``POLL_S``
seconds, as the page does while visible (two more hey processes, so the pages cost
little client CPU on a small machine); runs alternate between no pages and
``--pages`` pages, and medians are reported with the server's CPU time per
prediction. Needs `hey` (Debian package).

    .venv/bin/python benchmarks/ui_polling.py [--runs 3] [--seconds 8] [--pages 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from benchmarks.common import hey, median, start_kiln, upload
from service.ui.views import POLL_S
from tests.models import mlp

ROW = [round(0.1 * i, 1) for i in range(16)]


def start_pages(url: str, pages: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """``pages`` clients per view, each asking once every POLL_S seconds."""
    return [
        subprocess.Popen(
            ["hey", "-z", f"{seconds}s", "-c", str(pages), "-q", str(1 / POLL_S), f"{url}{path}"],
            stdout=subprocess.DEVNULL,
        )
        for path in ("/ui/api/overview", "/ui/api/engines/tiny")
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pages", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    body = work / "kiln.json"
    body.write_text(json.dumps({"engine": "tiny", "inputs": [ROW]}))
    kiln = start_kiln(work / "store")
    upload(kiln, mlp(work / "tiny.onnx", 16, 32, 4), "tiny", max_batch_size=8)
    results: dict[str, list[dict[str, float]]] = {"no page": [], f"{args.pages} pages": []}
    try:
        for _ in range(args.runs):
            for name, pages in (("no page", 0), (f"{args.pages} pages", args.pages)):
                pollers = start_pages(kiln.url, pages, args.seconds) if pages else []
                cpu_before = kiln.cpu_seconds()
                run = hey(f"{kiln.url}/predict", body, seconds=args.seconds, concurrency=args.concurrency)
                run["cpu_us_per_request"] = (kiln.cpu_seconds() - cpu_before) / max(run["ok"], 1) * 1e6
                for poller in pollers:
                    poller.wait()
                results[name].append(run)
    finally:
        kiln.stop()
    print(f"{'':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}")
    for name, runs in results.items():
        row = [median([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")]
        print(f"{name:>10} {row[0]:>8.0f} {row[1]:>8.2f} {row[2]:>8.2f} {row[3]:>11.0f}")


if __name__ == "__main__":
    main()
