"""What a model path is (GGUF file, ONNX file, Hugging Face folder) and roughly how big the model is.

Used where a device must be chosen before the model is loaded (``device: auto``)::

    fmt = model_format(path)              # "gguf" | "onnx" | "hf"
    params = estimate_params(path, fmt)   # parameters, from the weight files' sizes
"""

from __future__ import annotations

from pathlib import Path

from xpuflow.errors import ConfigError

__all__ = ["estimate_params", "model_format"]

_GGUF_BYTES_PER_PARAM = 0.6  # Q4-class files; only used to size a model for device choice
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt")


def model_format(path: Path) -> str:
    """ "gguf", "onnx" or "hf"; a ConfigError saying what xpuflow loads otherwise."""
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise ConfigError(
            f"model path {path} does not exist; pass a .gguf file, an .onnx file or a HF folder"
        )
    raise ConfigError(
        f"cannot tell the format of {path}; xpuflow loads .gguf files, .onnx files and Hugging Face "
        "folders (with config.json)"
    )


def estimate_params(path: Path, fmt: str | None = None) -> float:
    """Parameters, estimated from the weight files (GGUF as ~4.8 bits per weight, others as fp32)."""
    fmt = fmt or model_format(path)
    if fmt == "gguf":
        return path.stat().st_size / _GGUF_BYTES_PER_PARAM
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES]
    return max(1.0, sum(f.stat().st_size for f in files) / 4.0)
