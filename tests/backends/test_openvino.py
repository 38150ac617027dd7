"""The openvino backend: device choice, config errors, and MiniLM compiled for the CPU as an artifact
(IR plus exported compiled model), checked against the torch model."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from xpuflow.artifacts import ArtifactStore, BuildArtifact, build_all
from xpuflow.backends.base import BackendPlugin, BatchMode, ModelConfig
from xpuflow.backends.encoders.openvino import BLOB_NAME, COMPILE_PROFILE, OpenVinoPlugin, openvino_device
from xpuflow.bundled import minilm_path
from xpuflow.errors import BuildError, ConfigError
from xpuflow.types import Resource, ResourceType

CPU = Resource("cpu", ResourceType.CPU, "test CPU")
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, and the whole audience clapped at the end of it for a long time.",
    "x",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
]


def _config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {"model_id": "minilm", "path": minilm_path(), "task": "embedding"}
    values.update(overrides)
    return ModelConfig(**values)


class FakeCore:
    """The slice of ``openvino.Core`` that device choice reads, for machines with GPUs and NPUs."""

    def __init__(self, devices: dict[str, str]) -> None:
        self.devices = devices  # name -> DEVICE_TYPE
        self.available_devices = list(devices)

    def get_property(self, device: str, name: str) -> Any:
        assert name == "DEVICE_TYPE"
        return f"Type.{self.devices[device]}"


# -- devices and config (no model) -------------------------------------------------------------------


def test_device_follows_the_resource() -> None:
    core = FakeCore({"CPU": "INTEGRATED", "GPU.0": "INTEGRATED", "GPU.1": "DISCRETE", "NPU": "INTEGRATED"})
    config = _config()
    assert openvino_device(core, [CPU], config) == "CPU"
    assert openvino_device(core, [], config) == "CPU"
    assert openvino_device(core, [Resource("igpu:0", ResourceType.IGPU)], config) == "GPU.0"
    assert openvino_device(core, [Resource("xe:0", ResourceType.GPU)], config) == "GPU.1"
    assert openvino_device(core, [Resource("npu:0", ResourceType.NPU)], config) == "NPU"
    assert openvino_device(core, [CPU], _config(options={"device": "AUTO:GPU.1,CPU"})) == "AUTO:GPU.1,CPU"
    with pytest.raises(ConfigError, match="cannot run on pim:0"):
        openvino_device(core, [Resource("pim:0", ResourceType.PIM)], config)


def test_unavailable_device_is_a_config_error_listing_what_is_there() -> None:
    core = FakeCore({"CPU": "INTEGRATED"})
    with pytest.raises(ConfigError, match="'NPU' is not available here; available: CPU"):
        openvino_device(core, [Resource("npu:0", ResourceType.NPU)], _config())
    with pytest.raises(ConfigError, match="'GPU' is not available"):
        openvino_device(core, [CPU], _config(options={"device": "AUTO:GPU,CPU"}))


def test_bad_inputs_are_config_errors(tmp_path: Path) -> None:
    plugin = OpenVinoPlugin()
    cases: Sequence[tuple[ModelConfig, str]] = [
        (_config(path=tmp_path / "missing"), "does not exist"),
        (_config(path=tmp_path), r"no config\.json"),
        (_config(precision="int8"), "fp32, bf16 or fp16"),
        (_config(precision="fp64"), "fp32, bf16 or fp16"),
        (_config(options={"cache_dir": "/tmp"}), "unknown openvino option"),
        (_config(options={"performance_hint": "FAST"}), "performance_hint"),
        (_config(task="completion"), "embeddings only"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            plugin.required_build_profiles([CPU], config)


def test_profile_is_per_device_and_precision() -> None:
    plugin = OpenVinoPlugin()
    (fp32,) = plugin.required_build_profiles([CPU], _config())
    (bf16,) = plugin.required_build_profiles([CPU], _config(precision="bf16"))
    assert fp32.name == bf16.name == COMPILE_PROFILE
    assert "device=CPU" in fp32.flags
    assert "precision=f32" in fp32.flags
    assert "precision=bf16" in bf16.flags
    assert any(flag.startswith("device_name=") for flag in fp32.flags)
    assert fp32.compiler_version.startswith("openvino ")


def test_session_without_its_artifact_is_a_build_error() -> None:
    with pytest.raises(BuildError, match=COMPILE_PROFILE):
        asyncio.run(OpenVinoPlugin().create_session([CPU], _config(), {}))


def test_availability_lists_devices_and_probe_keeps_the_cpu() -> None:
    plugin = OpenVinoPlugin()
    assert isinstance(plugin, BackendPlugin)
    status = plugin.availability()
    assert status.available, status.reason
    assert "CPU" in status.reason
    nvidia = Resource("cuda:0", ResourceType.GPU, attributes={"vendor": "nvidia"})
    assert plugin.probe([CPU, nvidia]) == [CPU]


# -- MiniLM compiled for the CPU ------------------------------------------------------------------------


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def torch_reference(texts: Sequence[str]) -> list[list[float]]:
    """sentence-transformers' recipe for all-MiniLM-L6-v2: mean over real tokens, then unit length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    out = []
    for text in texts:
        with torch.inference_mode():
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state
        out.append(torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0].tolist())
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import torch

    torch.set_num_threads(1)
    plugin = OpenVinoPlugin()
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    config = _config(max_batch_size=2, options={"num_threads": 1})
    built = build_all(plugin, [CPU], config, store)
    again = build_all(plugin, [CPU], config, store)
    session = asyncio.run(plugin.create_session([CPU], config, again))
    yield SimpleNamespace(
        plugin=plugin,
        config=config,
        built=built,
        artifacts=again,
        session=session,
        reference=torch_reference(TEXTS),
        tmp=tmp_path_factory.mktemp("copies"),
    )
    asyncio.run(session.close())


