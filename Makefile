# kiln: `make serve` sets up and starts the server; `make test` sets up and runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
STORE ?= data/store

.PHONY: install browser serve test test-fast lint format example bench clean hey screenshots

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Debian's headless Chromium and its driver for the browser tests; nothing to do when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

serve: install example
	$(VENV)/bin/kiln serve --host $(HOST) --port $(PORT) --store $(STORE)

example: install examples/mlp.onnx

examples/mlp.onnx: examples/make_example.py
	$(PY) examples/make_example.py $@

# hey drives the SIGTERM-under-load test and the benchmarks (Debian package).
hey:
	@command -v hey >/dev/null || { apt-get update -qq && apt-get install -y -qq hey; } \
		|| echo "hey could not be installed: its tests skip"

test: install hey browser
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow and not deploy"

lint: install
	$(VENV)/bin/ruff check engines service tests examples benchmarks
	$(VENV)/bin/ruff format --check engines service tests examples benchmarks
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix engines service tests examples benchmarks
	$(VENV)/bin/ruff format engines service tests examples benchmarks

# The page's screenshots in docs/images/ (desktop and narrow), from a real server and browser.
screenshots: install browser
	$(PY) -m tests.browser.screenshots docs/images

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache

-include deploy/checks.mk
