"""The ``onnxruntime`` backend: embeddings from encoder models on ONNX Runtime's execution providers.

A Hugging Face encoder folder is exported to ONNX once by the ``onnx-export`` build step (see
``onnx_export``) and kept in the artifact store; a ready ``.onnx`` file with its ``tokenizer.json``
runs as it is. The execution providers follow the resource the session is placed on::

    gpu    CUDA (NVIDIA), ROCm / MIGraphX (AMD), DirectML, OpenVINO (Intel), CoreML (Apple)
    igpu   OpenVINO (Intel), DirectML, CoreML (Apple), ROCm (AMD)
    npu    OpenVINO (Intel), QNN (Qualcomm), CoreML (Apple), Vitis AI (AMD)
    cpu    CPU

each only when this onnxruntime build has it (``ort.get_available_providers()``), and always followed by
the CPU provider as the fallback for operators the accelerator lacks::

    config = ModelConfig("minilm", path=minilm_path(), task="embedding")
    artifacts = build_all(OnnxRuntimePlugin(), [cpu], config, ArtifactStore())
    session = await OnnxRuntimePlugin().create_session([cpu], config, artifacts)
    session.providers            # ("CPUExecutionProvider",), as ONNX Runtime reports it
    vectors = await session.embed(["hello", "world"])

Options are listed in ``ONNXRUNTIME_OPTIONS`` and in docs/backends_torch_onnx.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import Availability, ModelConfig
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.encoders.onnx_export import (
    DEFAULT_OPSET,
    ONNX_MODEL_NAME,
    EncoderSession,
    EncoderSource,
    EncoderSpec,
    EncoderTokenizer,
    check_pooling,
    encoder_max_length,
    export_encoder,
    exporter_version,
    resolve_encoder_source,
)
from xpuflow.errors import BackendUnavailable, BuildError, ConfigError, SessionError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["ONNXRUNTIME_OPTIONS", "OnnxRuntimePlugin", "OnnxRuntimeSession", "choose_providers"]

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
ONNXRUNTIME_OPTIONS: dict[str, str] = {
    "execution_providers": "providers to use, in order: names, or [name, {provider options}] pairs "
    "(default: chosen from the resource; CPUExecutionProvider is always added last)",
    "num_threads": "intra-op threads of the session (default: ONNX Runtime's, one per physical core)",
    "graph_optimization": "all, extended, basic or disabled (default all)",
    "pooling": "mean or cls (default: the model's sentence-transformers pooling, else mean)",
    "normalize": "scale embeddings to unit length, as OpenAI does (default true)",
    "opset": f"ONNX opset of the export (default {DEFAULT_OPSET})",
}

EXPORT_PROFILE = "onnx-export"
CPU_PROVIDER = "CPUExecutionProvider"
_INSTALL_HINT = "pip install 'xpuflow[onnx]' (onnxruntime-gpu or onnxruntime-openvino for accelerators)"
_OPTIMIZATION_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disabled": "ORT_DISABLE_ALL",
}

# Per resource type: (provider, vendors it drives (empty: any vendor), how its options name the device).
_ACCELERATOR_PROVIDERS: dict[ResourceType, tuple[tuple[str, frozenset[str], str], ...]] = {
    ResourceType.GPU: (
        ("CUDAExecutionProvider", frozenset({"nvidia"}), "device_id"),
        ("ROCMExecutionProvider", frozenset({"amd"}), "device_id"),
        ("MIGraphXExecutionProvider", frozenset({"amd"}), "device_id"),
        ("DmlExecutionProvider", frozenset(), "device_id"),
        ("OpenVINOExecutionProvider", frozenset({"intel"}), "device_type=GPU"),
        ("CoreMLExecutionProvider", frozenset({"apple"}), ""),
    ),
    ResourceType.IGPU: (
        ("OpenVINOExecutionProvider", frozenset({"intel"}), "device_type=GPU"),
        ("DmlExecutionProvider", frozenset(), "device_id"),
        ("CoreMLExecutionProvider", frozenset({"apple"}), ""),
        ("ROCMExecutionProvider", frozenset({"amd"}), "device_id"),
    ),
    ResourceType.NPU: (
        ("OpenVINOExecutionProvider", frozenset({"intel"}), "device_type=NPU"),
        ("QNNExecutionProvider", frozenset({"qualcomm"}), ""),
        ("CoreMLExecutionProvider", frozenset({"apple"}), ""),
        ("VitisAIExecutionProvider", frozenset({"amd", "xilinx"}), ""),
    ),
}

Provider = tuple[str, dict[str, Any]]


def _device_index(resource: Resource) -> int:
    index = resource.attributes.get("index")
    if isinstance(index, int):
        return index
    suffix = resource.id.rpartition(":")[2]
    return int(suffix) if suffix.isdigit() else 0


def _provider_for(resource: Resource, available: Sequence[str]) -> Provider | None:
    vendor = resource.vendor.lower()
    for name, vendors, device_option in _ACCELERATOR_PROVIDERS.get(resource.type, ()):
        if name not in available:
            continue
        if vendors and vendor not in ("", "unknown") and vendor not in vendors:
            continue
        options: dict[str, Any] = {}
        if device_option == "device_id":
            options["device_id"] = _device_index(resource)
        elif device_option:
            key, _, value = device_option.partition("=")
            options[key] = value
        return name, options
    return None


def choose_providers(
    resources: Sequence[Resource], available: Sequence[str], explicit: Sequence[Any] | None = None
) -> list[Provider]:
    """Execution providers with their options, best first, always ending with the CPU provider.

    ``explicit`` (the ``execution_providers`` option) wins and must name available providers; else the
    first resource that is not a CPU picks its accelerator provider from the table in the module
    docstring. Raises ConfigError for an unavailable or malformed explicit provider.
    """
    chosen: list[Provider] = []
    if explicit is not None:
        for entry in explicit:
            name, options = _parse_provider(entry)
            if name not in available:
                raise ConfigError(
                    f"execution provider '{name}' is not in this onnxruntime build; available: "
                    f"{', '.join(available)}",
                    field="options.execution_providers",
                )
            chosen.append((name, options))
    else:
        accelerator = next((r for r in resources if r.type is not ResourceType.CPU), None)
        found = _provider_for(accelerator, available) if accelerator is not None else None
        if found is not None:
            chosen.append(found)
    if all(name != CPU_PROVIDER for name, _ in chosen):
        chosen.append((CPU_PROVIDER, {}))
    return chosen


def _parse_provider(entry: Any) -> Provider:
    if isinstance(entry, str):
        return entry, {}
    if (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], Mapping)
    ):
        return entry[0], dict(entry[1])
    raise ConfigError(
        f"options.execution_providers entries are names or [name, {{options}}] pairs, got {entry!r}",
        field="options.execution_providers",
    )


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _check_config(config: ModelConfig) -> EncoderSource:
    source = resolve_encoder_source(config, "onnxruntime")
    unknown = sorted(set(config.options) - set(ONNXRUNTIME_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown onnxruntime option(s) {', '.join(unknown)}; valid: {', '.join(ONNXRUNTIME_OPTIONS)}",
            field=f"options.{unknown[0]}",
        )
    if config.precision != "fp32":
        raise ConfigError(
            f"the onnxruntime backend runs the fp32 export; precision '{config.precision}' is not supported, "
            "use precision fp32 (or the openvino backend for bf16/fp16)",
            field="precision",
        )
    config.int_option("num_threads")
    level = config.option("graph_optimization", "all")
    if level not in _OPTIMIZATION_LEVELS:
        raise ConfigError(
            f"options.graph_optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}, got {level!r}",
            field="options.graph_optimization",
        )
    opset = config.option("opset", DEFAULT_OPSET)
    if not isinstance(opset, int) or opset < 14:
        raise ConfigError(f"options.opset must be an integer >= 14, got {opset!r}", field="options.opset")
    explicit = config.option("execution_providers")
    if explicit is not None:
        if isinstance(explicit, str) or not isinstance(explicit, Sequence):
            raise ConfigError(
                "options.execution_providers must be a list such as [CUDAExecutionProvider]",
                field="options.execution_providers",
            )
        for entry in explicit:
            _parse_provider(entry)
    check_pooling(config.options, "mean")
    return source


def _model_files(
    source: EncoderSource, artifacts: Mapping[str, BuildArtifact], model_id: str
) -> tuple[Path, Path]:
    """(folder with the tokenizer, the .onnx file) for a session."""
    if source.kind == "onnx":
        return source.folder, source.path
    artifact = artifacts.get(EXPORT_PROFILE)
    if artifact is None:
        raise BuildError(
            f"model '{model_id}' needs its '{EXPORT_PROFILE}' artifact; build it first "
            "(build_all, or `xpuflow build`) and pass the artifacts to create_session"
        )
    return artifact.path, artifact.file(ONNX_MODEL_NAME)


class OnnxRuntimeSession(EncoderSession):
    """An ``EncoderSession`` on an ``onnxruntime.InferenceSession``; ``providers`` are those ONNX
    Runtime actually registered (a provider that fails to initialise is dropped by ONNX Runtime)."""

    def __init__(self, *args: Any, providers: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.providers = tuple(providers)


class OnnxRuntimePlugin:
    """Encoder embeddings on ONNX Runtime, on the CPU and on whatever accelerator its providers drive."""

    name = "onnxruntime"

    def availability(self) -> Availability:
        try:
            import onnxruntime as ort

            providers = list(ort.get_available_providers())
        except Exception as exc:  # ImportError, or a provider library that fails to load
            return Availability(False, f"onnxruntime is not usable ({exc}); {_INSTALL_HINT}")
        version = str(getattr(ort, "__version__", "unknown"))
        return Availability(True, f"onnxruntime {version}: providers {', '.join(providers)}", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """CPUs always; other resources when an installed provider drives them. Never raises."""
        try:
            available = _available_providers()
        except Exception:
            return []
        return [r for r in resources if r.type is ResourceType.CPU or _provider_for(r, available) is not None]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """One device-independent ``onnx-export`` for a Hugging Face folder; nothing for a .onnx file."""
        source = _check_config(config)
        if source.kind != "hf":
            return []
        opset = int(config.option("opset", DEFAULT_OPSET))
        return [
            BuildProfile(
                name=EXPORT_PROFILE,
                # ONNX is device-independent: one export serves every provider, so it targets the host.
                target=ResourceType.CPU,
                compiler="torch.onnx",
                compiler_version=exporter_version(),
                flags=(f"opset={opset}", "dtype=fp32", "attention=eager", "dynamic_axes=batch,sequence"),
                backend=self.name,
                description="Hugging Face encoder exported to ONNX with its tokenizer",
            )
        ]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        """Run the ``onnx-export`` step into ``out_dir``."""
        if profile.name != EXPORT_PROFILE:
            raise BuildError(f"the onnxruntime backend has no build profile '{profile.name}'")
        source = _check_config(config)
        return export_encoder(source.path, out_dir, opset=int(config.option("opset", DEFAULT_OPSET)))

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        source = _check_config(config)
        max_seq_len = encoder_max_length(source.folder, config.max_seq_len)
        unsupported = {
            "chat": "the onnxruntime backend serves encoder embeddings only",
            "completion": "the onnxruntime backend serves encoder embeddings only",
            "streaming": "embeddings are not streamed",
        }
        try:
            available = _available_providers()
        except Exception as exc:
            available = []
            unsupported["onnxruntime"] = f"onnxruntime is not usable ({exc}); {_INSTALL_HINT}"
        providers = choose_providers(resources, available, config.option("execution_providers"))
        for resource in resources:
            if resource.type is not ResourceType.CPU and _provider_for(resource, available) is None:
                unsupported[resource.id] = (
                    f"no installed ONNX Runtime execution provider drives {resource.id} "
                    f"({resource.type.value}, vendor {resource.vendor or 'unknown'}); "
                    f"available: {', '.join(available) or 'none'}"
                )
        on_accelerator = providers[0][0] != CPU_PROVIDER
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=max_seq_len,
            supports_embeddings=True,
            dtypes=("fp32",),
            optimized_for=OptimizedFor.THROUGHPUT if on_accelerator else OptimizedFor.LATENCY,
            unsupported=unsupported,
            details={"execution_providers": [name for name, _ in providers]},
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> OnnxRuntimeSession:
        """Open an InferenceSession on the chosen providers. Raises ConfigError for bad config,
        BuildError when the export artifact is missing, BackendUnavailable without onnxruntime, and
        SessionError when ONNX Runtime cannot load the model."""
        source = _check_config(config)
        folder, model_file = _model_files(source, artifacts, config.model_id)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(f"onnxruntime is not installed ({exc}); {_INSTALL_HINT}") from exc
        providers = choose_providers(
            resources, ort.get_available_providers(), config.option("execution_providers")
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: provider fallbacks are reported through `providers`
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[config.option("graph_optimization", "all")]
        )
        if config.option("num_threads") is not None:
            options.intra_op_num_threads = int(config.option("num_threads"))
        runner = BlockingRunner(f"onnxruntime-{config.model_id}")
        try:
            ort_session = await runner.call(
                ort.InferenceSession, str(model_file), sess_options=options, providers=providers
            )
            if source.kind == "hf":
                spec = EncoderSpec.load(folder)
            else:
                spec = EncoderSpec.derive(
                    folder, [i.name for i in ort_session.get_inputs()], ort_session.get_outputs()[0].name
                )
            tokenizer = EncoderTokenizer(folder, spec, max_length=config.max_seq_len)
        except Exception as exc:
            runner.close()
            if isinstance(exc, (ConfigError, BackendUnavailable)):
                raise
            raise SessionError(
                f"onnxruntime could not load {model_file} for model '{config.model_id}': {exc}; rebuild the "
                "artifact or check that the file is a complete ONNX model"
            ) from exc

        output = spec.output

        def infer(feed: dict[str, Any]) -> Any:
            return ort_session.run([output], feed)[0]

        return OnnxRuntimeSession(
            config.model_id,
            resources,
            backend=self.name,
            tokenizer=tokenizer,
            infer=infer,
            runner=runner,
            max_batch_size=config.max_batch_size,
            pooling=check_pooling(config.options, spec.pooling),
            normalize=bool(config.option("normalize", True)),
            providers=ort_session.get_providers(),
        )
