# Two entry points, each installing what it needs the first time:
#   make train [ARGS="hydra overrides"]   the quickstart (or any run)
#   make test                             the test suite
#   make lint                             ruff, as CI runs it
# TORCH picks the torch build: the default pin is the CPU wheel on a CPU box and the usual CUDA
# build on a GPU box; set TORCH=torch (or a CUDA index) to choose yourself.
#   make composer-env / make test-composer   MosaicML Composer's own environment (torch 2.7) and its tests
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: train test lint install install-dev bench clean composer-env test-composer gpu-check

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

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it after the tests.
lint: $(VENV)/.dev
	$(BIN)/ruff check .

# One prepared GPU check (benchmarks/gpu_check.py): environment, bf16 matmul ceiling, attention
# correctness and timings, training throughput, the GPU tests and the memory estimate, each stage in
# its own process under its own time limit, 9 minutes in all. Writes summary.md, gpu_check.json and
# gpu_check.log under $OUT (else runs/gpu-check). Needs only a Python with torch: a bare GPU machine
# has no .venv, so plain python3 runs it there.
# ONLY="stage ..." reruns named stages, e.g. the second call of a GPU session: make gpu-check ONLY="env float8"
# (float8 against bf16 is outside the default budget).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py --out "$(or $(OUT),runs/gpu-check)" $(if $(ONLY),--only $(ONLY))

# MosaicML Composer 0.32 (its last release) needs torch >= 2.6, < 2.7.1 and torchvision, so it
# gets its own environment, which also holds llm-foundry 0.22.0 (the latest release), the reference
# of the interop tests. llm-foundry's resolver backtracks for more than ten minutes, so it and
# mosaicml-streaming install without their dependencies, next to the ones its MPT imports; its
# transformers pin (< 4.52) is why this environment takes pytest alone, not our dev extra. The stamp
# names the pins and pyproject.toml's hash: an environment kept between runs (COMPOSER_VENV outside
# the checkout, as .ci/run does) is reused until one changes.
COMPOSER_VENV ?= .venv-composer
COMPOSER_TORCH ?= torch==2.7.0
FOUNDRY_NO_DEPS := llm-foundry==0.22.0 mosaicml-streaming==0.12.*
FOUNDRY_DEPS := transformers>=4.51,<4.52 einops==0.8.1 omegaconf accelerate<1.9 huggingface-hub<0.34 catalogue \
	Brotli python-snappy zstd xxhash GitPython mlflow<3 datasets<3.7 tenacity beautifulsoup4
CBIN := $(COMPOSER_VENV)/bin
PINS_HASH := $(shell echo '$(COMPOSER_TORCH) $(FOUNDRY_NO_DEPS) $(FOUNDRY_DEPS)' | cat - pyproject.toml | sha256sum | cut -c1-12)
COMPOSER_STAMP := $(COMPOSER_VENV)/.stamp-$(subst ==,-,$(COMPOSER_TORCH))-$(PINS_HASH)

$(CBIN)/python:
	$(PYTHON) -m venv $(COMPOSER_VENV)

$(COMPOSER_STAMP): | $(CBIN)/python
	$(CBIN)/pip install -q "$(COMPOSER_TORCH)"
	$(CBIN)/pip install -q -e ".[composer,wandb]" "pytest>=8"
	$(CBIN)/pip install -q $(foreach p,$(FOUNDRY_DEPS),"$(p)")
	$(CBIN)/pip install -q --no-deps $(foreach p,$(FOUNDRY_NO_DEPS),"$(p)")
	rm -f $(COMPOSER_VENV)/.stamp-*
	touch $@

composer-env: $(COMPOSER_STAMP)
	@# A reused environment may point at another checkout: re-link this one (seconds, no downloads).
	$(CBIN)/pip install -q --no-deps -e .

# The Composer backend's tests and the tests against llm-foundry 0.22 (tests/foundry).
test-composer: composer-env
	$(CBIN)/python -m pytest -q -m "composer or foundry" tests/composer_backend tests/foundry

clean:
	rm -rf $(VENV) $(COMPOSER_VENV) runs data
