"""Cached virtual environments for model servers that cannot share the project's venv.

MLServer 1.7 and kserve 0.21 pin ``protobuf<7`` while the project's venv has protobuf 7, so each runs
from a venv of its own, created once with ``python3 -m venv`` and pip, then reused::

    python = server_venv("mlserver", MLSERVER_REQUIREMENTS)   # ~/.cache/xpuflow/test-venvs/mlserver-<hash>

The folder name carries a hash of the requirements, so changing a pin builds a new venv; a file lock
keeps parallel test runs from building the same one twice; a venv is used only once its ``.complete``
marker exists (an interrupted build is redone). ``XPUFLOW_TEST_VENVS`` moves the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

MLSERVER_REQUIREMENTS = ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "scikit-learn>=1.4,<1.8")
KSERVE_REQUIREMENTS = ("kserve==0.21.0",)

#: Building a venv downloads and installs a few hundred MB; bounded so a hung index fails the run.
BUILD_TIMEOUT_S = 1800


def cache_root() -> Path:
    return Path(os.environ.get("XPUFLOW_TEST_VENVS", Path.home() / ".cache" / "xpuflow" / "test-venvs"))


def _base_python() -> str:
    # the venv's own interpreter is fine as a base, but a system python3 keeps the venv independent
    return shutil.which("python3") or sys.executable


def server_venv(name: str, requirements: tuple[str, ...]) -> Path:
    """The python of a venv holding ``requirements``, built on first use (minutes), then reused."""
    digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"{name}-{digest}"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    with FileLock(str(root / f"{name}-{digest}.lock"), timeout=BUILD_TIMEOUT_S):
        if marker.exists():
            return python
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
            check=True,
            timeout=BUILD_TIMEOUT_S,
        )
        marker.write_text("\n".join(requirements) + "\n")
    return python
