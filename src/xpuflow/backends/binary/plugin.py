"""The ``binary`` backend: models compiled and run by a binary-only vendor stack described by a spec.

A vendor NPU often ships only a compiler CLI and a C runtime library. This plugin drives both from the
stack's spec file (see ``binary_spec.py``): ``BinaryCompilerAdapter`` builds the engine into the
artifact store, ``BinaryRuntimeAdapter`` loads it and runs batches natively on the device. Models are
tensor models (``task: tensor``) in xpuflow's MLP export format (``xpuflow.vendor_ref.export_mlp``),
or any format the vendor compiler reads when ``options.input_dim``/``options.output_dim`` are given.

Deployment options:

- ``spec``: path of the vendor's spec file, or ``reference`` (the default) for the reference stack
  that xpuflow builds from C with the host compiler. The reference "NPU" is emulated on the host: the
  runtime computes on the CPU, which is why this plugin offers the CPU for it.
- ``compile``: values of the compile options the spec declares, e.g. ``{opt_level: 1}``.
- ``input_dim`` / ``output_dim``: row widths, when the model is not an xpuflow MLP export.

::

    plugin = BinaryPlugin()
    config = ModelConfig("mlp", path="mlp.xpfmlp", task="tensor", options={"spec": "reference"})
    artifacts = build_all(plugin, [cpu], config, ArtifactStore())
    async with await plugin.create_session([cpu], config, artifacts) as session:
        y = await session.run(x)           # (batch, in_dim) float32 -> (batch, out_dim)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources as package_files
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xpuflow.artifacts.digest import file_sha256
from xpuflow.artifacts.profile import BuildArtifact, BuildInterface, BuildProfile
from xpuflow.backends.base import Availability, BatchMode, ModelConfig, ModelTask, Session
from xpuflow.backends.binary.compiler import BinaryCompilerAdapter
from xpuflow.backends.binary.runtime import BinaryRuntimeAdapter, LoadedEngine
from xpuflow.backends.binary.spec import BinarySpec, DeviceSpec, SpecFile, load_spec, parse_spec
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.remote.oip_client import ModelMetadata, TensorSpec
from xpuflow.errors import BuildError, CapabilityError, ConfigError, SessionError, XpuflowError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["ENGINE_PROFILE", "REFERENCE_SPEC", "BinaryPlugin", "BinarySession"]

#: The value of ``options.spec`` that selects the reference stack.
REFERENCE_SPEC = "reference"
#: The one build profile of this plugin.
ENGINE_PROFILE = "engine"
#: Written next to the engine: the row widths the session needs (C engines rarely describe themselves).
IO_FILE = "io.json"

_NPU_ID = re.compile(r"^npu:(\d+)$")


@cache
def _packaged_reference_spec() -> BinarySpec:
    """The reference spec as shipped, for questions that need no built stack (devices, limits)."""
    text = package_files.files("xpuflow.vendor_ref").joinpath("refnpu.spec.yaml").read_text("utf-8")
    return parse_spec(yaml.safe_load(text), "refnpu.spec.yaml (packaged)")


def _serves(resource: Resource, device: DeviceSpec) -> bool:
    if device.emulated_on_host and resource.type == ResourceType.CPU:
        return True
    if resource.type.value != device.resource_type:
        return False
    return not device.vendors or resource.vendor in device.vendors


def _device_index(resources: Sequence[Resource]) -> int:
    for resource in resources:
        if "device_index" in resource.attributes:
            return int(resource.attributes["device_index"])
        match = _NPU_ID.match(resource.id)
        if match:
            return int(match.group(1))
    return 0  # the host-emulated device of a stack running on the CPU


TENSOR_INPUT, TENSOR_OUTPUT = "input", "output"  # its names over the Open Inference Protocol


class BinarySession(Session):
    """An engine loaded on a vendor runtime; ``run`` takes (batch, in_dim) or (in_dim,) floats.

    Every runtime call happens on the session's one BlockingRunner thread, the way vendor runtimes
    expect. Batches larger than ``max_batch_size`` are split and their results concatenated.
    """

    batch_mode = BatchMode.NATIVE

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        *,
        spec_file: SpecFile,
        engine_path: Path,
        input_dim: int,
        output_dim: int,
        max_batch_size: int,
    ) -> None:
        super().__init__(model_id, resources)
        self.spec_file = spec_file
        self.engine_path = engine_path
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.max_batch_size = max_batch_size
        self.device_index = _device_index(resources)
        self._runtime = BinaryRuntimeAdapter(spec_file)
        self._engine: LoadedEngine | None = None
        self._runner = BlockingRunner(f"binary-{model_id}")

    async def start(self) -> BinarySession:
        """Open the device and load the engine. On failure everything opened so far is released."""
        try:
            await self._runner.call(self._open)
        except BaseException:
            await self.close()
            raise
        return self

    def _open(self) -> None:
        self._runtime.open(self.device_index)
        self._engine = self._runtime.load_engine(self.engine_path)

    def _run_blocking(self, rows: np.ndarray) -> np.ndarray:
        assert self._engine is not None  # start() succeeded or the session is closed
        chunks = [
            self._runtime.run(self._engine, rows[i : i + self.max_batch_size], self.output_dim)
            for i in range(0, rows.shape[0], self.max_batch_size)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    async def metadata(self) -> ModelMetadata:
        """The model's one input and one output, for the Open Inference Protocol's model metadata."""
        return ModelMetadata(
            self.model_id,
            "xpuflow_binary",
            ("1",),
            (TensorSpec(TENSOR_INPUT, "FP32", (-1, self.input_dim)),),
            (TensorSpec(TENSOR_OUTPUT, "FP32", (-1, self.output_dim)),),
        )

    async def run(self, inputs: Any) -> Any:
        """Outputs for ``inputs``: (batch, in_dim) -> (batch, out_dim) float32, (in_dim,) -> (out_dim,).
        Named inputs (the Open Inference Protocol's ``{"input": rows}``, one entry) give named outputs
        (``{"output": ...}``)."""
        if self.closed or self._engine is None:
            raise SessionError(f"session for model '{self.model_id}' is closed")
        if isinstance(inputs, Mapping):
            if len(inputs) != 1:
                raise ConfigError(
                    f"model '{self.model_id}' takes one input ('{TENSOR_INPUT}', FP32 rows of "
                    f"{self.input_dim}), got {len(inputs)}: {', '.join(map(str, inputs))}",
                    field="inputs",
                )
            return {TENSOR_OUTPUT: await self.run(next(iter(inputs.values())))}
        rows = np.ascontiguousarray(inputs, dtype=np.float32)
        single = rows.ndim == 1
        if single:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] != self.input_dim or rows.shape[0] == 0:
            raise ConfigError(
                f"model '{self.model_id}' takes rows of {self.input_dim} values, got an array of shape "
                f"{np.shape(inputs)}",
                field="inputs",
            )
        out = await self._runner.call(self._run_blocking, rows)
        return out[0] if single else out

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._runner.call(self._runtime.close)
        finally:
            self._runner.close()


class BinaryPlugin:
    """Drives binary-only vendor stacks from their spec files. ``spec`` sets the plugin-wide default
    (``probe`` answers for it); a deployment's ``options.spec`` overrides it."""

    name = "binary"

    def __init__(
        self,
        spec: str | os.PathLike[str] | None = None,
        *,
        reference_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._default_spec = str(spec) if spec is not None else REFERENCE_SPEC
        self._reference_dir = reference_dir
        self._reference_spec: Path | None = None
        self._specs: dict[Path, tuple[tuple[int, int], SpecFile]] = {}
        self._compilers: dict[str, BinaryCompilerAdapter] = {}

    # -- specs -------------------------------------------------------------------------------------

    def _spec_value(self, config: ModelConfig | None) -> str:
        value = config.option("spec", self._default_spec) if config is not None else self._default_spec
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError("options.spec must be a spec file path or 'reference'", field="options.spec")
        return str(value)

    def spec_file(self, config: ModelConfig | None = None) -> SpecFile:
        """The deployment's validated spec; ``reference`` builds the reference stack on first use."""
        value = self._spec_value(config)
        if value == REFERENCE_SPEC:
            if self._reference_spec is None:
                from xpuflow.vendor_ref.build import reference_stack

                self._reference_spec = reference_stack(self._reference_dir).spec
            path = self._reference_spec
        else:
            path = Path(value).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            raise ConfigError(
                f"binary spec {path} does not exist; set options.spec to the vendor's spec file",
                field="options.spec",
            ) from exc
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._specs.get(path)
        if cached is None or cached[0] != key:
            cached = (key, load_spec(path))
            self._specs[path] = cached
        return cached[1]

    def _device_spec(self, config: ModelConfig | None) -> DeviceSpec:
        if self._spec_value(config) == REFERENCE_SPEC:
            return _packaged_reference_spec().device
        return self.spec_file(config).spec.device

    def compiler(self, config: ModelConfig | None = None) -> BinaryCompilerAdapter:
        spec_file = self.spec_file(config)
        cache_key = f"{spec_file.path}:{spec_file.sha256}"
        adapter = self._compilers.get(cache_key)
        if adapter is None:
            adapter = self._compilers[cache_key] = BinaryCompilerAdapter(spec_file)
        return adapter

    # -- the plugin contract -----------------------------------------------------------------------

    def availability(self) -> Availability:
        """Always answers, never raises. The plugin itself needs nothing; a plugin-wide vendor spec is
        checked by running its compiler's version command."""
        if self._default_spec == REFERENCE_SPEC:
            from xpuflow.vendor_ref.build import find_c_compiler

            cc = find_c_compiler()
            reference = (
                f"the reference NPU stack (emulated on the host CPU) builds with {cc[0]}"
                if cc
                else "the reference NPU stack needs a C compiler (install gcc or set CC)"
            )
            return Availability(True, f"drives vendor stacks named by options.spec; {reference}")
        try:
            compiler = self.compiler()
            version = compiler.version()
        except XpuflowError as exc:
            return Availability(False, str(exc))
        except Exception as exc:  # availability never raises
            return Availability(False, f"{type(exc).__name__}: {exc}")
        return Availability(True, f"{self.spec_file().spec.name}: {compiler.name} {version}", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """Resources of the plugin-wide spec's kind and vendors, plus the CPU for a stack emulated on
        the host (the reference stack). Never raises."""
        try:
            device = self._device_spec(None)
        except Exception:
            return []
        return [r for r in resources if _serves(r, device)]

    def _check_task(self, config: ModelConfig) -> None:
        if config.task != ModelTask.TENSOR:
            raise ConfigError(
                f"backend 'binary' serves task 'tensor' only; model '{config.model_id}' has task "
                f"'{config.task.value}'",
                field="task",
            )

    def _profile_flags(self, compiler: BinaryCompilerAdapter, config: ModelConfig) -> tuple[str, ...]:
        params = compiler.resolve_params(self._compile_options(config))
        flags = []
        for name, given in sorted(params.items()):
            value = given
            if compiler.spec.params[name].type == "path" and config.path is not None:
                # A path's content matters, not its name: a changed calibration file rebuilds.
                try:
                    digest = file_sha256(config.path.parent / given)
                except OSError as exc:
                    raise ConfigError(
                        f"compile.{name}: cannot read {value}: {exc.strerror or exc}", field=f"compile.{name}"
                    ) from exc
                value = f"{value}@sha256:{digest[:16]}"
            flags.append(f"{name}={value}")
        # What shapes the engine enters the key; timeouts and the version command do not.
        shaping = compiler.spec.model_dump(mode="json", include={"argv", "params", "outputs", "env"})
        template = json.dumps(shaping, sort_keys=True)
        flags.append(f"template={hashlib.sha256(template.encode()).hexdigest()[:16]}")
        return tuple(flags)

    @staticmethod
    def _compile_options(config: ModelConfig) -> Mapping[str, Any]:
        options = config.option("compile", {})
        if not isinstance(options, Mapping):
            raise ConfigError("options.compile must be a mapping of compile options", field="options.compile")
        return options

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """One CLI profile, ``engine``: the compiler's name and version, and the compile options."""
        self._check_task(config)
        if config.path is None:
            raise ConfigError(f"model '{config.model_id}' needs a model path to compile", field="model")
        spec_file = self.spec_file(config)
        compiler = self.compiler(config)
        return [
            BuildProfile(
                name=ENGINE_PROFILE,
                target=ResourceType(spec_file.spec.device.resource_type),
                compiler=compiler.name,
                compiler_version=compiler.version(),
                flags=self._profile_flags(compiler, config),
                interface=BuildInterface.CLI,
                backend=self.name,
                description=f"{spec_file.spec.name} engine built by {compiler.name}",
            )
        ]

    def _io_dims(self, config: ModelConfig) -> tuple[int, int]:
        in_dim, out_dim = config.option("input_dim"), config.option("output_dim")
        if in_dim is not None or out_dim is not None:
            if not (isinstance(in_dim, int) and isinstance(out_dim, int) and in_dim >= 1 and out_dim >= 1):
                raise ConfigError("options.input_dim and options.output_dim go together, as positive ints",
                                  field="options.input_dim")  # fmt: skip
            return in_dim, out_dim
        from xpuflow.vendor_ref.export import read_mlp_info

        assert config.path is not None
        info = read_mlp_info(config.path)
        return info.input_dim, info.output_dim

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        """Run the vendor compiler into ``out_dir``; returns the build's metadata."""
        if profile.name != ENGINE_PROFILE:
            raise BuildError(f"backend 'binary' has no build profile '{profile.name}'")
        self._check_task(config)
        if config.path is None:
            raise ConfigError(f"model '{config.model_id}' needs a model path to compile", field="model")
        compiler = self.compiler(config)
        current = (compiler.version(), self._profile_flags(compiler, config))
        if (profile.compiler_version, profile.flags) != current:
            raise BuildError(
                f"build profile of '{config.model_id}' no longer matches its spec or compiler "
                f"(profile {profile.compiler_version} {list(profile.flags)}, now {current[0]} "
                f"{list(current[1])}); ask required_build_profiles again"
            )
        input_dim, output_dim = self._io_dims(config)
        result = compiler.compile(
            config.path, out_dir, self._compile_options(config), allowed_dirs=[config.path.parent]
        )
        io = {"input_dim": input_dim, "output_dim": output_dim}
        (out_dir / IO_FILE).write_text(json.dumps(io))
        return {**result.to_metadata(), **io, "spec": self.spec_file(config).spec.name}

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        device = self._device_spec(config)
        unsupported = {
            "chat": "binary vendor stacks run tensor models only",
            "completion": "binary vendor stacks run tensor models only",
            "embeddings": "binary vendor stacks run tensor models only",
            "streaming": "a tensor model answers a batch at once",
            "kv_cache": "a tensor model keeps no state between calls",
        }
        if config.task != ModelTask.TENSOR:
            unsupported["task"] = f"backend 'binary' serves task 'tensor' only, not '{config.task.value}'"
        refused = [r.id for r in resources if not _serves(r, device)]
        if refused:
            unsupported["resources"] = (
                f"the spec drives {device.resource_type} devices"
                + (f" of vendors {device.vendors}" if device.vendors else "")
                + (" (or the host CPU)" if device.emulated_on_host else "")
                + f"; not {', '.join(refused)}"
            )
        return Capability(
            max_batch_size=min(config.max_batch_size, device.max_batch_size),
            max_seq_len=1,
            dtypes=("fp32",),
            optimized_for=OptimizedFor(device.optimized_for),
            unsupported=unsupported,
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Session:
        """Open the device and load the engine from ``artifacts['engine']`` (see ``build_all``)."""
        self._check_task(config)
        artifact = artifacts.get(ENGINE_PROFILE)
        if artifact is None:
            raise BuildError(
                f"model '{config.model_id}' has no '{ENGINE_PROFILE}' artifact; build it first with build_all"
            )
        spec_file = self.spec_file(config)
        output = next(
            o for o in spec_file.spec.compiler.outputs if o.name == spec_file.spec.runtime.engine_output
        )
        try:
            io = json.loads(artifact.file(IO_FILE).read_text())
            input_dim, output_dim = int(io["input_dim"]), int(io["output_dim"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"artifact {artifact.id} lacks a valid {IO_FILE}; rebuild it") from exc
        capability = self.get_capability(resources, config, artifacts)
        if "resources" in capability.unsupported:
            raise CapabilityError(
                f"model '{config.model_id}' cannot run there: {capability.unsupported['resources']}",
                reasons=[capability.unsupported["resources"]],
            )
        session = BinarySession(
            config.model_id,
            resources,
            spec_file=spec_file,
            engine_path=artifact.file(output.file),
            input_dim=input_dim,
            output_dim=output_dim,
            max_batch_size=capability.max_batch_size,
        )
        return await session.start()