@pytest.mark.slow
def test_compiled_artifact_is_built_once_then_imported(minilm: SimpleNamespace) -> None:
    assert minilm.built[COMPILE_PROFILE].metadata["hit"] is False
    artifact = minilm.artifacts[COMPILE_PROFILE]
    assert artifact.metadata["hit"] is True
    assert {"model.xml", "model.bin", BLOB_NAME, "tokenizer.json", "encoder.json"} <= set(
        artifact.metadata["sha256"]
    )
    assert artifact.metadata["info"]["blob"] is True
    assert minilm.session.compiled_from == "blob"
    assert minilm.session.device == "CPU"
    assert minilm.session.execution_devices == ("CPU",)
    capability = minilm.plugin.get_capability([CPU], minilm.config, minilm.artifacts)
    assert capability.details == {"device": "CPU", "compiled_blob": True}
    assert capability.supports_embeddings


@pytest.mark.slow
def test_embeddings_match_torch(minilm: SimpleNamespace) -> None:
    assert minilm.session.batch_mode is BatchMode.NATIVE
    vectors = asyncio.run(minilm.session.embed(TEXTS))
    for vector, reference in zip(vectors, minilm.reference, strict=True):
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
        assert cosine(vector, reference) > 0.999
    assert cosine(vectors[0], vectors[3]) > cosine(vectors[0], vectors[4])


def _copy_artifact(artifact: BuildArtifact, where: Path) -> BuildArtifact:
    copy = where / artifact.id
    shutil.copytree(artifact.path, copy)
    return dataclasses.replace(artifact, path=copy)


@pytest.mark.slow
def test_unusable_blob_falls_back_to_compiling_the_ir(minilm: SimpleNamespace) -> None:
    broken = _copy_artifact(minilm.artifacts[COMPILE_PROFILE], minilm.tmp)
    broken.file(BLOB_NAME).write_bytes(b"a blob from another driver")

    async def go() -> tuple[str, list[list[float]]]:
        session = await minilm.plugin.create_session([CPU], minilm.config, {COMPILE_PROFILE: broken})
        async with session:
            return session.compiled_from, await session.embed(TEXTS[:2])

    compiled_from, vectors = asyncio.run(go())
    assert compiled_from == "ir"
    for vector, reference in zip(vectors, minilm.reference, strict=False):
        assert cosine(vector, reference) > 0.999


@pytest.mark.slow
def test_other_precision_compiles_the_ir_instead_of_importing(minilm: SimpleNamespace) -> None:
    config = _config(precision="bf16")

    async def go() -> tuple[str, list[list[float]]]:
        session = await minilm.plugin.create_session([CPU], config, minilm.artifacts)
        async with session:
            return session.compiled_from, await session.embed(TEXTS)

    compiled_from, vectors = asyncio.run(go())
    assert compiled_from == "ir"  # the blob was compiled for f32: never imported for bf16
    for vector, reference in zip(vectors, minilm.reference, strict=True):
        assert cosine(vector, reference) > 0.99  # bf16 arithmetic where the CPU has it
