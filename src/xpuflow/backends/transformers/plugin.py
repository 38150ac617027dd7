"""The ``transformers`` backend: Hugging Face models on torch, on the CPU, CUDA/ROCm GPUs, Apple MPS
and Intel XPU.

A model is a Hugging Face folder (with ``config.json``) or a GGUF file. A GGUF file is dequantised once
by the ``gguf-dequant`` build step, through transformers' GGUF loader, and saved as a plain fp32
safetensors folder with its tokenizer and chat template in the artifact store; every later load reads
that folder, in a fraction of the time::

    config = ModelConfig("smollm2", path=smollm2_gguf_path(), task="chat")
    artifacts = build_all(TransformersPlugin(), [cpu], config, ArtifactStore())
    session = await TransformersPlugin().create_session([cpu], config, artifacts)
    reply = await session.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=16))

The session (``transformers_session.TransformersSession``) batches generation natively, reuses the keys
and values of prompt prefixes many requests share (``prefix_cache``), streams token by token, and
decodes greedily at temperature 0. With ``task: embedding`` the folder is an encoder and ``embed``
returns mean-pooled (or CLS), unit-length vectors.

Precision: fp32, bf16 and fp16. fp16 on a CPU is refused (torch's CPU half-precision kernels are slow
and partial): use bf16 or fp32 there. Options are listed in ``TRANSFORMERS_OPTIONS``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import (
    Availability,
    ModelConfig,
    ModelTask,
)
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.decode_loop import supports_continuous_batching
from xpuflow.backends.encoders.onnx_export import check_pooling, encoder_max_length, package_version
from xpuflow.backends.prefix_cache import PrefixCache
from xpuflow.backends.transformers.session import TransformersSession
from xpuflow.errors import BackendUnavailable, BuildError, ConfigError, SessionError, XpuflowError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["TRANSFORMERS_OPTIONS", "TransformersPlugin", "TransformersSession", "torch_device"]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
TRANSFORMERS_OPTIONS: dict[str, str] = {
    "num_threads": "torch CPU threads (torch.set_num_threads; process-wide; default: torch's own)",
    "attn_implementation": "attention kernel: eager, sdpa, ... (default: transformers' choice)",
    "pooling": "embeddings: mean or cls (default mean)",
    "normalize": "embeddings: scale to unit length, as OpenAI does (default true)",
    "prefix_cache": "generation: reuse the keys and values of shared prompt prefixes (default true)",
    "prefix_cache_entries": "generation: how many prefixes the prefix cache keeps (default 8)",
    "prefix_cache_tokens": "generation: the most tokens the prefix cache keeps in all (default 16384)",
    "continuous_batching": "generation: requests join and leave one running batch at every decoding "
    "step instead of waiting for the next batch (default false)",
}

DEQUANT_PROFILE = "gguf-dequant"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install 'xpuflow[transformers]'"


@dataclass(frozen=True)
class _Source:
    kind: str  # "hf" or "gguf"
    path: Path


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_device(resource: Resource) -> str | None:
    """The torch device string for a resource ("cpu", "cuda:1", "mps", "xpu:0"), or None when torch
    has no device for it. ROCm builds of torch address AMD GPUs as "cuda"."""
    if resource.type is ResourceType.CPU:
        return "cpu"
    kind, _, index = resource.id.partition(":")
    number = index if index.isdigit() else str(resource.attributes.get("index", 0))
    if kind in ("cuda", "rocm") and resource.type is ResourceType.GPU:
        return f"cuda:{number}"
    if kind == "mps":
        return "mps"
    if kind == "xpu":
        return f"xpu:{number}"
    return None


def _primary_device(resources: Sequence[Resource]) -> str:
    if not resources:
        return "cpu"
    device = torch_device(resources[0])
    if device is None:
        raise ConfigError(
            f"the transformers backend cannot run on {resources[0].id} ({resources[0].type.value}); torch "
            "drives cpu, cuda/rocm, mps and xpu devices",
            field="device",
        )
    return device


def _resolve_source(config: ModelConfig) -> _Source:
    what = "a Hugging Face model folder (with config.json) or a .gguf file"
    path = config.path
    if path is None:
        raise ConfigError(f"the transformers backend needs a model path: {what}", field="model")
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist; pass {what}", field="model")
    if config.task is ModelTask.TENSOR:
        raise ConfigError(
            "the transformers backend serves chat, completion and embedding tasks", field="task"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model; pass {what}",
                field="model",
            )
        return _Source("hf", path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ConfigError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}); pass {what}", field="model"
        )
    if config.task is ModelTask.EMBEDDING:
        raise ConfigError(
            "GGUF files are served for chat and completion here; for embeddings pass a Hugging Face encoder "
            "folder, or use the llamacpp backend with options embedding: true",
            field="task",
        )
    return _Source("gguf", path)


def _check_config(config: ModelConfig, resources: Sequence[Resource]) -> _Source:
    source = _resolve_source(config)
    unknown = sorted(set(config.options) - set(TRANSFORMERS_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown transformers option(s) {', '.join(unknown)}; valid: {', '.join(TRANSFORMERS_OPTIONS)}",
            field=f"options.{unknown[0]}",
        )
    if config.precision not in _DTYPES:
        raise ConfigError(
            f"the transformers backend runs precision fp32, bf16 or fp16, not '{config.precision}'; "
            "for int8 or int4 weights use the llamacpp backend with a quantised GGUF",
            field="precision",
        )
    if config.precision == "fp16" and _primary_device(resources) == "cpu":
        raise ConfigError(
            "precision fp16 is not supported on the CPU (torch's CPU half-precision kernels are slow and "
            "partial); use bf16 or fp32 on cpu",
            field="precision",
        )
    config.int_option("num_threads")
    check_pooling(config.options, "mean")
    config.bool_option("continuous_batching", False)
    config.bool_option("prefix_cache", True)
    config.int_option("prefix_cache_entries", 8)
    if config.int_option("prefix_cache_tokens", 16384) < 8:
        raise ConfigError(
            "options.prefix_cache_tokens must be at least 8 (shorter prefixes are never cached)",
            field="options.prefix_cache_tokens",
        )
    return source


def _model_folder(source: _Source, artifacts: Mapping[str, BuildArtifact], model_id: str) -> Path:
    if source.kind == "hf":
        return source.path
    artifact = artifacts.get(DEQUANT_PROFILE)
    if artifact is None:
        raise BuildError(
            f"model '{model_id}' is a GGUF file and needs its '{DEQUANT_PROFILE}' artifact; build it first "
            "(build_all, or `xpuflow build`) and pass the artifacts to create_session"
        )
    return artifact.path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _has_chat_template(folder: Path) -> bool:
    return (folder / "chat_template.jinja").is_file() or bool(
        _read_json(folder / "tokenizer_config.json").get("chat_template")
    )


def _dtype_kwargs(torch: Any, precision: str) -> dict[str, Any]:
    """``dtype=`` for from_pretrained; transformers before 4.56 called it ``torch_dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    name = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {name: getattr(torch, _DTYPES[precision])}


