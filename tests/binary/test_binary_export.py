"""xpuflow's MLP export format: exact bytes, round trip, and refusals with the layer named."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from xpuflow.errors import ConfigError
from xpuflow.vendor_ref.export import export_mlp, mlp_forward, read_mlp, read_mlp_info


def test_file_layout_is_the_documented_one(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([0.5, -0.5, 1.0], dtype=np.float32)
    info = export_mlp([(w, b)], tmp_path / "one.xpfmlp")
    data = (tmp_path / "one.xpfmlp").read_bytes()
    assert data[:8] == b"XPFMLP01"
    assert struct.unpack_from("<IIII", data, 8) == (1, 1, 1, 0)  # version, layers, dtype f32, reserved
    assert struct.unpack_from("<IIII", data, 24) == (2, 3, 0, 0)  # in, out, activation none, reserved
    assert np.array_equal(np.frombuffer(data, "<f4", 6, 40), w.ravel())
    assert np.array_equal(np.frombuffer(data, "<f4", 3, 64), b)
    assert len(data) == info.file_bytes == 76
    assert (info.input_dim, info.output_dim, info.num_parameters) == (2, 3, 9)


def test_round_trip_and_default_activations(tmp_path: Path, mlp_layers: list) -> None:
    info = export_mlp(mlp_layers, tmp_path / "m.xpfmlp")
    assert [layer.activation for layer in info.layers] == ["relu", "relu", "none"]
    layers, activations = read_mlp(tmp_path / "m.xpfmlp")
    assert activations == ["relu", "relu", "none"]
    for (w, b), (w0, b0) in zip(layers, mlp_layers, strict=True):
        assert np.array_equal(w, w0)
        assert np.array_equal(b, b0)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place


def test_mlp_forward_is_dense_plus_relu() -> None:
    w = np.array([[1.0, -1.0]], dtype=np.float32)
    b = np.array([0.0, 0.5], dtype=np.float32)
    out = mlp_forward([(w, b)], np.array([[2.0]]), activations=["relu"])
    assert out.tolist() == [[2.0, 0.0]]
    assert mlp_forward([(w, b)], np.array([[2.0]])).tolist() == [[2.0, -1.5]]


@pytest.mark.parametrize(
    ("layers", "activations", "field"),
    [
        ([], None, "layers"),
        ([(np.ones((2, 3)), np.ones(3)), (np.ones((4, 1)), np.ones(1))], None, "layers.1"),
        ([(np.ones((2, 3)), np.ones(2))], None, "layers.0"),
        ([(np.full((2, 3), np.nan), np.ones(3))], None, "layers.0"),
        ([(np.ones((2, 3)), np.ones(3))], ["gelu"], "activations.0"),
        ([(np.ones((2, 3)), np.ones(3))], ["relu", "none"], "activations"),
    ],
)
def test_bad_networks_are_refused(tmp_path: Path, layers: list, activations: list | None, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        export_mlp(layers, tmp_path / "bad.xpfmlp", activations)
    assert info.value.field == field
    assert not (tmp_path / "bad.xpfmlp").exists()


def test_read_mlp_info_refuses_foreign_and_truncated_files(tmp_path: Path, mlp_layers: list) -> None:
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ConfigError, match="bad magic"):
        read_mlp_info(foreign)
    good = tmp_path / "m.xpfmlp"
    export_mlp(mlp_layers, good)
    truncated = tmp_path / "t.xpfmlp"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ConfigError, match="describes"):
        read_mlp_info(truncated)
    with pytest.raises(ConfigError, match="cannot read"):
        read_mlp_info(tmp_path / "absent.xpfmlp")
