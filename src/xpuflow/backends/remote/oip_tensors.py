"""Tensors of the Open Inference Protocol (KServe v2) as numpy arrays, for its REST and gRPC forms.

One table of datatypes and the conversions both directions of both wire forms need::

    array = from_json("FP32", [2, 2], [1, 2, 3, 4])             # REST "data"
    raw = to_raw(array)                                        # gRPC raw_input_contents / binary extension
    assert (from_raw("FP32", [2, 2], raw) == array).all()
    texts = from_raw("BYTES", [2], to_raw(np.array([b"a", b"bc"], dtype=object)))

``BYTES`` tensors hold ``bytes`` objects (dtype ``object``); in their raw form each element is a 4-byte
little-endian length and the bytes, as Triton and KServe define it. In JSON they are strings.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from xpuflow.errors import ConfigError

__all__ = [
    "DATATYPES",
    "datatype_of",
    "from_contents",
    "from_json",
    "from_raw",
    "to_json_data",
    "to_raw",
]

#: OIP datatype -> numpy dtype (BYTES: object arrays of bytes).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

_BY_NUMPY = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}

#: OIP datatype -> the little-endian dtype of its raw form (built once: ``newbyteorder`` makes a new
#: dtype on every call), and whether it is also this host's native dtype (then no conversion is needed).
_RAW_DTYPES = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items() if name != "BYTES"}
_NATIVE_RAW = {name for name, raw in _RAW_DTYPES.items() if raw == DATATYPES[name]}

#: A BYTES element's length prefix: 4 bytes, little-endian.
_LENGTH = struct.Struct("<I")

#: datatype -> the InferTensorContents field that carries it (FP16 travels raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _dtype(datatype: str, name: str = "tensor") -> np.dtype[Any]:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise ConfigError(
            f"tensor '{name}' has datatype {datatype!r}; valid: {', '.join(DATATYPES)}", field="datatype"
        )
    return dtype


def _shape(shape: Sequence[Any], name: str) -> tuple[int, ...]:
    if type(shape) is list or type(shape) is tuple:
        # the common case, checked without the Sequence ABC (this runs for every tensor of a request)
        for dim in shape:
            if type(dim) is not int or dim < 0:
                break
        else:
            return tuple(shape)
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise ConfigError(f"tensor '{name}' needs a shape, a list of sizes such as [2, 4]", field="shape")
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ConfigError(
                f"tensor '{name}' has shape {list(shape)}; sizes must be integers >= 0", field="shape"
            )
        dims.append(dim)
    return tuple(dims)


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The OIP datatype of an array; object and string arrays are BYTES."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    name = _BY_NUMPY.get(array.dtype)
    if name is None:
        raise ConfigError(
            f"arrays of {array.dtype} have no Open Inference Protocol datatype", field="datatype"
        )
    return name


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.bytes_):
        return bytes(value)
    return str(value).encode("utf-8")


def _check_count(name: str, shape: tuple[int, ...], count: int) -> None:
    expected = math.prod(shape)
    if count != expected:
        raise ConfigError(
            f"tensor '{name}' has {count} element(s) but its shape {list(shape)} holds {expected}",
            field="data",
        )


def from_json(datatype: str, shape: Sequence[Any], data: Any, name: str = "tensor") -> np.ndarray[Any, Any]:
    """An array from REST ``data`` (flat or nested lists). ConfigError when it does not fit ``shape``."""
    dtype = _dtype(datatype, name)
    dims = _shape(shape, name)
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1)
        _check_count(name, dims, flat.size)
        out = np.empty(flat.size, dtype=object)
        out[:] = [_as_bytes(v) for v in flat]
        return out.reshape(dims)
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tensor '{name}': data is not {datatype}: {exc}", field="data") from exc
    _check_count(name, dims, array.size)
    return array.reshape(dims)


def to_json_data(array: np.ndarray[Any, Any]) -> list[Any]:
    """REST ``data`` for an array: flat, row-major; BYTES as strings (UTF-8, invalid bytes replaced)."""
    if datatype_of(array) == "BYTES":
        return [_as_bytes(v).decode("utf-8", "replace") for v in array.reshape(-1)]
    return array.reshape(-1).tolist()  # type: ignore[no-any-return]


def to_raw(array: np.ndarray[Any, Any]) -> bytes:
    """The raw (binary) form of an array: little-endian row-major, or length-prefixed BYTES elements."""
    if datatype_of(array) == "BYTES":
        pack = _LENGTH.pack
        parts = []
        for value in array.reshape(-1).tolist():
            data = value if type(value) is bytes else _as_bytes(value)
            parts.append(pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    name = _BY_NUMPY.get(array.dtype)
    if name in _NATIVE_RAW:
        return array.tobytes()  # row-major copy; the host is little-endian for this dtype
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def from_raw(datatype: str, shape: Sequence[Any], raw: bytes, name: str = "tensor") -> np.ndarray[Any, Any]:
    """An array from its raw form. ConfigError when the bytes do not fit ``shape``."""
    dtype = _dtype(datatype, name)
    dims = _shape(shape, name)
    if datatype == "BYTES":
        data = raw if type(raw) is bytes else bytes(raw)
        unpack = _LENGTH.unpack_from
        size = len(data)
        items: list[bytes] = []
        offset = 0
        while offset < size:
            if offset + 4 > size:
                raise ConfigError(f"tensor '{name}': truncated BYTES element length", field="data")
            (length,) = unpack(data, offset)
            offset += 4
            if offset + length > size:
                raise ConfigError(f"tensor '{name}': a BYTES element runs past the data", field="data")
            items.append(data[offset : offset + length])
            offset += length
        _check_count(name, dims, len(items))
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(dims)
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(
            f"tensor '{name}' has {len(raw)} bytes of data but {datatype} {list(dims)} needs {expected}",
            field="data",
        )
    array = np.frombuffer(raw, dtype=_RAW_DTYPES[datatype])
    if datatype not in _NATIVE_RAW:
        array = array.astype(dtype)
    return array.reshape(dims)


def from_contents(
    datatype: str, shape: Sequence[Any], contents: Any, name: str = "tensor"
) -> np.ndarray[Any, Any]:
    """An array from a gRPC ``InferTensorContents`` message."""
    _dtype(datatype, name)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ConfigError(
            f"tensor '{name}': {datatype} travels only in raw_input_contents over gRPC", field="datatype"
        )
    values = list(getattr(contents, field))
    if datatype == "BYTES":
        return from_json(datatype, shape, values, name)
    return from_json(datatype, shape, values, name)


def contents_field(datatype: str) -> str | None:
    """The ``InferTensorContents`` field of a datatype (None for FP16, which travels raw only)."""
    return _CONTENTS_FIELD.get(datatype)
