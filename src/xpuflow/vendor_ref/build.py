"""Build the reference vendor stack (refnpu) from its C sources with the host C compiler.

The result is a folder laid out like a vendor SDK, with the spec file next to what it points at::

    stack = build_reference_stack(tmp_dir)       # about a second with gcc; a no-op when up to date
    stack.compiler   # .../refnpu-compile
    stack.library    # .../librefnpu_runtime.so
    stack.spec       # .../refnpu.spec.yaml  (options.spec of a "binary" deployment)

``reference_stack()`` does the same into the user cache, keyed by the sources, so deployments can say
``options: {spec: reference}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from xpuflow.errors import BuildError, CompilerError

__all__ = ["ReferenceStack", "build_reference_stack", "find_c_compiler", "reference_stack"]

_PACKAGE = "xpuflow.vendor_ref"
_SOURCES = ("refnpu.h", "refnpu_format.h", "refnpu_format.c", "refnpu_compile.c", "refnpu_runtime.c")
_SPEC_NAME = "refnpu.spec.yaml"
_COMPILER_NAME = "refnpu-compile"
_LIBRARY_NAME = "librefnpu_runtime.so"
_STAMP_NAME = ".refnpu-build.json"
_CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra")
_CC_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ReferenceStack:
    """Paths of a built reference stack."""

    root: Path
    compiler: Path
    library: Path
    spec: Path
    header: Path
    cc: tuple[str, ...]


def find_c_compiler() -> tuple[str, ...] | None:
    """The host C compiler as an argv prefix: ``$CC`` if set, else cc, gcc or clang on PATH."""
    from_env = os.environ.get("CC", "").strip()
    if from_env:
        return tuple(shlex.split(from_env))
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return (found,)
    return None


def _sources_digest(cc: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    package = resources.files(_PACKAGE)
    for name in (*_SOURCES, _SPEC_NAME):
        digest.update(name.encode() + b"\0" + package.joinpath(name).read_bytes() + b"\0")
    digest.update(json.dumps([list(cc), list(_CFLAGS)]).encode())
    return digest.hexdigest()


def _stack(root: Path, cc: tuple[str, ...]) -> ReferenceStack:
    return ReferenceStack(
        root=root,
        compiler=root / _COMPILER_NAME,
        library=root / _LIBRARY_NAME,
        spec=root / _SPEC_NAME,
        header=root / "refnpu.h",
        cc=cc,
    )


def _run_cc(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CC_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot build the reference stack with {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise CompilerError(
            f"{argv[0]} failed to build the reference stack (status {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}",
            returncode=done.returncode,
            stderr=done.stderr[-8000:],
        )


def build_reference_stack(
    out_dir: str | os.PathLike[str], *, cc: tuple[str, ...] | None = None, force: bool = False
) -> ReferenceStack:
    """Compile refnpu-compile and librefnpu_runtime.so into ``out_dir`` and put the spec beside them.

    Idempotent: when ``out_dir`` already holds a build of the same sources with the same C compiler,
    it returns at once. Files are built in a temporary folder and moved in with atomic renames, so a
    concurrent reader sees either the old or the new files. Raises BuildError (CompilerError when the
    C compiler fails) with the compiler's message; no C compiler: install gcc or set CC.
    """
    root = Path(out_dir).resolve()
    cc = cc or find_c_compiler()
    if cc is None:
        raise BuildError("no C compiler found to build the reference NPU stack; install gcc or set CC")
    stamp = _sources_digest(cc)
    stack = _stack(root, cc)
    stamp_file = root / _STAMP_NAME
    if not force and stamp_file.is_file() and all(p.is_file() for p in (stack.compiler, stack.library)):
        try:
            if json.loads(stamp_file.read_text())["digest"] == stamp:
                return stack
        except (OSError, ValueError, KeyError):
            pass  # unreadable stamp: rebuild
    root.mkdir(parents=True, exist_ok=True)
    package = resources.files(_PACKAGE)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        work = Path(tmp)
        for name in (*_SOURCES, _SPEC_NAME):
            (work / name).write_bytes(package.joinpath(name).read_bytes())
        common = [*cc, *_CFLAGS, "-I", str(work)]
        _run_cc([*common, "-o", str(work / _COMPILER_NAME),
                 str(work / "refnpu_compile.c"), str(work / "refnpu_format.c")])  # fmt: skip
        _run_cc([*common, "-fPIC", "-shared", "-fvisibility=hidden", "-o", str(work / _LIBRARY_NAME),
                 str(work / "refnpu_runtime.c"), str(work / "refnpu_format.c")])  # fmt: skip
        for name in (_COMPILER_NAME, _LIBRARY_NAME, _SPEC_NAME, "refnpu.h"):
            # A rename, never an overwrite in place: a process that has the old library mapped
            # keeps its (unlinked) copy instead of crashing on changed pages.
            os.replace(work / name, root / name)
        (work / _STAMP_NAME).write_text(json.dumps({"digest": stamp, "cc": list(cc)}))
        os.replace(work / _STAMP_NAME, stamp_file)
    return stack


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xpuflow" / "refnpu"


def reference_stack(cache_dir: str | os.PathLike[str] | None = None) -> ReferenceStack:
    """The reference stack built into ``cache_dir`` (default: the user cache), building it if needed."""
    cc = find_c_compiler()
    if cc is None:
        raise BuildError("no C compiler found to build the reference NPU stack; install gcc or set CC")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return build_reference_stack(root / _sources_digest(cc)[:16], cc=cc)
