# Quick start: `make demo` (set up + run the demo report), `make test` (set up + lint, type check, tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.polyak-installed
LINTED := $(wildcard src tests benchmarks examples)
# Peers for differential tests: installed with --no-deps so that none of them can pull another torch.
PEERS  := ema-pytorch==0.8.3 torch-ema==0.3 timm==1.0.31 ultralytics==8.4.190

.PHONY: venv demo test lint typecheck pytest clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(PEERS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polyak demo --out reports/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) reports .mypy_cache .ruff_cache .pytest_cache
