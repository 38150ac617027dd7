"""The onnxruntime backend: provider choice, config errors, and MiniLM exported to ONNX as an artifact,
checked against the torch model."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from xpuflow.artifacts import ArtifactStore, build_all
from xpuflow.backends.base import BackendPlugin, BatchMode, GenerationParams, ModelConfig
from xpuflow.backends.encoders.onnxruntime import (
    CPU_PROVIDER,
    EXPORT_PROFILE,
    OnnxRuntimePlugin,
    choose_providers,
)
from xpuflow.bundled import minilm_path
from xpuflow.errors import BackendError, BuildError, ConfigError
from xpuflow.types import Resource, ResourceType

CPU = Resource("cpu", ResourceType.CPU, "test CPU")
NVIDIA = Resource("cuda:1", ResourceType.GPU, "GPU", {"vendor": "nvidia", "index": 1})
INTEL_NPU = Resource("npu:0", ResourceType.NPU, "NPU", {"vendor": "intel"})
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


# -- providers and config (no model) -----------------------------------------------------------------


def test_cpu_only_gets_the_cpu_provider() -> None:
    assert choose_providers([CPU], ["CPUExecutionProvider"]) == [(CPU_PROVIDER, {})]


def test_gpu_gets_its_provider_with_its_device_id_then_cpu() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers([NVIDIA], available) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        (CPU_PROVIDER, {}),
    ]


def test_missing_accelerator_provider_falls_back_to_cpu() -> None:
    assert choose_providers([NVIDIA], ["CPUExecutionProvider"]) == [(CPU_PROVIDER, {})]
    amd = Resource("rocm:0", ResourceType.GPU, attributes={"vendor": "amd"})
    assert choose_providers([amd], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [(CPU_PROVIDER, {})]


def test_npu_gets_openvino_with_the_npu_device_type() -> None:
    available = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers([INTEL_NPU], available)[0] == (
        "OpenVINOExecutionProvider",
        {"device_type": "NPU"},
    )


def test_explicit_providers_win_and_must_be_available() -> None:
    available = ["DmlExecutionProvider", "CPUExecutionProvider"]
    chosen = choose_providers([CPU], available, [["DmlExecutionProvider", {"device_id": 0}]])
    assert chosen == [("DmlExecutionProvider", {"device_id": 0}), (CPU_PROVIDER, {})]
    with pytest.raises(ConfigError, match="not in this onnxruntime build"):
        choose_providers([CPU], available, ["TensorrtExecutionProvider"])
    with pytest.raises(ConfigError, match="names or"):
        choose_providers([CPU], available, [42])


def test_bad_inputs_are_config_errors(tmp_path: Path) -> None:
    plugin = OnnxRuntimePlugin()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    cases: Sequence[tuple[ModelConfig, str]] = [
        (_config(path=tmp_path / "missing"), "does not exist"),
        (_config(path=None), "needs a model path"),
        (_config(path=tmp_path), r"no config\.json"),
        (_config(path=tmp_path / "weights.bin"), r"not a \.onnx file"),
        (_config(task="chat"), "embeddings only"),
        (_config(precision="fp16"), "use precision fp32"),
        (_config(precision="fp64"), "use precision fp32"),
        (_config(options={"threads": 2}), "unknown onnxruntime option"),
        (_config(options={"graph_optimization": "max"}), "graph_optimization"),
        (_config(options={"pooling": "max"}), "pooling"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            plugin.required_build_profiles([CPU], config)


def test_onnx_file_without_a_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        OnnxRuntimePlugin().required_build_profiles([CPU], _config(path=tmp_path / "model.onnx"))


def test_hf_folder_needs_the_export_profile() -> None:
    (profile,) = OnnxRuntimePlugin().required_build_profiles([CPU], _config())
    assert profile.name == EXPORT_PROFILE
    assert profile.backend == "onnxruntime"
    assert "opset=17" in profile.flags
    assert "torch " in profile.compiler_version


def test_session_without_the_export_artifact_is_a_build_error() -> None:
    with pytest.raises(BuildError, match=EXPORT_PROFILE):
        asyncio.run(OnnxRuntimePlugin().create_session([CPU], _config(), {}))


def test_availability_and_probe() -> None:
    plugin = OnnxRuntimePlugin()
    assert isinstance(plugin, BackendPlugin)
    status = plugin.availability()
    assert status.available, status.reason
    assert CPU_PROVIDER in status.reason
    pim = Resource("pim:0", ResourceType.PIM)
    assert plugin.probe([CPU, pim]) == [CPU]


# -- MiniLM exported to ONNX ----------------------------------------------------------------------------


def torch_reference(texts: Sequence[str]) -> list[list[float]]:
    """sentence-transformers' recipe for all-MiniLM-L6-v2: mean over real tokens, then unit length."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    out = []
    for text in texts:
        with torch.inference_mode():
            encoded = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
        out.append(torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0].tolist())
    return out


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import torch

    torch.set_num_threads(1)
    plugin = OnnxRuntimePlugin()
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    # max_batch_size 2 so that five texts run as three padded batches, sorted by length.
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
    )
    asyncio.run(session.close())


