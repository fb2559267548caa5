# Two entry points, each installing what it needs the first time:
#   make train [ARGS="hydra overrides"]   the quickstart (or any run)
#   make test                             the test suite
# TORCH picks the torch build: the default pin is the CPU wheel on a CPU box and the usual CUDA
# build on a GPU box; set TORCH=torch (or a CUDA index) to choose yourself.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: train test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

train: $(VENV)/.core
	$(BIN)/mptlike-train $(ARGS)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q -x tests

clean:
	rm -rf $(VENV) runs data
