#!/usr/bin/env bash
# Wheels the GPU machine lacks for the GPU tests that train (hydra-core, omegaconf and antlr4, Hydra's
# parser) and for float8 training (torchao), fetched here into .whl/ (git-ignored) at the versions this
# checkout's .venv uses. Carry .whl to the GPU machine (the device tool's `carry`); benchmarks/gpu_check.py
# installs them there into a temporary folder when hydra does not import. The first three are pure Python;
# torchao's wheel is for Linux x86-64 and any CPython >= 3.10 (abi3): its float8 training is Python over
# torch._scaled_mm, so it works with the GPU machine's torch (2.11) even where its C++ extensions do not load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
# For the GPU machine's platform, not this one's; TORCHAO_VERSION overrides the .venv's version.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d .whl "torchao==${TORCHAO_VERSION:-$(version torchao)}"
# antlr4-python3-runtime 4.9.3 is published as source only: build its wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
