"""The ``openvino`` backend: embeddings from encoder models on Intel CPUs, GPUs and NPUs.

One build step, ``ov-compile``, per target device: a Hugging Face encoder folder is exported to ONNX
(the same export as the onnxruntime backend, see ``onnx_export``; a ready ``.onnx`` file is read as it
is), converted to OpenVINO IR (``model.xml``/``model.bin``, weights kept in fp32), and compiled for the
device; where the device can export compiled models (``EXPORT_IMPORT`` in its optimisation
capabilities: CPU, GPU, NPU) the compiled model is kept as ``compiled.blob``. A session imports that
blob with ``Core.import_model``, which skips compilation (seconds to minutes on GPUs and NPUs), and
falls back to compiling the IR when the import fails (another driver, or a device such as AUTO that
cannot export)::

    config = ModelConfig("minilm", path=minilm_path(), task="embedding")
    artifacts = build_all(OpenVinoPlugin(), [cpu], config, ArtifactStore())
    session = await OpenVinoPlugin().create_session([cpu], config, artifacts)
    session.device, session.compiled_from        # ("CPU", "blob")

We chose export/import over pointing OpenVINO's ``CACHE_DIR`` at an artifact: the store checksums
artifacts and treats them as immutable, while OpenVINO writes into its cache directory whenever a
compilation misses (another property, another driver). An imported blob is read, never written.

The device comes from the resource (cpu -> CPU, igpu -> the integrated GPU, gpu -> the discrete GPU,
npu -> NPU) or from ``options.device`` ("AUTO", "GPU.1", "HETERO:GPU,CPU"). Precision sets OpenVINO's
``INFERENCE_PRECISION_HINT`` (fp32 -> f32, bf16 -> bf16, fp16 -> f16); without it OpenVINO picks bf16
on CPUs with AMX or AVX-512 BF16. Options are listed in ``OPENVINO_OPTIONS``.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import threading
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
    package_version,
    resolve_encoder_source,
)
from xpuflow.errors import BackendUnavailable, BuildError, ConfigError, SessionError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["OPENVINO_OPTIONS", "OpenVinoPlugin", "OpenVinoSession", "openvino_device"]

log = logging.getLogger(__name__)

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
OPENVINO_OPTIONS: dict[str, str] = {
    "device": "OpenVINO device name such as CPU, GPU.1, NPU or AUTO (default: from the resource)",
    "num_threads": "CPU inference threads (INFERENCE_NUM_THREADS; default: OpenVINO's)",
    "performance_hint": "LATENCY or THROUGHPUT (default: OpenVINO's, LATENCY)",
    "pooling": "mean or cls (default: the model's sentence-transformers pooling, else mean)",
    "normalize": "scale embeddings to unit length, as OpenAI does (default true)",
    "opset": f"ONNX opset of the export (default {DEFAULT_OPSET})",
}

COMPILE_PROFILE = "ov-compile"
IR_NAME = "model.xml"
BLOB_NAME = "compiled.blob"
_INSTALL_HINT = "pip install 'xpuflow[openvino]'"
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_VIRTUAL_DEVICES = frozenset({"AUTO", "MULTI", "HETERO", "BATCH"})
_PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
# OpenVINO's GPU and NPU plugins drive Intel parts only.
_INTEL_ONLY = frozenset({ResourceType.GPU, ResourceType.IGPU, ResourceType.NPU})
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
)


def _gpu_name(core: Any, integrated: bool) -> str:
    """The OpenVINO GPU ("GPU.0", "GPU.1") of the wanted kind: OpenVINO numbers the integrated GPU
    first when there is one, so the kind is read from each device's DEVICE_TYPE."""
    gpus = [d for d in core.available_devices if d.startswith("GPU")]
    want = "INTEGRATED" if integrated else "DISCRETE"
    for device in gpus:
        try:
            if want in str(core.get_property(device, "DEVICE_TYPE")).upper():
                return str(device)
        except Exception:  # a device that cannot report its type is still a candidate below
            continue
    return str(gpus[0]) if gpus else "GPU"