def _dequantize_gguf(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """Load a GGUF through transformers, dequantised to fp32, and save it as a Hugging Face folder."""
    if not _installed("gguf"):
        raise BackendUnavailable(
            f"loading GGUF files in transformers needs the gguf package; {_INSTALL_HINT}"
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "gguf_file": gguf.name,
        "local_files_only": True,
        **_dtype_kwargs(torch, "fp32"),
    }
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None and "dequantize" in inspect.signature(gguf_config).parameters:
        # Newer transformers can keep GGUF blocks packed; we want plain weights that save and reload.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if not getattr(quantizer.quantization_config, "dequantize", False):
            raise BuildError(
                f"transformers {transformers.__version__} kept the weights of {gguf.name} packed, so "
                "they cannot be saved as a dense model; use the llamacpp backend for this file"
            )
        quantizer.remove_quantization_config(model)  # the weights are dense already
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": "gguf",
        "gguf_file": gguf.name,
        "architecture": str(getattr(model.config, "model_type", "unknown")),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": "float32",
        "chat_template": _has_chat_template(out_dir),
    }


class TransformersPlugin:
    """Hugging Face models (and dequantised GGUF files) on torch devices."""

    name = "transformers"

    def availability(self) -> Availability:
        missing = [m for m in ("torch", "transformers") if not _installed(m)]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed; {_INSTALL_HINT}")
        version = package_version("transformers")
        gguf = "GGUF loading available" if _installed("gguf") else "no GGUF loading (pip install gguf)"
        return Availability(
            True, f"transformers {version} on torch {package_version('torch')}; {gguf}", version
        )

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """CPUs, and the CUDA/ROCm, MPS and XPU devices this torch build sees. Never raises."""
        if not (_installed("torch") and _installed("transformers")):
            return []
        found = [r for r in resources if r.type is ResourceType.CPU]
        others = [r for r in resources if r.type is not ResourceType.CPU and torch_device(r) is not None]
        if not others:
            return found
        try:
            import torch
        except Exception:
            return found
        for resource in others:
            try:
                if _torch_sees(torch, str(torch_device(resource))):
                    found.append(resource)
            except Exception:  # a driver that fails its query: the device is not usable
                continue
        return [r for r in resources if r in found]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """``gguf-dequant`` for a GGUF file (device-independent, so it targets the host); nothing else."""
        source = _check_config(config, resources)
        if source.kind != "gguf":
            return []
        versions = "; ".join(f"{n} {package_version(n)}" for n in ("transformers", "torch", "gguf"))
        return [
            BuildProfile(
                name=DEQUANT_PROFILE,
                target=ResourceType.CPU,
                compiler="transformers",
                compiler_version=versions,
                flags=("dtype=float32", "format=safetensors"),
                backend=self.name,
                description="GGUF dequantised to a Hugging Face safetensors folder with its tokenizer",
            )
        ]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        if profile.name != DEQUANT_PROFILE:
            raise BuildError(f"the transformers backend has no build profile '{profile.name}'")
        source = _resolve_source(config)
        if source.kind != "gguf":
            raise BuildError(f"'{DEQUANT_PROFILE}' builds GGUF files only; {source.path} is a folder")
        return _dequantize_gguf(source.path, out_dir)

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        source = _check_config(config, resources)
        device = _primary_device(resources)
        folder = source.path if source.kind == "hf" else getattr(artifacts.get(DEQUANT_PROFILE), "path", None)
        positions = _read_json(folder / "config.json").get("max_position_embeddings") if folder else None
        max_seq_len = min(config.max_seq_len, positions) if isinstance(positions, int) else config.max_seq_len
        generative = config.task is not ModelTask.EMBEDDING
        unsupported: dict[str, str] = {}
        chat = generative
        if generative:
            unsupported["embeddings"] = "deployed for generation; deploy an encoder with task: embedding"
            if folder is not None and not _has_chat_template(folder):
                chat = False
                unsupported["chat"] = "the tokenizer has no chat template; send text completions"
        else:
            for feature in ("chat", "completion", "streaming"):
                unsupported[feature] = "deployed with task: embedding"
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=max_seq_len,
            supports_kv_cache=generative,
            supports_streaming=generative,
            supports_embeddings=not generative,
            supports_chat=chat,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.LATENCY if device == "cpu" else OptimizedFor.THROUGHPUT,
            unsupported=unsupported,
            details={"device": device, "source": source.kind},
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> TransformersSession:
        """Load tokenizer and model on a new model thread. Raises ConfigError for bad config, BuildError
        when a GGUF model's artifact is missing, BackendUnavailable without torch/transformers, and
        SessionError when the model cannot be loaded."""
        source = _check_config(config, resources)
        folder = _model_folder(source, artifacts, config.model_id)
        device = _primary_device(resources)
        try:
            import torch
            from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise BackendUnavailable(f"torch and transformers are needed ({exc}); {_INSTALL_HINT}") from exc
        embedding = config.task is ModelTask.EMBEDDING
        threads = config.option("num_threads")
        attention = config.option("attn_implementation")

        def load() -> tuple[Any, Any]:
            if threads is not None:
                torch.set_num_threads(int(threads))
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            kwargs: dict[str, Any] = {"local_files_only": True, **_dtype_kwargs(torch, config.precision)}
            if attention is not None:
                kwargs["attn_implementation"] = str(attention)
            model_class: Any = AutoModel if embedding else AutoModelForCausalLM
            model = model_class.from_pretrained(folder, **kwargs).to(device).eval()
            if not embedding:
                tokenizer.padding_side = "left"  # a decoder continues every row from its last position
                if tokenizer.pad_token is None:
                    if tokenizer.eos_token is None:
                        raise ConfigError(f"the tokenizer in {folder} has neither a pad nor an eos token")
                    tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer

        runner = BlockingRunner(f"transformers-{config.model_id}")
        try:
            model, tokenizer = await runner.call(load)
        except Exception as exc:
            runner.close()
            if isinstance(exc, XpuflowError):
                raise
            raise SessionError(
                f"transformers could not load {folder} for model '{config.model_id}' on {device}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        positions = getattr(model.config, "max_position_embeddings", None)
        if embedding:
            max_seq_len = encoder_max_length(folder, config.max_seq_len, tokenizer.model_max_length)
        else:
            max_seq_len = (
                min(config.max_seq_len, positions) if isinstance(positions, int) else config.max_seq_len
            )
        continuous = config.bool_option("continuous_batching", False) and not embedding
        if continuous and (why := supports_continuous_batching(model)) is not None:
            runner.close()
            raise ConfigError(
                f"model '{config.model_id}' cannot use continuous batching: {why}; set options "
                "continuous_batching: false",
                field="options.continuous_batching",
            )
        return TransformersSession(
            config.model_id,
            resources,
            model=model,
            tokenizer=tokenizer,
            runner=runner,
            device=device,
            embedding=embedding,
            max_seq_len=max_seq_len,
            max_batch_size=config.max_batch_size,
            pooling=check_pooling(config.options, "mean"),
            normalize=bool(config.option("normalize", True)),
            prefix_cache=None
            if embedding or not config.bool_option("prefix_cache", True)
            else PrefixCache(
                capacity=config.int_option("prefix_cache_entries", 8),
                max_tokens=config.int_option("prefix_cache_tokens", 16384),
            ),
            continuous=continuous,
        )


def _torch_sees(torch: Any, device: str) -> bool:
    kind, _, index = device.partition(":")
    if kind == "cuda":
        return bool(torch.cuda.is_available()) and int(index or 0) < torch.cuda.device_count()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu is not None and bool(xpu.is_available()) and int(index or 0) < xpu.device_count()
    return False
