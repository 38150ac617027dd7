"""BinaryCompilerAdapter with the real reference compiler: success, failures, timeouts, exact argv."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from xpuflow.backends.binary.compiler import BinaryCompilerAdapter
from xpuflow.backends.binary.spec import load_spec
from xpuflow.errors import CompilerError, CompilerTimeout
from xpuflow.vendor_ref import ReferenceStack

pytestmark = pytest.mark.slow  # builds the reference stack with the C compiler


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie is dead: it only waits to be reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _read_argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def test_compiles_an_engine_and_reports(refnpu_stack: ReferenceStack, mlp_path: Path, tmp_path: Path) -> None:
    adapter = BinaryCompilerAdapter(load_spec(refnpu_stack.spec))
    assert adapter.version() == "1.0.0"
    result = adapter.compile(mlp_path, tmp_path / "out", {"opt_level": 1})
    engine = result.outputs["engine"]
    assert engine.read_bytes()[:8] == b"RNPUENG1"
    assert struct.unpack_from("<I", engine.read_bytes(), 16) == (1,)  # the opt level reached the compiler
    report = json.loads(result.outputs["report"].read_text())
    assert report["input_dim"] == 12
    assert report["output_dim"] == 5
    assert report["opt_level"] == 1
    metadata = result.to_metadata()
    assert metadata["compile_params"] == {"opt_level": "1", "target": "refnpu-v1"}
    assert metadata["outputs"] == {"engine": "model.rnpu", "report": "report.json"}
    json.dumps(metadata)


def test_invalid_model_gives_compiler_error_with_stderr(refnpu_stack: ReferenceStack, tmp_path: Path) -> None:
    adapter = BinaryCompilerAdapter(load_spec(refnpu_stack.spec))
    bogus = tmp_path / "bogus.xpfmlp"
    bogus.write_bytes(b"NOTANMLP" + bytes(40))
    with pytest.raises(CompilerError) as info:
        adapter.compile(bogus, tmp_path / "out")
    error = info.value
    assert error.returncode == 3
    assert "refnpu-compile: error: input is not an xpuflow MLP export (bad magic)" in error.stderr
    assert "status 3 (the input is not a valid xpuflow MLP export)" in str(error)
    assert "bad magic" in str(error)
    assert not (tmp_path / "out" / "model.rnpu").exists()


def test_truncated_model_names_the_problem(
    refnpu_stack: ReferenceStack, mlp_path: Path, tmp_path: Path
) -> None:
    adapter = BinaryCompilerAdapter(load_spec(refnpu_stack.spec))
    cut = tmp_path / "cut.xpfmlp"
    cut.write_bytes(mlp_path.read_bytes()[:-10])
    with pytest.raises(CompilerError, match="truncated") as info:
        adapter.compile(cut, tmp_path / "out")
    assert info.value.returncode == 3


def test_argv_mismatch_is_a_usage_error(spec_variant: Any, mlp_path: Path, tmp_path: Path) -> None:
    spec = spec_variant(lambda d: d["compiler"]["argv"].__setitem__(1, "--in"))
    with pytest.raises(CompilerError, match=r"status 2 \(usage error") as info:
        BinaryCompilerAdapter(load_spec(spec)).compile(mlp_path, tmp_path / "out")
    assert "unknown argument '--in'" in info.value.stderr


def test_hung_compiler_is_killed_with_its_process_group(
    spec_variant: Any, mlp_path: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids.txt"

    def hang(data: dict[str, Any]) -> None:
        data["compiler"]["argv"] += ["--debug-sleep-s", "60", "--debug-pid-file", str(pid_file)]
        data["compiler"]["timeout_s"] = 1.0

    adapter = BinaryCompilerAdapter(load_spec(spec_variant(hang)))
    start = time.monotonic()
    with pytest.raises(CompilerTimeout, match=r"ran past its 1 s timeout") as info:
        adapter.compile(mlp_path, tmp_path / "out")
    assert time.monotonic() - start < 10
    assert "debug: sleeping 60 s" in str(info.value)
    compiler_pid, child_pid = map(int, pid_file.read_text().split())
    # The compiler was reaped by us; its forked child is killed and reaped by init: poll briefly.
    deadline = time.monotonic() + 5
    while (_alive(compiler_pid) or _alive(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(compiler_pid)
    assert not _alive(child_pid)
    if Path("/proc/self/stat").exists():
        assert _group_members(compiler_pid) == []  # the compiler led its own process group
    assert not (tmp_path / "out" / "model.rnpu").exists()


def test_real_compiler_receives_hostile_names_verbatim(
    spec_variant: Any, mlp_path: Path, tmp_path: Path
) -> None:
    argv_file = tmp_path / "argv.bin"
    spec = spec_variant(lambda d: d["compiler"]["env"].update(REFNPU_DEBUG_ARGV_FILE=str(argv_file)))
    adapter = BinaryCompilerAdapter(load_spec(spec))
    hostile = mlp_path.parent / "--opt-level 0; touch pwned $(touch pwned2) ..model.xpfmlp"
    hostile.write_bytes(mlp_path.read_bytes())
    out_dir = tmp_path / "out dir; rm -rf ~"
    result = adapter.compile(hostile, out_dir)
    received = _read_argv(argv_file)
    assert received == list(result.argv)
    assert received[1:] == [
        "--input", str(hostile.resolve()), "--output", str(out_dir.resolve() / "model.rnpu"),
        "--opt-level", "2", "--target", "refnpu-v1", "--report", str(out_dir.resolve() / "report.json"),
    ]  # fmt: skip
    assert struct.unpack_from("<I", result.outputs["engine"].read_bytes(), 16) == (2,)
    assert not list(tmp_path.rglob("pwned*"))