def openvino_device(core: Any, resources: Sequence[Resource], config: ModelConfig) -> str:
    """The OpenVINO device for ``config`` on ``resources``: ``options.device`` or the first resource's.
    Raises ConfigError for a resource OpenVINO cannot drive or a device that is not available here."""
    explicit = config.option("device")
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit:
            raise ConfigError(
                f"options.device must be a device name such as AUTO, got {explicit!r}", field="options.device"
            )
        device = explicit
    else:
        resource = resources[0] if resources else None
        if resource is None or resource.type is ResourceType.CPU:
            device = "CPU"
        elif resource.type in (ResourceType.GPU, ResourceType.IGPU):
            device = _gpu_name(core, integrated=resource.type is ResourceType.IGPU)
        elif resource.type is ResourceType.NPU:
            device = "NPU"
        else:
            raise ConfigError(
                f"the openvino backend cannot run on {resource.id} ({resource.type.value}); place the "
                "model on a cpu, gpu, igpu or npu resource",
                field="device",
            )
    available = [str(d) for d in core.available_devices]
    for name in filter(None, re.split(r"[:,]", device)):
        if name in _VIRTUAL_DEVICES:
            continue
        if name not in available and not any(d.startswith(f"{name}.") for d in available):
            raise ConfigError(
                f"OpenVINO device '{name}' is not available here; available: "
                f"{', '.join(available) or 'none'} (set options.device, or install the device's driver)",
                field="options.device",
            )
    return device


def _supports(core: Any, device: str, prop: str) -> bool:
    base = re.split(r"[:.]", device)[0]
    if base in _VIRTUAL_DEVICES:
        return True  # virtual devices pass hardware properties through to the devices they use
    try:
        return prop in core.get_property(device, "SUPPORTED_PROPERTIES")
    except Exception:
        return False


