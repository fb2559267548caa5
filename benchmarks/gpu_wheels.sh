#!/usr/bin/env bash
# Wheels the GPU machine lacks for the GPU tests that train (hydra-core, omegaconf and antlr4, Hydra's
# parser), fetched here into .whl/ (git-ignored) at the versions this checkout's .venv uses. Carry
# .whl to the GPU machine (the device tool's `carry`); benchmarks/gpu_check.py installs them there
# into a temporary folder when hydra does not import. All three are pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
# antlr4-python3-runtime 4.9.3 is published as source only: build its wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
