"""Fixtures for the binary vendor-stack tests.

``refnpu_stack`` builds the reference stack with the host C compiler once per test session.
``spec_variant`` writes a copy of its spec with changes, for tests that need a different argv, a
shorter timeout or a debug hook. ``fake_compiler_spec`` needs no C compiler: a POSIX shell script
stands in for refnpu-compile, recording its argv and environment.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from xpuflow.vendor_ref import ReferenceStack, build_reference_stack, export_mlp, find_c_compiler

SpecVariant = Callable[[Callable[[dict[str, Any]], None]], Path]

_FAKE_COMPILER = r"""#!/bin/sh
# Stand-in for refnpu-compile: records argv (NUL-separated) and the environment, writes outputs.
if [ "$1" = "--version" ]; then echo "refnpu-compile 9.9.9"; exit 0; fi
printf '%s\0' "$@" > "$FAKE_ARGV_FILE"
env > "$FAKE_ENV_FILE"
while [ $# -gt 0 ]; do
  case "$1" in
    --output|--report) printf 'engine' > "$2"; shift 2 ;;
    *) shift ;;
  esac
done
exit "${FAKE_EXIT:-0}"
"""


@pytest.fixture(scope="session")
def refnpu_stack(tmp_path_factory: pytest.TempPathFactory) -> ReferenceStack:
    if find_c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the reference NPU stack")
    return build_reference_stack(tmp_path_factory.mktemp("refnpu"))


@pytest.fixture(scope="session")
def mlp_layers() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    widths = [12, 24, 16, 5]
    return [
        (
            (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32),
            (rng.standard_normal(n_out) * 0.1).astype(np.float32),
        )
        for n_in, n_out in itertools.pairwise(widths)
    ]


@pytest.fixture
def mlp_path(tmp_path: Path, mlp_layers: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    path = model_dir / "mlp.xpfmlp"
    export_mlp(mlp_layers, path)
    return path


def _write_variant(base: dict[str, Any], folder: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    data = copy.deepcopy(base)
    mutate(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"variant{len(list(folder.glob('variant*.yaml')))}.spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def spec_variant(refnpu_stack: ReferenceStack, tmp_path: Path) -> SpecVariant:
    """Write the reference spec, pointed at the built stack and changed by ``mutate``; return its path."""
    base = yaml.safe_load(refnpu_stack.spec.read_text())
    base["compiler"]["executable"] = str(refnpu_stack.compiler)
    base["runtime"]["library"] = str(refnpu_stack.library)
    return lambda mutate: _write_variant(base, tmp_path / "specs", mutate)


@pytest.fixture
def fake_compiler_spec(tmp_path: Path) -> SpecVariant:
    """Like ``spec_variant``, with the shell stand-in as the compiler (no C compiler needed)."""
    from importlib import resources

    folder = tmp_path / "fake-sdk"
    folder.mkdir()
    script = folder / "refnpu-compile"
    script.write_text(_FAKE_COMPILER)
    script.chmod(0o755)
    text = resources.files("xpuflow.vendor_ref").joinpath("refnpu.spec.yaml").read_text()
    base = yaml.safe_load(text)
    base["compiler"]["env"] = {
        "FAKE_ARGV_FILE": str(tmp_path / "argv.bin"),
        "FAKE_ENV_FILE": str(tmp_path / "env.txt"),
    }
    return lambda mutate: _write_variant(base, folder, mutate)
