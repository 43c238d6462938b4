# Quick start: `make demo` (torch + polyak[experiments], then the demo report), `make test` (everything the
# tests need, then lint, type check, tests, the documentation build). `make package` builds and checks the
# wheel and sdist and smoke-tests the wheel in a clean virtual environment; `make ci` is test + package.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
BASE   := $(VENV)/.polyak-base
DEMO   := $(VENV)/.polyak-demo
STAMP  := $(VENV)/.polyak-installed
SMOKE  := build/smoke-venv
LINTED := $(wildcard src tests benchmarks examples docs/scripts)
# Peers for differential tests: installed with --no-deps so that none of them can pull another torch.
PEERS  := ema-pytorch==0.8.3 torch-ema==0.3 timm==1.0.31 ultralytics==8.4.190 diffusers==0.42.1

.PHONY: venv demo test lint typecheck pytest docs docs-plots package ci clean

venv: $(STAMP)

# torch first, pinned, so that nothing later can pull another build of it. --no-compile: Python compiles
# what it imports on first use, instead of every file of torch and the extras at install time.
$(BASE):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH)
	touch $(BASE)

$(DEMO): $(BASE) pyproject.toml
	$(PY) -m pip install -q --no-compile -e '.[experiments]'
	touch $(DEMO)

$(STAMP): $(BASE) pyproject.toml Makefile
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m pip install -q --no-compile --no-deps $(PEERS)
	touch $(STAMP)

demo: $(DEMO)
	$(VENV)/bin/polyak demo --out reports/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# The schedule plots on docs/schedules.md are generated, never drawn by hand.
docs-plots: $(STAMP)
	$(PY) docs/scripts/plot_schedules.py --out docs/img

test: lint typecheck pytest docs

package: $(STAMP)
	rm -rf dist $(SMOKE)
	$(PY) -m build --outdir dist . > build-log.txt 2>&1 || (cat build-log.txt; exit 1)
	rm -f build-log.txt
	$(VENV)/bin/twine check --strict dist/*
	$(PYTHON) -m venv $(SMOKE)
	$(SMOKE)/bin/python -m pip install -q --no-compile $(TORCH)
	$(SMOKE)/bin/python -m pip install -q --no-compile dist/*.whl
	cd build && ../$(SMOKE)/bin/python ../.ci/smoke.py

ci: test package

clean:
	rm -rf $(VENV) reports build dist site .mypy_cache .ruff_cache .pytest_cache
