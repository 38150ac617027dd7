"""xpuflow's MLP export format ("XPFMLP01"): what binary NPU compilers read from xpuflow.

A multi-layer perceptron is a list of dense layers ``y = act(x @ W + b)`` with ``W`` shaped
``(in_dim, out_dim)`` (numpy's convention). The file is little-endian::

    header, 24 bytes   magic "XPFMLP01" | u32 version = 1 | u32 num_layers | u32 dtype = 1 (f32) | u32 0
    layer table        num_layers x (u32 in_dim | u32 out_dim | u32 activation (0 none, 1 relu) | u32 0)
    tensors            per layer: f32 W[in_dim][out_dim] row-major, then f32 b[out_dim]

Example::

    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(8, 16)), np.zeros(16)), (rng.normal(size=(16, 4)), np.zeros(4))]
    info = export_mlp(layers, "mlp.xpfmlp")          # ReLU after every layer but the last
    y = mlp_forward(layers, x)                         # the numpy reference of the same network
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xpuflow.errors import ConfigError

__all__ = [
    "MLP_MAGIC",
    "Activation",
    "MlpInfo",
    "MlpLayerInfo",
    "export_mlp",
    "mlp_forward",
    "read_mlp",
    "read_mlp_info",
]

MLP_MAGIC = b"XPFMLP01"
MLP_VERSION = 1
MAX_LAYERS = 64
MAX_DIM = 65536
_DTYPE_F32 = 1
_HEADER = struct.Struct("<8sIIII")
_LAYER = struct.Struct("<IIII")

Activation = str
"""'relu' or 'none'."""

_ACTIVATIONS = {"none": 0, "relu": 1}
_ACTIVATION_NAMES = {code: name for name, code in _ACTIVATIONS.items()}

Layer = tuple[Any, Any]


@dataclass(frozen=True)
class MlpLayerInfo:
    in_dim: int
    out_dim: int
    activation: Activation


@dataclass(frozen=True)
class MlpInfo:
    """The shape of an exported MLP, read from its header without loading the weights."""

    layers: tuple[MlpLayerInfo, ...]
    file_bytes: int

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_dim

    @property
    def output_dim(self) -> int:
        return self.layers[-1].out_dim

    @property
    def num_parameters(self) -> int:
        return sum(layer.in_dim * layer.out_dim + layer.out_dim for layer in self.layers)


def _default_activations(count: int) -> list[Activation]:
    return ["relu"] * (count - 1) + ["none"]


def _checked_layers(
    layers: Sequence[Layer], activations: Sequence[Activation] | None
) -> list[tuple[np.ndarray, np.ndarray, Activation]]:
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ConfigError(f"an MLP needs 1..{MAX_LAYERS} layers, got {len(layers)}", field="layers")
    acts = list(activations) if activations is not None else _default_activations(len(layers))
    if len(acts) != len(layers):
        raise ConfigError(
            f"got {len(acts)} activations for {len(layers)} layers; give one per layer",
            field="activations",
        )
    checked = []
    previous_out: int | None = None
    for index, ((weights, bias), act) in enumerate(zip(layers, acts, strict=True)):
        w = np.ascontiguousarray(weights, dtype=np.float32)
        b = np.ascontiguousarray(bias, dtype=np.float32)
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ConfigError(
                f"layer {index}: W must be (in_dim, out_dim) and b (out_dim,), got {w.shape} and {b.shape}",
                field=f"layers.{index}",
            )
        if not all(1 <= d <= MAX_DIM for d in w.shape):
            raise ConfigError(f"layer {index}: dimensions must be in 1..{MAX_DIM}", field=f"layers.{index}")
        if previous_out is not None and w.shape[0] != previous_out:
            raise ConfigError(
                f"layer {index} takes {w.shape[0]} inputs but layer {index - 1} produces {previous_out}",
                field=f"layers.{index}",
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ConfigError(f"layer {index} holds NaN or Inf values", field=f"layers.{index}")
        if act not in _ACTIVATIONS:
            raise ConfigError(
                f"layer {index}: activation '{act}' is not one of {sorted(_ACTIVATIONS)}",
                field=f"activations.{index}",
            )
        checked.append((w, b, act))
        previous_out = w.shape[1]
    return checked


def export_mlp(
    layers: Sequence[Layer], path: str | os.PathLike[str], activations: Sequence[Activation] | None = None
) -> MlpInfo:
    """Write ``layers`` (a list of ``(W, b)``) to ``path`` in the XPFMLP01 format and return its shape.

    ``activations`` defaults to ReLU after every layer but the last. Values are stored as float32.
    The file is written to a temporary name and renamed, so readers never see half a model.
    """
    checked = _checked_layers(layers, activations)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        out.write(_HEADER.pack(MLP_MAGIC, MLP_VERSION, len(checked), _DTYPE_F32, 0))
        for w, _, act in checked:
            out.write(_LAYER.pack(w.shape[0], w.shape[1], _ACTIVATIONS[act], 0))
        for w, b, _ in checked:
            out.write(w.astype("<f4", copy=False).tobytes(order="C"))
            out.write(b.astype("<f4", copy=False).tobytes(order="C"))
    os.replace(tmp, target)
    return read_mlp_info(target)


def read_mlp_info(path: str | os.PathLike[str]) -> MlpInfo:
    """Read and check an export's header and layer table. Raises ConfigError naming the problem."""
    file = Path(path)
    try:
        with open(file, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise ConfigError(f"{file} is too short to be an MLP export", field="model")
            magic, version, num_layers, dtype, _ = _HEADER.unpack(head)
            if magic != MLP_MAGIC:
                raise ConfigError(f"{file} is not an MLP export (bad magic); write it with export_mlp()")
            if version != MLP_VERSION or dtype != _DTYPE_F32 or not 1 <= num_layers <= MAX_LAYERS:
                raise ConfigError(
                    f"{file}: unsupported export (version {version}, dtype {dtype}, {num_layers} layers)",
                    field="model",
                )
            table = f.read(_LAYER.size * num_layers)
            size = file.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read MLP export {file}: {exc}", field="model") from exc
    if len(table) < _LAYER.size * num_layers:
        raise ConfigError(f"{file} is truncated inside its layer table", field="model")
    infos = []
    for index in range(num_layers):
        in_dim, out_dim, act, _ = _LAYER.unpack_from(table, index * _LAYER.size)
        if act not in _ACTIVATION_NAMES:
            raise ConfigError(f"{file}: layer {index} has unknown activation {act}", field="model")
        infos.append(MlpLayerInfo(in_dim, out_dim, _ACTIVATION_NAMES[act]))
    info = MlpInfo(tuple(infos), size)
    expected = _HEADER.size + _LAYER.size * num_layers + 4 * info.num_parameters
    if size != expected:
        raise ConfigError(f"{file} is {size} bytes but its layer table describes {expected}", field="model")
    return info


def read_mlp(path: str | os.PathLike[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[Activation]]:
    """Load an export back: ``(layers, activations)`` with float32 ``(W, b)`` per layer."""
    info = read_mlp_info(path)
    data = Path(path).read_bytes()
    offset = _HEADER.size + _LAYER.size * len(info.layers)
    layers = []
    for layer in info.layers:
        count = layer.in_dim * layer.out_dim
        w = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(layer.in_dim, layer.out_dim)
        offset += 4 * count
        b = np.frombuffer(data, dtype="<f4", count=layer.out_dim, offset=offset)
        offset += 4 * layer.out_dim
        layers.append((w.astype(np.float32), b.astype(np.float32)))
    return layers, [layer.activation for layer in info.layers]


def mlp_forward(
    layers: Sequence[Layer], inputs: Any, activations: Sequence[Activation] | None = None
) -> np.ndarray:
    """The numpy reference of an MLP, computed in float64 from float32 weights and inputs."""
    acts = list(activations) if activations is not None else _default_activations(len(layers))
    x = np.asarray(inputs, dtype=np.float32).astype(np.float64)
    for (weights, bias), act in zip(layers, acts, strict=True):
        w = np.asarray(weights, dtype=np.float32).astype(np.float64)
        b = np.asarray(bias, dtype=np.float32).astype(np.float64)
        x = x @ w + b
        if act == "relu":
            x = np.maximum(x, 0.0)
    return x
