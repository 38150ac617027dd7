"""The argv template: values cannot inject options or shell syntax, nor escape the allowed folders.

These tests use a shell stand-in for the vendor compiler (it records the argv and environment it
received), so they need no C compiler; test_binary_compiler.py repeats the key ones with the real one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from xpuflow.backends.binary.compiler import BinaryCompilerAdapter, trim_output
from xpuflow.backends.binary.spec import load_spec
from xpuflow.errors import BackendUnavailable, CompilerError, ConfigError

SHELL_NAMES = [
    "my model.xpfmlp",
    "a;rm -rf ~;b.xpfmlp",
    "--help.xpfmlp",
    "$(touch pwned).xpfmlp",
    "`touch pwned`.xpfmlp",
    "x|y&z>w.xpfmlp",
    "quote'\"s.xpfmlp",
]


def _read_argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _with_extra_param(data: dict[str, Any]) -> None:
    data["compiler"]["params"]["tag"] = {"type": "str", "description": "free text"}
    data["compiler"]["params"]["calibration"] = {"type": "path"}
    data["compiler"]["argv"] += ["--tag", "{tag}", "--calibration={calibration}"]


@pytest.fixture
def adapter(fake_compiler_spec: Any) -> BinaryCompilerAdapter:
    return BinaryCompilerAdapter(load_spec(fake_compiler_spec(lambda d: None)))


@pytest.mark.parametrize("name", SHELL_NAMES)
def test_hostile_model_names_reach_the_compiler_as_one_verbatim_argument(
    adapter: BinaryCompilerAdapter, tmp_path: Path, name: str
) -> None:
    model = tmp_path / "models" / name
    model.parent.mkdir()
    model.write_bytes(b"model")
    out_dir = tmp_path / "out"
    result = adapter.compile(model, out_dir)
    received = _read_argv(tmp_path / "argv.bin")
    exe = str(adapter.executable())
    assert received == [
        "--input", str(model.resolve()), "--output", str(out_dir.resolve() / "model.rnpu"),
        "--opt-level", "2", "--target", "refnpu-v1", "--report", str(out_dir.resolve() / "report.json"),
    ]  # fmt: skip
    assert list(result.argv) == [exe, *received]
    assert not list(tmp_path.rglob("pwned"))
    assert not Path("pwned").exists()
    assert result.outputs["engine"] == out_dir / "model.rnpu"


@pytest.mark.parametrize(
    "value",
    ["--debug-sleep-s", "-x", "a\nb", "a\rb", "a\0b", ""],
)
def test_option_like_or_control_values_are_refused(
    fake_compiler_spec: Any, tmp_path: Path, value: str
) -> None:
    adapter = BinaryCompilerAdapter(load_spec(fake_compiler_spec(_with_extra_param)))
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    (tmp_path / "calib.bin").write_bytes(b"c")
    with pytest.raises(ConfigError) as info:
        adapter.render_argv(model, tmp_path / "out", {"tag": value, "calibration": "calib.bin"})
    assert info.value.field == "compile.tag"
    assert not (tmp_path / "argv.bin").exists()


def test_values_with_spaces_and_semicolons_stay_one_element(fake_compiler_spec: Any, tmp_path: Path) -> None:
    adapter = BinaryCompilerAdapter(load_spec(fake_compiler_spec(_with_extra_param)))
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    (tmp_path / "calib.bin").write_bytes(b"c")
    tag = "two words; $(reboot) `id` > /etc/x"
    adapter.compile(model, tmp_path / "out", {"tag": tag, "calibration": "calib.bin"})
    received = _read_argv(tmp_path / "argv.bin")
    assert received[-3:] == ["--tag", tag, f"--calibration={(tmp_path / 'calib.bin').resolve()}"]


def test_path_values_cannot_escape_the_allowed_folders(fake_compiler_spec: Any, tmp_path: Path) -> None:
    adapter = BinaryCompilerAdapter(load_spec(fake_compiler_spec(_with_extra_param)))
    models = tmp_path / "models"
    models.mkdir()
    model = models / "m.xpfmlp"
    model.write_bytes(b"model")
    (tmp_path / "secret.txt").write_text("outside")
    (models / "link.bin").symlink_to(tmp_path / "secret.txt")
    for value in ("../secret.txt", str(tmp_path / "secret.txt"), "link.bin", "sub/../../secret.txt"):
        with pytest.raises(ConfigError, match="outside the allowed folders") as info:
            adapter.render_argv(model, tmp_path / "out", {"tag": "t", "calibration": value})
        assert info.value.field == "compile.calibration"
    with pytest.raises(ConfigError, match="not an existing file"):
        adapter.render_argv(model, tmp_path / "out", {"tag": "t", "calibration": "absent.bin"})
    # The model itself must be inside explicitly given allowed folders.
    with pytest.raises(ConfigError, match="outside") as model_info:
        adapter.render_argv(
            model, tmp_path / "out", {"tag": "t", "calibration": "x"}, [tmp_path / "elsewhere"]
        )
    assert model_info.value.field == "model"


def test_params_are_typed_and_bounded(adapter: BinaryCompilerAdapter) -> None:
    assert adapter.resolve_params({}) == {"opt_level": "2", "target": "refnpu-v1"}
    assert adapter.resolve_params({"opt_level": "0"})["opt_level"] == "0"
    for bad in (3, -1, "two", True, 1.5):
        with pytest.raises(ConfigError) as info:
            adapter.resolve_params({"opt_level": bad})
        assert info.value.field == "compile.opt_level"
    with pytest.raises(ConfigError, match="one of"):
        adapter.resolve_params({"target": "--debug-sleep-s"})
    with pytest.raises(ConfigError, match=r"declared: \['opt_level', 'target'\]"):
        adapter.resolve_params({"opt": 1})


def test_param_without_value_used_in_argv_is_refused(fake_compiler_spec: Any, tmp_path: Path) -> None:
    adapter = BinaryCompilerAdapter(load_spec(fake_compiler_spec(_with_extra_param)))
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    with pytest.raises(ConfigError, match=r"set options\.compile\.tag"):
        adapter.render_argv(model, tmp_path / "out", {})


def test_only_allowlisted_environment_reaches_the_compiler(
    adapter: BinaryCompilerAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XPUFLOW_TEST_SECRET", "hunter2")
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    adapter.compile(model, tmp_path / "out", env={"EXTRA_FOR_THIS_RUN": "1"})
    env = dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)
    assert "XPUFLOW_TEST_SECRET" not in env
    assert env["EXTRA_FOR_THIS_RUN"] == "1"
    assert env["FAKE_ARGV_FILE"] == str(tmp_path / "argv.bin")
    assert env.get("PATH") == os.environ.get("PATH")


def test_exit_status_maps_to_compiler_error_with_meaning(fake_compiler_spec: Any, tmp_path: Path) -> None:
    spec = fake_compiler_spec(lambda d: d["compiler"]["env"].update(FAKE_EXIT="3"))
    adapter = BinaryCompilerAdapter(load_spec(spec))
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    with pytest.raises(
        CompilerError, match=r"status 3 \(the input is not a valid xpuflow MLP export\)"
    ) as info:
        adapter.compile(model, tmp_path / "out")
    assert info.value.returncode == 3


def test_stale_outputs_are_removed_before_the_run(fake_compiler_spec: Any, tmp_path: Path) -> None:
    # The compiler "forgets" the engine (wrong file name): a stale engine must not pass the check.
    spec = fake_compiler_spec(lambda d: d["compiler"]["argv"].__setitem__(4, "{out_dir}/elsewhere.rnpu"))
    adapter = BinaryCompilerAdapter(load_spec(spec))
    model = tmp_path / "m.xpfmlp"
    model.write_bytes(b"model")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.rnpu").write_bytes(b"stale engine from an earlier build")
    with pytest.raises(CompilerError, match="wrote no required output 'engine'") as info:
        adapter.compile(model, out_dir)
    assert info.value.returncode == 0


def test_missing_compiler_is_backend_unavailable(fake_compiler_spec: Any, tmp_path: Path) -> None:
    spec = fake_compiler_spec(lambda d: d["compiler"].update(executable="no-such-vendor-compile"))
    adapter = BinaryCompilerAdapter(load_spec(spec))
    with pytest.raises(BackendUnavailable, match="not installed"):
        adapter.executable()
    with pytest.raises(BackendUnavailable):
        adapter.version()


def test_version_comes_from_the_version_command(adapter: BinaryCompilerAdapter) -> None:
    assert adapter.version() == "9.9.9"
    assert adapter.version() == "9.9.9"  # cached per executable file


def test_trim_output_keeps_head_and_tail() -> None:
    data = b"FIRST ERROR\n" + b"x" * 100_000 + b"\nLAST ERROR"
    text = trim_output(data)
    assert text.startswith("FIRST ERROR")
    assert text.endswith("LAST ERROR")
    assert "bytes omitted" in text
    assert len(text) < 9000
    assert trim_output(b"short") == "short"
