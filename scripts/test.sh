#!/usr/bin/env bash
# Install everything the tests need (locked versions, requirements/lock.txt), check lint, format and
# types, then run the whole test suite. Any finding fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages the tests use: a C compiler (the reference NPU stack) and Chromium (dashboard tests).
if ! command -v chromium >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium gcc >/dev/null
  else
    echo "note: install chromium and a C compiler for the browser and native-stack tests" >&2
  fi
fi
bash scripts/setup.sh all,dev,ray
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