@pytest.mark.slow
def test_export_is_built_once_then_hit(minilm: SimpleNamespace) -> None:
    assert minilm.built[EXPORT_PROFILE].metadata["hit"] is False
    artifact = minilm.artifacts[EXPORT_PROFILE]
    assert artifact.metadata["hit"] is True
    assert {"model.onnx", "tokenizer.json", "encoder.json"} <= set(artifact.metadata["sha256"])
    assert set(artifact.metadata["info"]["inputs"]) == {"input_ids", "token_type_ids", "attention_mask"}


@pytest.mark.slow
def test_embeddings_match_torch(minilm: SimpleNamespace) -> None:
    session = minilm.session
    assert session.batch_mode is BatchMode.NATIVE
    vectors = asyncio.run(session.embed(TEXTS))
    assert len(vectors) == len(TEXTS)
    for vector, reference in zip(vectors, minilm.reference, strict=True):
        assert len(vector) == 384
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
        assert cosine(vector, reference) > 0.999
    assert cosine(vectors[0], vectors[3]) > cosine(vectors[0], vectors[4])


@pytest.mark.slow
def test_embed_batch_splits_per_request_and_empty_input(minilm: SimpleNamespace) -> None:
    async def go() -> tuple[Any, Any, Any]:
        whole = await minilm.session.embed(TEXTS)
        split = await minilm.session.embed_batch([TEXTS[:2], [], TEXTS[2:]])
        return whole, split, await minilm.session.embed([])

    whole, split, empty = asyncio.run(go())
    assert [len(part) for part in split] == [2, 0, 3]
    flat = [v for part in split for v in part]
    for a, b in zip(flat, whole, strict=True):
        assert cosine(a, b) > 0.99999
    assert empty == []


@pytest.mark.slow
def test_long_input_is_truncated_and_non_text_refused(minilm: SimpleNamespace) -> None:
    (vector,) = asyncio.run(minilm.session.embed(["word " * 2000]))
    assert len(vector) == 384
    with pytest.raises(ConfigError, match="not text"):
        asyncio.run(minilm.session.embed([3]))  # type: ignore[list-item]
    with pytest.raises(BackendError, match="chat"):
        asyncio.run(minilm.session.chat([{"role": "user", "content": "hi"}], GenerationParams()))


@pytest.mark.slow
def test_providers_are_recorded(minilm: SimpleNamespace) -> None:
    assert minilm.session.providers == (CPU_PROVIDER,)
    capability = minilm.plugin.get_capability([CPU], minilm.config, minilm.artifacts)
    assert capability.details["execution_providers"] == [CPU_PROVIDER]
    assert capability.supports_embeddings
    assert not capability.supports_chat
    assert capability.max_seq_len == 256  # the model's own limit, below the configured 2048
    import onnxruntime

    gpu_capability = minilm.plugin.get_capability([NVIDIA, CPU], minilm.config, minilm.artifacts)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "cuda:1" in gpu_capability.unsupported  # a "no" with its reason
        assert gpu_capability.details["execution_providers"] == [CPU_PROVIDER]


@pytest.mark.slow
def test_a_ready_onnx_file_runs_without_a_build(minilm: SimpleNamespace) -> None:
    onnx_file = minilm.artifacts[EXPORT_PROFILE].file("model.onnx")
    config = _config(path=onnx_file)
    assert minilm.plugin.required_build_profiles([CPU], config) == []

    async def go() -> list[list[float]]:
        session = await minilm.plugin.create_session([CPU], config, {})
        async with session:
            return await session.embed(TEXTS[:2])

    for vector, reference in zip(asyncio.run(go()), minilm.reference, strict=False):
        assert cosine(vector, reference) > 0.999
