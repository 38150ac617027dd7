#!/usr/bin/env bash
# Install xpuflow into ./.venv with the given extras (default: all), at the versions locked in
# requirements/lock.txt (the ones the test suite passed with). Idempotent; safe to re-run.
#   bash scripts/setup.sh            # runtime: every backend and the bundled models
#   bash scripts/setup.sh all,dev    # plus the test and lint tools
# XPUFLOW_VENV=path installs into another venv; XPUFLOW_UNLOCKED=1 skips the lock (scripts/upgrade_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
venv="${XPUFLOW_VENV:-.venv}"
pip_version="26.3"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "pip==${pip_version}"
if [ "${XPUFLOW_UNLOCKED:-0}" = 1 ]; then
  lock=()
else
  # Constraints, not requirements: only what the extras need is installed, each at its locked version
  # (the lock is universal, so a CUDA-only package listed for Linux is never pulled in by it).
  lock=(--constraint requirements/lock.txt --build-constraint requirements/build-lock.txt)
fi
# llama-cpp-python compiles from source; use both cores, and let pip cache the wheel it builds.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$venv/bin/python" -m pip install --quiet "${lock[@]}" -e ".[${extras}]"
