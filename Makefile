# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck pytest system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEVSTAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

demo: $(STAMP)
	$(BIN)/ceremony demo

# System packages the tests need (browser for the dashboard test, PostgreSQL for the
# any-SQLAlchemy-URL test, docker.io and debootstrap for the container image test).
# Installed only when absent and only when we are root;
# otherwise the tests that need them skip with a message saying why.
system-deps:
	@scripts/install_system_deps.sh

lint: $(DEVSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEVSTAMP)
	$(BIN)/mypy

# Two workers, one test file each at a time (--dist loadfile: a file's module fixtures, such
# as a federation of peer processes, are built once). Most network tests wait on deadlines
# rather than compute, so two workers fit a 2-core machine: the whole suite took 15.5 min on
# two workers against 25.3 min on one, side by side on a quiet 2-core machine (CI's one-worker
# run took 54.5 min with the install). The slowest tests are listed at the end (--durations).
pytest: $(DEVSTAMP)
	$(BIN)/pytest -n 2 --dist loadfile --durations=15

test: $(DEVSTAMP) system-deps lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
