"""BinaryRuntimeAdapter over the real reference runtime: numbers, error-code mapping, lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xpuflow.backends.binary.compiler import BinaryCompilerAdapter
from xpuflow.backends.binary.runtime import BinaryRuntimeAdapter
from xpuflow.backends.binary.spec import load_spec
from xpuflow.errors import BackendError, BackendUnavailable, ConfigError, VendorRuntimeError
from xpuflow.vendor_ref import ReferenceStack, mlp_forward

pytestmark = pytest.mark.slow  # builds the reference stack with the C compiler


@pytest.fixture
def engines(refnpu_stack: ReferenceStack, mlp_path: Path, tmp_path: Path) -> dict[int, Path]:
    """One engine per optimisation level."""
    compiler = BinaryCompilerAdapter(load_spec(refnpu_stack.spec))
    return {
        level: compiler.compile(mlp_path, tmp_path / f"opt{level}", {"opt_level": level}).outputs["engine"]
        for level in (0, 1, 2)
    }


@pytest.fixture
def runtime(refnpu_stack: ReferenceStack) -> Any:
    with BinaryRuntimeAdapter(load_spec(refnpu_stack.spec)).open(0) as opened:
        yield opened


@pytest.mark.parametrize("level", [0, 1, 2])
def test_outputs_match_numpy(
    runtime: BinaryRuntimeAdapter, engines: dict, mlp_layers: list, level: int
) -> None:
    engine = runtime.load_engine(engines[level])
    x = np.random.default_rng(level).standard_normal((33, 12)).astype(np.float32)
    y = runtime.run(engine, x, out_dim=5)
    assert y.shape == (33, 5)
    assert y.dtype == np.float32
    assert np.max(np.abs(y - mlp_forward(mlp_layers, x))) < 1e-5
    # Rows are independent: a batch of one gives the same row.
    assert np.allclose(runtime.run(engine, x[3:4].copy(), out_dim=5)[0], y[3], atol=1e-6)


def test_version_and_last_error(runtime: BinaryRuntimeAdapter) -> None:
    assert runtime.version() == "1.0.0"
    assert runtime.last_error() == ""
    assert runtime.is_open
    assert runtime.device_index == 0


def _corrupt(engine: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(engine.read_bytes())
    if how == "payload":
        data[-1] ^= 0xFF
    elif how == "magic":
        data[:8] = b"NOTMAGIC"
    elif how == "truncated":
        del data[-8:]
    elif how == "header":
        data[24] ^= 0x01  # input_dim, covered by the checksum
    bad = tmp_path / f"{how}.rnpu"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize(
    ("how", "code", "name", "words"),
    [
        ("payload", -5, "REFNPU_E_CHECKSUM", "fails its checksum"),
        ("header", -5, "REFNPU_E_CHECKSUM", "fails its checksum"),
        ("magic", -3, "REFNPU_E_BAD_MAGIC", "is not a refnpu engine"),
        ("truncated", -6, "REFNPU_E_CORRUPT", "declares a"),
    ],
)
def test_bad_engine_maps_to_vendor_runtime_error(
    runtime: BinaryRuntimeAdapter, engines: dict, tmp_path: Path, how: str, code: int, name: str, words: str
) -> None:
    bad = _corrupt(engines[2], tmp_path, how)
    with pytest.raises(VendorRuntimeError) as info:
        runtime.load_engine(bad)
    error = info.value
    assert error.code == code
    assert error.name == name
    assert not error.retryable
    message = str(error)
    assert message.startswith(f"refnpu_load_engine failed with {name} ({code})")
    assert words in message  # the library's own refnpu_last_error() text
    assert str(bad) in message


def test_missing_engine_file_is_an_io_error(runtime: BinaryRuntimeAdapter, tmp_path: Path) -> None:
    with pytest.raises(VendorRuntimeError, match="No such file") as info:
        runtime.load_engine(tmp_path / "absent.rnpu")
    assert (info.value.code, info.value.name) == (-2, "REFNPU_E_IO")


def test_shape_mismatch_is_mapped(runtime: BinaryRuntimeAdapter, engines: dict) -> None:
    engine = runtime.load_engine(engines[1])
    with pytest.raises(VendorRuntimeError, match="send rows of the model's input width") as info:
        runtime.run(engine, np.zeros((2, 11), dtype=np.float32), out_dim=5)
    assert info.value.code == -7
    assert "engine maps 12 -> 5" in str(info.value)
    with pytest.raises(VendorRuntimeError) as out_info:
        runtime.run(engine, np.zeros((2, 12), dtype=np.float32), out_dim=4)
    assert out_info.value.code == -7


def test_inputs_must_be_contiguous_float32(runtime: BinaryRuntimeAdapter, engines: dict) -> None:
    engine = runtime.load_engine(engines[0])
    wide = np.zeros((4, 24), dtype=np.float32)
    for bad in (np.zeros((2, 12)), wide[:, ::2], np.zeros(12, dtype=np.float32), [[0.0] * 12]):
        with pytest.raises(ConfigError, match="ascontiguousarray"):
            runtime.run(engine, bad, out_dim=5)  # type: ignore[arg-type]


def test_no_such_device(refnpu_stack: ReferenceStack) -> None:
    with pytest.raises(VendorRuntimeError, match="no refnpu device 3") as info:
        BinaryRuntimeAdapter(load_spec(refnpu_stack.spec)).open(3)
    assert info.value.name == "REFNPU_E_NO_DEVICE"


def test_code_missing_from_the_table_still_carries_the_code(
    spec_variant: Any, engines: dict, tmp_path: Path
) -> None:
    spec = spec_variant(lambda d: d["runtime"]["errors"].pop(-5))
    bad = _corrupt(engines[2], tmp_path, "payload")
    with BinaryRuntimeAdapter(load_spec(spec)).open() as runtime, pytest.raises(VendorRuntimeError) as info:
        runtime.load_engine(bad)
    assert info.value.code == -5
    assert info.value.name is None
    assert "does not list" in str(info.value)
    assert "fails its checksum" in str(info.value)


def test_close_unloads_and_is_idempotent(refnpu_stack: ReferenceStack, engines: dict) -> None:
    runtime = BinaryRuntimeAdapter(load_spec(refnpu_stack.spec)).open()
    first = runtime.load_engine(engines[0])
    runtime.load_engine(engines[1])
    runtime.unload(first)
    runtime.unload(first)  # a second unload is a no-op
    with pytest.raises(BackendError, match="not loaded"):
        runtime.run(first, np.zeros((1, 12), dtype=np.float32), out_dim=5)
    runtime.close()  # unloads the second engine first, else the device would be busy
    assert not runtime.is_open
    runtime.close()
    with pytest.raises(BackendError, match="not open"):
        runtime.load_engine(engines[0])
    with pytest.raises(BackendError, match="already open"):
        runtime.open().open()


def test_missing_library_or_symbol_is_backend_unavailable(spec_variant: Any) -> None:
    absent = spec_variant(lambda d: d["runtime"].update(library="/nonexistent/libvendor.so"))
    with pytest.raises(BackendUnavailable, match="cannot load runtime library"):
        BinaryRuntimeAdapter(load_spec(absent)).open()

    def extra_symbol(data: dict[str, Any]) -> None:
        data["runtime"]["functions"].append({"name": "refnpu_not_exported", "restype": "int", "argtypes": []})

    with pytest.raises(BackendUnavailable, match="does not export 'refnpu_not_exported'"):
        BinaryRuntimeAdapter(load_spec(spec_variant(extra_symbol))).open()
