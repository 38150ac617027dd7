"""The OIP tensor codec: JSON, raw and typed-contents forms, and the errors for tensors that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from xpuflow.backends.remote.oip_proto import messages, method_path
from xpuflow.backends.remote.oip_tensors import (
    DATATYPES,
    datatype_of,
    from_contents,
    from_json,
    from_raw,
    to_json_data,
    to_raw,
)
from xpuflow.errors import ConfigError


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_raw_and_json_round_trip(datatype: str) -> None:
    array = (
        (np.arange(6) % 2 if datatype == "BOOL" else np.arange(6)).astype(DATATYPES[datatype]).reshape(2, 3)
    )
    assert datatype_of(array) == datatype
    np.testing.assert_array_equal(from_raw(datatype, [2, 3], to_raw(array)), array)
    np.testing.assert_array_equal(from_json(datatype, [2, 3], to_json_data(array)), array)


def test_bytes_tensors() -> None:
    texts = np.array([b"a", "ü".encode(), b""], dtype=object)
    raw = to_raw(texts)
    assert raw[:5] == b"\x01\x00\x00\x00a"
    assert list(from_raw("BYTES", [3], raw)) == [b"a", "ü".encode(), b""]
    assert to_json_data(texts) == ["a", "ü", ""]
    assert list(from_json("BYTES", [3, 1], ["a", "b", "c"]).reshape(-1)) == [b"a", b"b", b"c"]


def test_typed_contents() -> None:
    contents = messages.InferTensorContents(fp32_contents=[1.0, 2.0])
    np.testing.assert_array_equal(from_contents("FP32", [2], contents), np.array([1, 2], dtype=np.float32))
    assert method_path("ModelInfer") == "/inference.GRPCInferenceService/ModelInfer"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: from_json("FP32", [3], [1, 2]), "has 2 element(s) but its shape [3] holds 3"),
        (lambda: from_raw("FP32", [2], b"\x00" * 4), "has 4 bytes of data but FP32 [2] needs 8"),
        (lambda: from_raw("BYTES", [1], b"\x09\x00\x00\x00ab"), "runs past the data"),
        (lambda: from_json("FP8", [1], [1]), "datatype 'FP8'; valid:"),
        (lambda: from_json("FP32", [-2], []), "sizes must be integers >= 0"),
    ],
)
def test_errors_say_what_is_wrong(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert message in str(info.value)
