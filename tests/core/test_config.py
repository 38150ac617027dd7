from __future__ import annotations

from pathlib import Path

import pytest

from xpuflow.backends.base import ModelTask
from xpuflow.config import load_config, parse_config
from xpuflow.errors import ConfigError


def test_valid_config_maps_to_model_config(tmp_path: Path) -> None:
    file = tmp_path / "x.yaml"
    file.write_text(
        "resources:\n  - {id: 'pim:0', type: pim, memory_bytes: 1024, bandwidth_gbps: 900}\n"
        "deployments:\n  - {name: emb, backend: onnxruntime, model: m, task: embedding}\n"
    )
    cfg = load_config(file)
    assert cfg.declared_resources()[0]["bandwidth_gbps"] == 900
    model = cfg.deployments[0].to_model_config(base_dir=tmp_path)
    assert model.task is ModelTask.EMBEDDING
    assert model.path == tmp_path / "m"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"deployments": [{"name": "a", "backend": "x", "precision": "fp12"}]}, "deployments.0.precision"),
        ({"deployments": [{"name": "a", "backend": "x", "max_batch_size": 0}]}, "max_batch_size"),
        ({"deployments": [{"name": "a", "backend": "x"}, {"name": "a", "backend": "y"}]}, "appears twice"),
        ({"unknown_key": 1}, "unknown_key"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid_config_names_the_field(data: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)
