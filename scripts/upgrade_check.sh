#!/usr/bin/env bash
# Try the newest versions that pyproject.toml allows, in a separate venv, and run the whole suite there.
# An upgrade is a deliberate change: if this passes, refresh the lock (docs/dependencies.md) and commit it.
#   bash scripts/upgrade_check.sh [pytest args...]
# Not part of CI. The venv lives in .venv-upgrade (re-created each run).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-upgrade
rm -rf "$venv"
XPUFLOW_VENV="$venv" XPUFLOW_UNLOCKED=1 bash scripts/setup.sh all,dev,ray  # what scripts/test.sh installs
"$venv/bin/python" -m pip freeze --exclude-editable > "$venv/resolved.txt"
echo "resolved versions: $venv/resolved.txt"
# What would move against the lock (name==version pairs that differ).
"$venv/bin/python" - "$venv/resolved.txt" <<'PY' || true
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;]+)\s*(;.*)?$", line.strip())
        if m:
            out.setdefault(m.group(1).lower().replace("_", "-"), set()).add(m.group(2))
    return out
lock, now = pins("requirements/lock.txt"), pins(sys.argv[1])
moved = sorted(f"{n}: {'/'.join(sorted(lock[n]))} -> {v}" for n, vs in now.items() for v in vs if n in lock and v not in lock[n])
print("\n".join(["versions that differ from the lock:", *moved] if moved else ["every version equals the lock"]))
PY
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/python" -m pytest -q "$@"
