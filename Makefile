PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint install compile bench bench-quick bench-soak bench-rss clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The proxy's hot modules compiled with Cython (setup.py, greyproxy/compiled.py). An edited module
# runs as Python, never as its stale compiled file, until this compiles it again (only the modules
# whose source changed are compiled). GREYPROXY_COMPILE=0 at install: pure Python throughout.
compile: $(STAMP)
	$(PY) -m pip install -q --no-deps -e .

serve: $(STAMP)
	$(VENV)/bin/greyproxy serve $(ARGS)

# The suite in PYTEST_WORKERS pytest-xdist processes, a test file to a worker (a module's stack
# fixture is started once); PYTEST_WORKERS=0 runs it in this process. The browser tests then run
# on their own (a real Chromium beside a second worker's stack missed 30 s click deadlines). Exit
# status 5 is pytest's "nothing collected" (PYTEST_ARGS that select only one half).
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --ignore=tests/browser $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -q tests/browser $(PYTEST_ARGS) || [ $$? -eq 5 ]

# ruff (lint, then the formatter's check) and mypy over the packages; settings in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check greyproxy bus services tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff format --check greyproxy bus services tests bench

bench: compile
	$(PY) bench/run.py --workers 1,2

bench-quick: compile
	$(PY) bench/run.py --quick --workers 1,2

bench-soak: $(STAMP)
	$(PY) bench/soak.py --results-md bench/results.md

bench-rss: $(STAMP)
	$(PY) bench/idle_rss.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache greyproxy/_compiled
