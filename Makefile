# One-command entry points. Everything installs into .venv from pinned requirements.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup serve test test-slow bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml scripts/setup_triton.sh
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	bash scripts/setup_triton.sh $(VPY)
	touch $(STAMP)

serve: setup
	bash scripts/serve.sh

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(VPY) -m pytest -m slow $(PYTEST_ARGS)

bench: setup
	$(VPY) bench/bench_cpu.py

lint: setup
	$(VPY) -m pip install -q ruff==0.17.6
	$(VENV)/bin/ruff check runtime_lib model_repository client tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
