# The README's two commands. Each creates .venv on its own, installs the CPU
# torch wheel first (an unpinned torch would pull a multi-GB CUDA build), then
# the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CONFIG ?= configs/demo.yaml
# WikiText-2 raw on these machines; elsewhere set HH_DATA_DIR or let the hub serve it.
HH_DATA_DIR ?= $(wildcard $(abspath ../shared/data/wikitext-2-raw))
export HH_DATA_DIR

.PHONY: demo test install

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) train.py fit --config $(CONFIG)

test: install
	$(PY) -m pytest -q
