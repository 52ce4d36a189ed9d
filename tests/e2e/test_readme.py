"""The README's walkthrough, run as written.

A directory laid out like a fresh clone (the Makefile, ``examples/make_example.py``,
``.venv`` linking to this environment) gets its server from ``make serve`` itself, so
the server has ``make serve``'s settings, relative ``--store data/store`` included;
only its install step is skipped. Every shell block of the README then runs in that
directory through bash, as pasted into a terminal, with one substitution: the
addresses ``127.0.0.1:8000`` and ``127.0.0.1:8001`` become free ports. Each command's
output is checked against what the README says it shows.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
STEP_TIMEOUT_S = 120.0

NOT_RUN = {
    "Two commands": "make serve is how the server starts here; make test is this suite",
}
"""README sections whose blocks the walkthrough does not paste, and why."""


@dataclass
class Step:
    """One command of a README block (consecutive lines that are not comments) and the
    output the README shows for it: the comment lines right after it that start with
    ``{`` or ``[``."""

    command: str
    shown: list[str] = field(default_factory=list)


@dataclass
class Block:
    section: str
    language: str
    text: str

    def steps(self) -> list[Step]:
        steps: list[Step] = []
        lines: list[str] = []
        showing = False  # comment lines still follow a command directly
        for line in [*self.text.splitlines(), ""]:
            comment = line.strip().removeprefix("#").strip() if line.lstrip().startswith("#") else None
            if line.strip() and comment is None:
                lines.append(line)
                continue
            if lines:
                steps.append(Step("\n".join(lines)))
                lines, showing = [], True
            showing = showing and comment is not None and comment.startswith(("{", "["))
            if showing and comment is not None:
                steps[-1].shown.append(comment)
        return steps


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    section = ""
    fence = re.compile(r"^```(\w*)$")
    language: str | None = None
    body: list[str] = []
    for line in README.read_text().splitlines():
        if language is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif match := fence.match(line):
                language, body = match.group(1), []
        elif line == "```":
            blocks.append(Block(section, language, "\n".join(body)))
            language = None
        else:
            body.append(line)
    return [b for b in blocks if b.language in ("bash", "sh", "python")]


def shown_pattern(shown: str) -> re.Pattern[str]:
    """What the README shows, with each ``...`` (or ``...words...``) standing for anything."""
    return re.compile(".*".join(re.escape(part) for part in re.split(r"\.\.\.(?:[\w ]+\.\.\.)?", shown)))


def assert_shows(output: str, shown: str) -> None:
    assert shown_pattern(shown).fullmatch(output.strip()), (
        f"the README shows\n  {shown}\nbut it printed\n  {output}"
    )


class Clone:
    """A directory laid out like a fresh clone, with ``make serve`` running in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.grpc_port = free_port()
        # A user's shell: none of the suite's KILN_* settings, nor make test's own make flags.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KILN_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
        }
        self.env["KILN_GRPC_PORT"] = str(self.grpc_port)  # 8001 is shared; the blocks get this port
        self.log = root / "serve.log"
        self.server: subprocess.Popen[bytes] | None = None
        (root / "examples").mkdir(parents=True)
        shutil.copy(REPO / "Makefile", root / "Makefile")
        shutil.copy(REPO / "examples" / "make_example.py", root / "examples" / "make_example.py")
        (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        assert (root / ".venv" / "bin" / "kiln").exists(), "kiln is not installed in this environment"

    def serve(self, timeout_s: float = 60.0) -> None:
        """``make serve`` on a free port; ``-o install``: this environment is installed."""
        with self.log.open("ab") as log:
            self.server = subprocess.Popen(
                ["make", "--no-print-directory", "-o", "install", "serve", f"PORT={self.port}"],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.server.poll() is None, f"make serve exited:\n{self.log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"make serve not ready in {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Ctrl-C in make serve's terminal; returns once the store's lock is free."""
        if self.server is None or self.server.poll() is not None:
            return
        os.killpg(self.server.pid, signal.SIGINT)
        try:
            self.server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait(10)
        lock = self.root / "data" / "store" / "kiln.lock"
        deadline = time.monotonic() + 60
        with lock.open("a") as handle:  # the server exits with make, or soon after
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"the server still holds its store:\n{self.tail()}"
                    time.sleep(0.1)
            fcntl.flock(handle, fcntl.LOCK_UN)

    def address(self, text: str) -> str:
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}").replace(
            "127.0.0.1:8001", f"127.0.0.1:{self.grpc_port}"
        )

    def run(self, step: Step, language: str = "bash") -> subprocess.CompletedProcess[str]:
        """Paste ``step`` into a terminal in the clone: bash without -e or pipefail."""
        command = self.address(step.command)
        assert not re.search(r":800[01]\b", command), (
            f"a README address is not 127.0.0.1:8000/8001:\n{command}"
        )
        argv = ["bash", "-c", command] if language != "python" else [".venv/bin/python", "-c", command]
        try:
            return subprocess.run(
                argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"README step did not finish in {STEP_TIMEOUT_S} s:\n{command}\n{self.tail()}"
            ) from exc

    def run_ok(self, step: Step, language: str = "bash") -> str:
        done = self.run(step, language)
        assert done.returncode == 0, f"README step failed ({done.returncode}):\n{step.command}\n{done.stderr}"
        return done.stdout

    def tail(self) -> str:
        return "server log:\n" + "\n".join(self.log.read_text().splitlines()[-40:])


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Clone]:
    if shutil.which("curl") is None:
        pytest.skip("the README's walkthrough needs curl")
    clone = Clone(tmp_path / "kiln")
    try:
        yield clone
    finally:
        clone.stop()


# -- what each step shows ---------------------------------------------------------------


def _upload(step: Step, out: str, clone: Clone) -> None:
    """An upload answers at once: the new version, building."""
    status = json.loads(out)
    assert status["state"] == "building" and status["version"] == 1, out
    if step.shown:
        assert_shows(out, step.shown[0])


def _summaries(step: Step, out: str, clone: Clone) -> None:
    """The wait loop ends, and each engine's summary line is what the README shows:
    for reduced precision, the precision that was asked for serves."""
    lines = out.strip().splitlines()
    assert step.shown and len(lines) == len(step.shown), f"the README shows {step.shown}, it printed:\n{out}"
    for line, shown in zip(lines, step.shown, strict=True):
        assert_shows(line, shown)
        summary = json.loads(line)
        assert summary["error"] is None, f"{summary}\n{clone.tail()}"


def _status(step: Step, out: str, clone: Clone) -> None:
    """The whole status, with the build report."""
    status = json.loads(out)
    assert status["state"] == "ready" and status["report"]["candidates"], out[:2000]


def _predict(step: Step, out: str, clone: Clone) -> None:
    assert_shows(out, step.shown[0])
    probs = json.loads(out)["outputs"]["probs"]
    assert len(probs) == 1 and len(probs[0]) == 4 and abs(sum(probs[0]) - 1) < 1e-4, out


def _v2_infer(step: Step, out: str, clone: Clone) -> None:
    (output,) = json.loads(out)["outputs"]
    assert output["name"] == "probs" and output["shape"] == [1, 4] and len(output["data"]) == 4, out


def _metrics(step: Step, out: str, clone: Clone) -> None:
    """The requests just made are counted, and their batch sizes."""
    counted = {
        line.split("{")[0]: float(line.split()[-1])
        for line in out.splitlines()
        if 'engine="mlp"' in line and 'version="1"' in line
    }
    assert counted.get("kiln_batch_size_count", 0) >= 2, out
    requests = [
        float(line.split()[-1]) for line in out.splitlines() if line.startswith("kiln_requests_total")
    ]
    assert sum(requests) >= 2, out


def _calibrate_and_upload_int8(step: Step, out: str, clone: Clone) -> None:
    assert (clone.root / "data" / "calib.npz").is_file()
    _upload(step, out, clone)


CHECKS: dict[str, Callable[[Step, str, Clone], None]] = {
    "-F name=mlp http": _upload,
    "-F name=mlp16 -F precision=fp16": _upload,
    "-F precision=int8": _calibrate_and_upload_int8,
    "until curl": _summaries,
    "json.tool": _status,
    "/predict": _predict,
    "/v2/models/mlp/infer": _v2_infer,
    "/metrics": _metrics,
}
"""Each README command by a piece of its text, and what it shows."""


def check(step: Step, out: str, clone: Clone) -> None:
    matched = [name for name in CHECKS if name in step.command]
    assert len(matched) == 1, f"no single check for this README step ({matched}):\n{step.command}"
    CHECKS[matched[0]](step, out, clone)


def test_the_readme_walkthrough_as_written(clone: Clone) -> None:
    blocks = readme_blocks()
    sections = {b.section for b in blocks}
    assert {"Walkthrough", "Reduced precision", "Python clients", "Offline builds and load tests"} | set(
        NOT_RUN
    ) == sections, f"a README section with commands has no place here: {sorted(sections)}"
    clone.serve()
    assert "--store data/store" in clone.log.read_text(), "make serve no longer passes the relative store"

    for block in blocks:
        if block.section in ("Walkthrough", "Reduced precision"):
            for step in block.steps():
                check(step, clone.run_ok(step), clone)

    (python,) = [b for b in blocks if b.section == "Python clients"]
    out = clone.run_ok(Step(python.text), "python")
    arrays = re.findall(r"\[\[[^\]]*\]\s*\[[^\]]*\]\]", out)
    assert len(arrays) == 2, f"two predictions of 2 rows expected (HTTP, gRPC):\n{out}"

    (offline,) = [b for b in blocks if b.section == "Offline builds and load tests"]
    build, bench = offline.steps()
    assert "kiln build" in build.command and "kiln bench" in bench.command
    # "kiln build refuses (exit 2) while a server runs on it"
    refused = clone.run(build)
    assert refused.returncode == 2 and "kiln: " in refused.stderr, refused
    clone.stop()
    summary = json.loads(clone.run_ok(build).split("\n", 1)[1])  # after the "backend: ..." line
    assert summary["name"] == "mlp-offline" and summary["version"] == 1, summary
    # "a server started on that store serves it as version 1 of mlp-offline without rebuilding"
    clone.serve()
    with httpx.Client(base_url=f"http://127.0.0.1:{clone.port}", timeout=10) as client:
        status = client.get("/engines/mlp-offline").json()
        assert status["version"] == 1 and status["state"] == "ready", status
        assert 'kiln_engine_builds_total{result="succeeded"} 0.0' in client.get("/metrics").text
    out = clone.run_ok(bench)  # exits 1 unless every request answered 200
    assert re.match(r"[1-9]\d* requests in [\d.]+ s: [\d.]+ req/s", out), out
