"""The vendor spec file: the shipped reference spec loads; mistakes are refused naming the field."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from xpuflow.backends.binary.spec import ROLE_SIGNATURES, load_spec, parse_spec, placeholders_in
from xpuflow.errors import ConfigError


@pytest.fixture
def reference_data() -> dict[str, Any]:
    text = resources.files("xpuflow.vendor_ref").joinpath("refnpu.spec.yaml").read_text()
    return yaml.safe_load(text)


def _refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_spec(data, "test.spec.yaml")
    return info.value


def test_reference_spec_loads_and_declares_every_role(reference_data: dict[str, Any]) -> None:
    spec = parse_spec(reference_data)
    assert spec.name == "refnpu"
    assert spec.device.emulated_on_host
    assert spec.compiler.argv[0] == "{compiler}"
    assert spec.compiler.display_name == "refnpu-compile"
    assert {o.name for o in spec.compiler.outputs} == {"engine", "report"}
    assert spec.runtime.engine_output == "engine"
    for role in ROLE_SIGNATURES:
        assert spec.runtime.function(role) is not None
    assert spec.runtime.errors[-5].name == "REFNPU_E_CHECKSUM"
    assert spec.runtime.errors[-8].retryable


def test_json_spec_with_string_error_codes_is_accepted(
    tmp_path: Path, reference_data: dict[str, Any]
) -> None:
    data = copy.deepcopy(reference_data)
    data["runtime"]["errors"] = {str(k): v for k, v in data["runtime"]["errors"].items()}
    data["compiler"]["exit_codes"] = {str(k): v for k, v in data["compiler"]["exit_codes"].items()}
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(data))
    loaded = load_spec(path)
    assert loaded.spec.runtime.errors[-3].name == "REFNPU_E_BAD_MAGIC"
    assert loaded.base_dir == tmp_path.resolve()
    assert len(loaded.sha256) == 64


def test_relative_paths_resolve_next_to_the_spec(tmp_path: Path, reference_data: dict[str, Any]) -> None:
    path = tmp_path / "refnpu.spec.yaml"
    path.write_text(yaml.safe_dump(reference_data))
    loaded = load_spec(path)
    assert loaded.executable() is None  # not built here, and not on PATH
    assert loaded.library() == "librefnpu_runtime.so"  # left to the dynamic loader's search
    (tmp_path / "refnpu-compile").write_text("#!/bin/sh\n")
    (tmp_path / "librefnpu_runtime.so").write_bytes(b"")
    assert loaded.executable() == (tmp_path / "refnpu-compile").resolve()
    assert loaded.library() == str((tmp_path / "librefnpu_runtime.so").resolve())


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (
            lambda d: d["compiler"].update(argv=["sh", "-c", "{model}"]),
            "compiler",
            "must start with '{compiler}'",
        ),
        (lambda d: d["compiler"]["argv"].append("{secret}"), "compiler", "undeclared placeholder"),
        (lambda d: d["compiler"]["argv"].append("{model"), "compiler", "brace"),
        (
            lambda d: d["compiler"]["outputs"][0].update(file="../escape.bin"),
            "compiler.outputs.0.file",
            "plain",
        ),
        (lambda d: d["compiler"]["outputs"][0].update(file="sub/x.bin"), "compiler.outputs.0.file", "plain"),
        (lambda d: d["compiler"].update(timeout_s=0), "compiler.timeout_s", "greater than 0"),
        (lambda d: d["compiler"]["params"].update(model={"type": "str"}), "compiler.params", "reserved"),
        (
            lambda d: d["compiler"]["params"].update(level={"type": "choice"}),
            "compiler.params.level",
            "choices",
        ),
        (lambda d: d["compiler"].update(argv_template=[]), "compiler.argv_template", "Extra inputs"),
        (lambda d: d["runtime"]["errors"].update({0: {"name": "OK"}}), "runtime.errors", "success"),
        (lambda d: d["runtime"]["roles"].update(run="refnpu_missing"), "runtime", "not in functions"),
        (
            lambda d: d["runtime"]["functions"][2].update(argtypes=["void_p", "float_p", "int"]),
            "runtime",
            "run role needs",
        ),
        (
            lambda d: d["runtime"]["functions"][0].update(restype="float128"),
            "runtime.functions.0.restype",
            "",
        ),
        (lambda d: d["runtime"].update(engine_output="blob"), "(top level)", "engine_output"),
        (lambda d: d["device"].update(max_batch_size=0), "device.max_batch_size", "greater than or equal"),
        (lambda d: d.update(spec_version=2), "spec_version", ""),
    ],
)
def test_mistakes_are_refused_naming_the_field(
    reference_data: dict[str, Any], mutate: Any, field: str, words: str
) -> None:
    data = copy.deepcopy(reference_data)
    mutate(data)
    error = _refused(data)
    assert error.field == field
    assert "test.spec.yaml" in str(error)
    assert words in str(error)


def test_missing_or_unparsable_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read binary spec") as info:
        load_spec(tmp_path / "absent.yaml")
    assert info.value.field == "spec"
    bad = tmp_path / "bad.yaml"
    bad.write_text("compiler: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec(listing)


def test_placeholders_in_an_element() -> None:
    assert placeholders_in("--opt={opt_level}") == ["opt_level"]
    assert placeholders_in("{out_dir}/{engine}") == ["out_dir", "engine"]
    assert placeholders_in("plain") == []
    with pytest.raises(ValueError, match="brace"):
        placeholders_in("{not closed")
    with pytest.raises(ValueError, match="brace"):
        placeholders_in("{with space}")
