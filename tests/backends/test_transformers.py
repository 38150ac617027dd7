"""The transformers backend: config errors, the streaming text helpers, SmolLM2 (GGUF) through its
``gguf-dequant`` artifact, and MiniLM embeddings."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from xpuflow.artifacts import ArtifactStore, build_all
from xpuflow.backends.base import BackendPlugin, BatchMode, GenerationParams, ModelConfig
from xpuflow.backends.token_stream import StopFilter, cut_at_stop
from xpuflow.backends.transformers.plugin import (
    DEQUANT_PROFILE,
    TransformersPlugin,
    torch_device,
)
from xpuflow.bundled import minilm_path, smollm2_gguf_path
from xpuflow.errors import BackendError, BuildError, ConfigError
from xpuflow.types import Resource, ResourceType

CPU = Resource("cpu", ResourceType.CPU, "test CPU")
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far far away, there lived a",
    "1, 2, 3,",
]


def _chat_config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {"model_id": "smollm2", "path": smollm2_gguf_path(), "task": "chat"}
    values.update(overrides)
    return ModelConfig(**values)


# -- config and helpers (no model) -------------------------------------------------------------------


def test_missing_model_path_is_a_config_error(tmp_path: Path) -> None:
    plugin = TransformersPlugin()
    with pytest.raises(ConfigError, match="does not exist"):
        plugin.required_build_profiles([CPU], _chat_config(path=tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="needs a model path"):
        plugin.required_build_profiles([CPU], _chat_config(path=None))


def test_folder_without_config_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        TransformersPlugin().required_build_profiles([CPU], _chat_config(path=tmp_path))


def test_file_that_is_not_gguf_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        TransformersPlugin().required_build_profiles([CPU], _chat_config(path=bogus))


@pytest.mark.parametrize("precision", ["int4", "fp64"])
def test_unknown_or_unsupported_precision_is_a_config_error(precision: str) -> None:
    with pytest.raises(ConfigError, match="fp32, bf16 or fp16") as info:
        TransformersPlugin().required_build_profiles([CPU], _chat_config(precision=precision))
    assert info.value.field == "precision"


def test_fp16_on_the_cpu_is_refused_with_the_alternative() -> None:
    with pytest.raises(ConfigError, match="use bf16 or fp32"):
        TransformersPlugin().required_build_profiles([CPU], _chat_config(precision="fp16"))


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="num_threads"):
        TransformersPlugin().required_build_profiles([CPU], _chat_config(options={"n_gpu_layers": 3}))


def test_gguf_embedding_task_is_refused() -> None:
    with pytest.raises(ConfigError, match="embeddings"):
        TransformersPlugin().required_build_profiles([CPU], _chat_config(task="embedding"))


def test_gguf_needs_the_dequant_profile_and_a_folder_needs_none() -> None:
    plugin = TransformersPlugin()
    (profile,) = plugin.required_build_profiles([CPU], _chat_config())
    assert profile.name == DEQUANT_PROFILE
    assert profile.compiler == "transformers"
    assert "transformers " in profile.compiler_version
    assert "torch " in profile.compiler_version
    assert profile.target is ResourceType.CPU  # dequantised weights serve every device
    encoder = ModelConfig("minilm", path=minilm_path(), task="embedding")
    assert plugin.required_build_profiles([CPU], encoder) == []


def test_gguf_session_without_its_artifact_is_a_build_error() -> None:
    with pytest.raises(BuildError, match=DEQUANT_PROFILE):
        asyncio.run(TransformersPlugin().create_session([CPU], _chat_config(), {}))


def test_torch_device_names() -> None:
    assert torch_device(CPU) == "cpu"
    assert torch_device(Resource("cuda:1", ResourceType.GPU)) == "cuda:1"
    assert torch_device(Resource("rocm:0", ResourceType.GPU)) == "cuda:0"  # ROCm torch says "cuda"
    assert torch_device(Resource("mps:0", ResourceType.IGPU)) == "mps"
    assert torch_device(Resource("xpu:0", ResourceType.GPU)) == "xpu:0"
    assert torch_device(Resource("npu:0", ResourceType.NPU)) is None


def test_availability_and_probe() -> None:
    plugin = TransformersPlugin()
    assert isinstance(plugin, BackendPlugin)
    status = plugin.availability()
    assert status.available, status.reason
    assert status.version
    npu = Resource("npu:0", ResourceType.NPU)
    assert plugin.probe([CPU, npu]) == [CPU]


def test_stop_filter_holds_back_a_possible_stop_string() -> None:
    stops = StopFilter(["</end>"])
    assert stops.feed("hello <") == ("hello ", False)  # "<" may begin the stop string
    assert stops.feed("/e") == ("", False)
    assert stops.feed("nd> more") == ("", True)
    other = StopFilter(["\n\n"])
    assert other.feed("a\n") == ("a", False)
    assert other.feed("b") == ("\nb", False)
    assert other.flush() == ""
    assert cut_at_stop("one. two. three", [".", "two"]) == ("one", True)
    assert cut_at_stop("no stops", []) == ("no stops", False)


# -- SmolLM2 through the gguf-dequant artifact ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    import torch

    torch.set_num_threads(1)
    plugin = TransformersPlugin()
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    config = _chat_config(max_batch_size=4)
    start = time.perf_counter()
    built = build_all(plugin, [CPU], config, store)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    again = build_all(plugin, [CPU], config, store)
    hit_s = time.perf_counter() - start
    start = time.perf_counter()
    session = asyncio.run(plugin.create_session([CPU], config, again))
    load_s = time.perf_counter() - start
    yield SimpleNamespace(
        plugin=plugin,
        store=store,
        config=config,
        built=built,
        artifacts=again,
        session=session,
        build_s=build_s,
        hit_s=hit_s,
        load_s=load_s,
    )
    asyncio.run(session.close())


@pytest.mark.slow
def test_gguf_is_dequantised_once_then_served_from_the_artifact(
    smollm2: SimpleNamespace, record_property: Any
) -> None:
    first, second = smollm2.built[DEQUANT_PROFILE], smollm2.artifacts[DEQUANT_PROFILE]
    print(
        f"gguf-dequant build {smollm2.build_s:.2f} s, artifact hit {smollm2.hit_s:.3f} s, "
        f"session load from the artifact {smollm2.load_s:.2f} s"
    )
    record_property("build_s", round(smollm2.build_s, 3))
    record_property("hit_s", round(smollm2.hit_s, 3))
    record_property("load_s", round(smollm2.load_s, 3))
    assert first.metadata["hit"] is False
    assert second.metadata["hit"] is True
    assert second.id == first.id
    files = set(second.metadata["sha256"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert second.metadata["info"]["chat_template"] is True
    capability = smollm2.plugin.get_capability([CPU], smollm2.config, smollm2.artifacts)
    assert capability.supports_chat
    assert capability.supports_streaming
    assert capability.max_batch_size == 4
    assert capability.details["source"] == "gguf"


@pytest.mark.slow
def test_chat_answers_paris(smollm2: SimpleNamespace) -> None:
    reply = asyncio.run(smollm2.session.chat(FRANCE, GenerationParams(max_tokens=16)))
    assert "Paris" in reply.text
    assert reply.prompt_tokens > 0
    assert 0 < reply.completion_tokens <= 16
    assert reply.finish_reason == "stop"


@pytest.mark.slow
def test_batched_greedy_equals_unbatched(smollm2: SimpleNamespace) -> None:
    session = smollm2.session
    assert session.batch_mode is BatchMode.NATIVE
    params = GenerationParams(max_tokens=10)

    async def go() -> tuple[list[Any], list[Any]]:
        singles = [await session.generate(p, params) for p in PROMPTS]
        return singles, await session.generate_batch(PROMPTS, params)

    singles, batch = asyncio.run(go())
    assert len({s.prompt_tokens for s in singles}) == 3  # really different lengths, so rows were padded
    for single, batched in zip(singles, batch, strict=True):
        assert batched.text == single.text
        assert batched.completion_tokens == single.completion_tokens
        assert batched.prompt_tokens == single.prompt_tokens
        assert batched.finish_reason == single.finish_reason


@pytest.mark.slow
def test_chat_batch_matches_single_chats(smollm2: SimpleNamespace) -> None:
    conversations = [FRANCE, [{"role": "user", "content": "Name a primary colour."}]]
    params = GenerationParams(max_tokens=8)

    async def go() -> tuple[list[Any], list[Any]]:
        singles = [await smollm2.session.chat(c, params) for c in conversations]
        return singles, await smollm2.session.chat_batch(conversations, params)

    singles, batch = asyncio.run(go())
    assert [c.text for c in batch] == [c.text for c in singles]


@pytest.mark.slow
def test_streamed_chat_equals_the_whole_reply(smollm2: SimpleNamespace) -> None:
    params = GenerationParams(max_tokens=16)

    async def go() -> tuple[Any, list[Any]]:
        whole = await smollm2.session.chat(FRANCE, params)
        chunks = [c async for c in smollm2.session.stream_chat(FRANCE, params)]
        return whole, chunks

    whole, chunks = asyncio.run(go())
    assert len(chunks) > 2  # really streamed, token by token
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (
        whole.prompt_tokens,
        whole.completion_tokens,
    )


@pytest.mark.slow
def test_stop_strings_and_length_limit(smollm2: SimpleNamespace) -> None:
    session = smollm2.session

    async def go() -> tuple[Any, Any, list[Any]]:
        free = await session.generate("1, 2, 3,", GenerationParams(max_tokens=3))
        stopped = await session.generate("1, 2, 3,", GenerationParams(max_tokens=12, stop=("6",)))
        streamed = [
            c async for c in session.stream_generate("1, 2, 3,", GenerationParams(max_tokens=12, stop=("6",)))
        ]
        return free, stopped, streamed

    free, stopped, streamed = asyncio.run(go())
    assert free.finish_reason == "length"
    assert free.completion_tokens == 3
    assert stopped.finish_reason == "stop"
    assert "6" not in stopped.text
    assert "5" in stopped.text
    assert "".join(c.text for c in streamed) == stopped.text
    assert streamed[-1].finish_reason == "stop"


@pytest.mark.slow
def test_abandoned_stream_frees_the_model_thread(smollm2: SimpleNamespace) -> None:
    async def go() -> tuple[list[str], Any, float]:
        stream = smollm2.session.stream_generate("Once upon a time", GenerationParams(max_tokens=400))
        seen = []
        async for chunk in stream:
            seen.append(chunk.text)
            if len(seen) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        start = time.perf_counter()
        after = await smollm2.session.generate("1, 2,", GenerationParams(max_tokens=2))
        return seen, after, time.perf_counter() - start

    seen, after, after_s = asyncio.run(go())
    assert len(seen) == 2
    assert after.completion_tokens == 2
    assert after_s < 30  # not queued behind 398 abandoned tokens


@pytest.mark.slow
def test_bf16_session_and_prompt_longer_than_the_context(smollm2: SimpleNamespace) -> None:
    config = _chat_config(precision="bf16", max_seq_len=24, options={"num_threads": 1})

    async def go() -> Any:
        session = await smollm2.plugin.create_session([CPU], config, smollm2.artifacts)
        async with session:
            reply = await session.generate("1, 2, 3,", GenerationParams(max_tokens=4))
            with pytest.raises(ConfigError, match="shorten the prompt"):
                await session.generate("word " * 40, GenerationParams(max_tokens=4))
            with pytest.raises(BackendError, match="embeddings"):
                await session.embed(["x"])
            return reply

    reply = asyncio.run(go())
    assert reply.completion_tokens == 4
    assert reply.text.strip()


@pytest.mark.slow
def test_temperature_sampling_is_repeatable_with_a_seed(smollm2: SimpleNamespace) -> None:
    params = GenerationParams(max_tokens=8, temperature=0.9, seed=7)

    async def go() -> tuple[Any, Any]:
        return (
            await smollm2.session.generate("Tell me a story", params),
            await smollm2.session.generate("Tell me a story", params),
        )

    first, second = asyncio.run(go())
    assert first.text == second.text
    assert first.completion_tokens > 0


# -- embeddings from an encoder folder ---------------------------------------------------------------


@pytest.mark.slow
def test_minilm_embeddings_are_pooled_normalised_and_ordered() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    config = ModelConfig("minilm", path=minilm_path(), task="embedding", max_batch_size=2)

    async def go() -> tuple[list[list[float]], list[list[list[float]]]]:
        session = await TransformersPlugin().create_session([CPU], config, {})
        async with session:
            assert session.batch_mode is BatchMode.NATIVE
            with pytest.raises(BackendError, match="generation"):
                await session.generate("hi", GenerationParams())
            return await session.embed(texts), await session.embed_batch([texts[:1], texts[1:]])

    vectors, batches = asyncio.run(go())
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    for text, vector in zip(texts, vectors, strict=True):
        with torch.inference_mode():
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state
        reference = torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)[0].tolist()
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
        assert sum(a * b for a, b in zip(vector, reference, strict=True)) > 0.9999

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert batches[0] + batches[1] == vectors


def test_the_cache_keyword_follows_the_model_signature() -> None:
    from xpuflow.backends.transformers.kv_cache_arg import cache_kwarg, output_cache

    class New:
        def forward(self, input_ids: object = None, cache: object = None) -> None: ...

    class Old:
        def forward(self, input_ids: object = None, past_key_values: object = None) -> None: ...

    class NewOut:
        cache = "kv-new"

    class OldOut:
        past_key_values = "kv-old"

    assert cache_kwarg(New()) == "cache"
    assert cache_kwarg(Old()) == "past_key_values"
    assert output_cache(NewOut()) == "kv-new"
    assert output_cache(OldOut()) == "kv-old"