def _compile_properties(core: Any, device: str, precision_hint: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if _supports(core, device, "INFERENCE_PRECISION_HINT"):
        properties["INFERENCE_PRECISION_HINT"] = precision_hint
    return properties


def _runtime_properties(core: Any, device: str, precision_hint: str, config: ModelConfig) -> dict[str, Any]:
    properties = _compile_properties(core, device, precision_hint)
    threads = config.option("num_threads")
    if threads is not None and _supports(core, device, "INFERENCE_NUM_THREADS"):
        properties["INFERENCE_NUM_THREADS"] = int(threads)
    hint = config.option("performance_hint")
    if hint is not None:
        properties["PERFORMANCE_HINT"] = str(hint).upper()
    return properties


def _can_export(core: Any, device: str) -> bool:
    try:
        return "EXPORT_IMPORT" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # virtual devices (AUTO) have no such capability
        return False


def _check_config(config: ModelConfig) -> EncoderSource:
    source = resolve_encoder_source(config, "openvino")
    unknown = sorted(set(config.options) - set(OPENVINO_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown openvino option(s) {', '.join(unknown)}; valid: {', '.join(OPENVINO_OPTIONS)}",
            field=f"options.{unknown[0]}",
        )
    if config.precision not in _PRECISION_HINTS:
        raise ConfigError(
            f"the openvino backend runs precision fp32, bf16 or fp16, not '{config.precision}'",
            field="precision",
        )
    config.int_option("num_threads")
    hint = config.option("performance_hint")
    if hint is not None and str(hint).upper() not in _PERFORMANCE_HINTS:
        raise ConfigError(
            f"options.performance_hint must be one of {', '.join(_PERFORMANCE_HINTS)}, got {hint!r}",
            field="options.performance_hint",
        )
    opset = config.option("opset", DEFAULT_OPSET)
    if not isinstance(opset, int) or opset < 14:
        raise ConfigError(f"options.opset must be an integer >= 14, got {opset!r}", field="options.opset")
    check_pooling(config.options, "mean")
    return source


def _flags(profile: BuildProfile) -> dict[str, str]:
    return dict(flag.split("=", 1) for flag in profile.flags if "=" in flag)


class OpenVinoSession(EncoderSession):
    """An ``EncoderSession`` on an OpenVINO compiled model. ``device`` is the OpenVINO device,
    ``execution_devices`` where it really runs (AUTO resolves to one), and ``compiled_from`` says
    whether the compiled blob was imported ("blob") or the IR compiled now ("ir")."""

    def __init__(
        self, *args: Any, device: str, execution_devices: Sequence[str], compiled_from: str, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.device = device
        self.execution_devices = tuple(execution_devices)
        self.compiled_from = compiled_from


class OpenVinoPlugin:
    """Encoder embeddings compiled by OpenVINO for Intel CPUs, GPUs and NPUs."""

    name = "openvino"

    def __init__(self) -> None:
        self._core_instance: Any = None
        self._lock = threading.Lock()

    def _core(self) -> Any:
        """One ``openvino.Core`` per plugin: creating one loads the device plugins."""
        with self._lock:
            if self._core_instance is None:
                try:
                    import openvino as ov
                except ImportError as exc:
                    raise BackendUnavailable(f"openvino is not installed ({exc}); {_INSTALL_HINT}") from exc
                self._core_instance = ov.Core()
            return self._core_instance

    def availability(self) -> Availability:
        try:
            core = self._core()
            devices = [str(d) for d in core.available_devices]
        except Exception as exc:
            return Availability(False, f"openvino is not usable ({exc}); {_INSTALL_HINT}")
        version = package_version("openvino")
        return Availability(True, f"openvino {version}: devices {', '.join(devices) or 'none'}", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """The resources whose kind of device OpenVINO lists here. Never raises."""
        try:
            devices = [str(d) for d in self._core().available_devices]
        except Exception:
            return []
        kinds = {
            ResourceType.CPU: "CPU",
            ResourceType.GPU: "GPU",
            ResourceType.IGPU: "GPU",
            ResourceType.NPU: "NPU",
        }
        found = []
        for resource in resources:
            kind = kinds.get(resource.type)
            if kind is None or not any(d.split(".")[0] == kind for d in devices):
                continue
            if resource.type in _INTEL_ONLY and resource.vendor.lower() not in ("", "unknown", "intel"):
                continue
            found.append(resource)
        return found

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """One ``ov-compile`` for the target device (its name and full name are in the flags, so a
        blob is never imported on another device model)."""
        source = _check_config(config)
        core = self._core()
        device = openvino_device(core, resources, config)
        try:
            device_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:
            device_name = device
        flags = [
            f"device={device}",
            f"device_name={device_name}",
            f"precision={_PRECISION_HINTS[config.precision]}",
        ]
        version = f"openvino {package_version('openvino')}"
        if source.kind == "hf":
            flags.append(f"opset={int(config.option('opset', DEFAULT_OPSET))}")
            version = f"{version}; {exporter_version()}"
        target = resources[0].type if resources else ResourceType.CPU
        return [
            BuildProfile(
                name=COMPILE_PROFILE,
                target=target,
                compiler="openvino",
                compiler_version=version,
                flags=(*flags, "ir=fp32"),
                backend=self.name,
                description="encoder as OpenVINO IR plus the model compiled for the device",
            )
        ]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        """Export (for a Hugging Face folder), convert to IR and compile for the profile's device."""
        if profile.name != COMPILE_PROFILE:
            raise BuildError(f"the openvino backend has no build profile '{profile.name}'")
        source = _check_config(config)
        flags = _flags(profile)
        device, precision_hint = flags["device"], flags["precision"]
        import openvino as ov

        core = self._core()
        work = out_dir / "onnx-export.tmp"
        try:
            if source.kind == "hf":
                work.mkdir()
                info: dict[str, Any] = dict(
                    export_encoder(source.path, work, opset=int(flags.get("opset", DEFAULT_OPSET)))
                )
                onnx_file, tokenizer_folder = work / ONNX_MODEL_NAME, work
            else:
                info = {"source": "onnx"}
                onnx_file, tokenizer_folder = source.path, source.folder
            model = core.read_model(str(onnx_file))
            if source.kind == "hf":
                spec = EncoderSpec.load(work)
            else:
                spec = EncoderSpec.derive(
                    source.folder, [p.get_any_name() for p in model.inputs], model.outputs[0].get_any_name()
                )
            ov.save_model(model, str(out_dir / IR_NAME), compress_to_fp16=False)
            for name in _TOKENIZER_FILES:
                if (tokenizer_folder / name).is_file():
                    shutil.copyfile(tokenizer_folder / name, out_dir / name)
            spec.save(out_dir)
            try:
                compiled = core.compile_model(
                    model, device, _compile_properties(core, device, precision_hint)
                )
            except RuntimeError as exc:
                raise BuildError(
                    f"OpenVINO could not compile model '{config.model_id}' for {device}: {exc}; try another "
                    "precision (NPUs run fp16) or options.device"
                ) from exc
            blob = False
            if _can_export(core, device):
                exported = compiled.export_model()
                data = exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported)
                (out_dir / BLOB_NAME).write_bytes(data)
                blob = True
        finally:
            shutil.rmtree(work, ignore_errors=True)
        info.update(
            {
                "device": device,
                "precision": precision_hint,
                "blob": blob,
                "openvino": package_version("openvino"),
            }
        )
        return info

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        source = _check_config(config)
        device = openvino_device(self._core(), resources, config)
        artifact = artifacts.get(COMPILE_PROFILE)
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=encoder_max_length(source.folder, config.max_seq_len),
            supports_embeddings=True,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.LATENCY
            if device == "CPU"
            else OptimizedFor.ENERGY
            if device.startswith("NPU")
            else OptimizedFor.THROUGHPUT,
            unsupported={
                "chat": "the openvino backend serves encoder embeddings only",
                "completion": "the openvino backend serves encoder embeddings only",
                "streaming": "embeddings are not streamed",
            },
            details={
                "device": device,
                "compiled_blob": bool(artifact is not None and artifact.file(BLOB_NAME).is_file()),
            },
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> OpenVinoSession:
        """Import the compiled blob (or compile the IR) on a new model thread. Raises ConfigError for bad
        config, BuildError when the artifact is missing, and SessionError when OpenVINO cannot load it."""
        _check_config(config)
        core = self._core()
        device = openvino_device(core, resources, config)
        artifact = artifacts.get(COMPILE_PROFILE)
        if artifact is None:
            raise BuildError(
                f"model '{config.model_id}' needs its '{COMPILE_PROFILE}' artifact; build it first "
                "(build_all, or `xpuflow build`) and pass the artifacts to create_session"
            )
        properties = _runtime_properties(core, device, _PRECISION_HINTS[config.precision], config)
        built_for = _flags(artifact.profile)
        blob = artifact.file(BLOB_NAME)
        use_blob = (
            blob.is_file()
            and built_for.get("device") == device
            and built_for.get("precision") == _PRECISION_HINTS[config.precision]
        )
        runner = BlockingRunner(f"openvino-{config.model_id}")

        def load() -> tuple[Any, str]:
            if use_blob:
                try:
                    return core.import_model(io.BytesIO(blob.read_bytes()), device, properties), "blob"
                except RuntimeError as exc:  # another driver or OpenVINO version: compile instead
                    log.warning(
                        "importing %s for %s failed (%s); compiling the IR instead", blob, device, exc
                    )
            return core.compile_model(str(artifact.file(IR_NAME)), device, properties), "ir"

        try:
            compiled, compiled_from = await runner.call(load)
            request = compiled.create_infer_request()
            spec = EncoderSpec.load(artifact.path)
            tokenizer = EncoderTokenizer(artifact.path, spec, max_length=config.max_seq_len)
            try:
                execution_devices = [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]
            except RuntimeError:
                execution_devices = [device]
        except Exception as exc:
            runner.close()
            if isinstance(exc, (ConfigError, BackendUnavailable)):
                raise
            raise SessionError(
                f"OpenVINO could not load model '{config.model_id}' on {device}: {exc}; rebuild the artifact "
                "or choose another options.device"
            ) from exc

        output = spec.output

        def infer(feed: dict[str, Any]) -> Any:
            return request.infer(feed)[output]

        return OpenVinoSession(
            config.model_id,
            resources,
            backend=self.name,
            tokenizer=tokenizer,
            infer=infer,
            runner=runner,
            max_batch_size=config.max_batch_size,
            pooling=check_pooling(config.options, spec.pooling),
            normalize=bool(config.option("normalize", True)),
            device=device,
            execution_devices=execution_devices,
            compiled_from=compiled_from,
        )
