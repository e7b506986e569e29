#!/usr/bin/env bash
# Lint, format check and the whole test suite (unit tests on tiny models + SmolLM2 integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
