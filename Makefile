# One entry point for every task; .ci/run calls `make check`.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
UV ?= $(shell command -v uv 2>/dev/null || echo .bootstrap/bin/uv)
RUN := $(UV) run --frozen

.PHONY: install format lint typecheck test soak demo bench check wheel-test schemas clean

$(UV):
	python3 -m venv .bootstrap && .bootstrap/bin/pip install --quiet 'uv==0.13.9'

install: $(UV)  ## create .venv with every dev dependency, exactly as locked
	$(UV) sync --frozen

format: install
	$(RUN) ruff format src tests benchmarks
	$(RUN) ruff check --fix src tests benchmarks

lint: install
	$(RUN) ruff format --check src tests benchmarks
	$(RUN) ruff check src tests benchmarks
	$(RUN) lint-imports
	$(RUN) codespell src tests docs README.md

typecheck: install
	$(RUN) mypy
	$(RUN) basedpyright tests/typing

test: install  ## every test, with the bounded chaos tests; slow soaks are `make soak`
	$(RUN) pytest -m "not slow" -p no:cacheprovider

soak: install
	$(RUN) pytest -m slow -p no:cacheprovider

schemas: install  ## regenerate the published JSON Schemas in src/tether/schemas/
	$(RUN) python -m tether.schemas

demo: install  ## run the built-in cloud-ops incident end to end
	$(RUN) tether demo

bench: $(UV)  ## the call-path, policy, limits, replay, breakdown, floor and PostgreSQL benchmarks (bare SQLite, LangGraph, DBOS, Cedar)
	$(UV) sync --frozen --group bench
	$(RUN) --group bench python benchmarks/call_path.py
	$(RUN) --group bench python benchmarks/policy.py
	$(RUN) --group bench python benchmarks/limits.py
	$(RUN) --group bench python benchmarks/replay.py
	$(RUN) --group bench python benchmarks/breakdown.py
	$(RUN) --group bench python benchmarks/floor.py
	$(RUN) --group bench python benchmarks/postgres.py

wheel-test: install  ## build the wheel, install it in a fresh venv, run the demo and CLI tests
	rm -rf dist .wheel-venv
	$(UV) build --wheel --quiet
	$(UV) venv --quiet .wheel-venv
	$(UV) pip install --quiet --python .wheel-venv/bin/python dist/*.whl
	cd /tmp && $(CURDIR)/.wheel-venv/bin/tether demo --db memory:// > /dev/null
	TETHER_CLI=$(CURDIR)/.wheel-venv/bin/tether $(RUN) pytest -p no:cacheprovider tests/test_cli.py -q

check: install lint typecheck test wheel-test  ## what CI runs

clean:
	rm -rf .venv .bootstrap .wheel-venv dist .pytest_cache .mypy_cache .ruff_cache
