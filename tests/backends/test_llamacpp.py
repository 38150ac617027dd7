"""The llamacpp backend on the bundled SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from xpuflow.backends.base import BatchMode, Completion, GenerationParams, ModelConfig, StreamChunk
from xpuflow.backends.llamacpp import LlamaCppPlugin, LlamaCppSession, llama_kwargs
from xpuflow.errors import ConfigError, SessionError
from xpuflow.types import Resource, ResourceType

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed ('llamacpp' extra)")

SMOLLM2_EMBEDDING_DIM = 576
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CPU = Resource("cpu", ResourceType.CPU, attributes={"physical_cores": 2})
NVIDIA = Resource("cuda:0", ResourceType.GPU, attributes={"vendor": "nvidia"})
REMOTE = Resource("remote:a", ResourceType.REMOTE)


@pytest.fixture(scope="module")
def gguf() -> Path:
    from xpuflow.bundled import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except ConfigError as exc:
        pytest.skip(str(exc))


def _open(path: Path, **options: object) -> LlamaCppSession:
    config = ModelConfig("smollm2", path=path, max_seq_len=1024, options={"n_threads": 1, **options})
    return asyncio.run(LlamaCppPlugin().create_session([CPU], config, {}))


@pytest.fixture(scope="module")
def session(gguf: Path) -> Iterator[LlamaCppSession]:
    opened = _open(gguf)
    yield opened
    asyncio.run(opened.close())


@pytest.fixture(scope="module")
def embed_session(gguf: Path) -> Iterator[LlamaCppSession]:
    opened = _open(gguf, embedding=True)
    yield opened
    asyncio.run(opened.close())


# -- plugin without a model ------------------------------------------------------------------------


def test_availability_reports_version() -> None:
    availability = LlamaCppPlugin().availability()
    assert availability.available
    assert availability.version == llama_cpp.__version__
    assert llama_cpp.__version__ in availability.reason


def test_probe_takes_cpus_and_gpus_only_with_offload() -> None:
    usable = LlamaCppPlugin().probe([CPU, NVIDIA, REMOTE])
    assert CPU in usable
    assert REMOTE not in usable
    if not llama_cpp.llama_supports_gpu_offload():
        assert NVIDIA not in usable


def test_no_build_profiles_and_capability_says_why_not(gguf: Path) -> None:
    plugin = LlamaCppPlugin()
    config = ModelConfig("m", path=gguf, max_seq_len=1024)
    assert plugin.required_build_profiles([CPU], config) == []
    capability = plugin.get_capability([CPU], config, {})
    assert capability.max_batch_size == 1
    assert capability.max_seq_len == 1024
    assert capability.supports_streaming
    assert capability.supports_chat
    assert not capability.supports_embeddings
    assert "embedding: true" in capability.unsupported["embeddings"]
    assert "sequential" in capability.unsupported["native_batching"]
    with_embeddings = ModelConfig("m", path=gguf, options={"embedding": True, "n_ctx": 512})
    capability = plugin.get_capability([CPU], with_embeddings, {})
    assert capability.supports_embeddings
    assert capability.max_seq_len == 512


def test_llama_kwargs(gguf: Path) -> None:
    config = ModelConfig("m", path=gguf, max_seq_len=1024)
    kwargs = llama_kwargs([CPU], config, gpu_offload=False)
    assert kwargs["n_ctx"] == 1024
    assert kwargs["n_threads"] == 2  # the CPU resource's physical cores
    assert kwargs["n_gpu_layers"] == 0
    assert kwargs["embedding"] is False
    assert kwargs["verbose"] is False
    assert llama_kwargs([NVIDIA], config, gpu_offload=True)["n_gpu_layers"] == -1
    assert llama_kwargs([NVIDIA], config, gpu_offload=False)["n_gpu_layers"] == 0
    overridden = ModelConfig("m", path=gguf, options={"n_ctx": 256, "n_threads": 1, "seed": 7})
    kwargs = llama_kwargs([CPU], overridden, gpu_offload=False)
    assert (kwargs["n_ctx"], kwargs["n_threads"], kwargs["seed"]) == (256, 1, 7)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"n_ctxx": 5}, "options.n_ctxx"),
        ({"pooling": "max"}, "options.pooling"),
        ({"n_ctx": 0}, "options.n_ctx"),
        ({"gguf_type": "q3"}, "options.gguf_type"),
    ],
)
def test_bad_options_name_the_field(gguf: Path, options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        llama_kwargs([CPU], ModelConfig("m", path=gguf, options=options), gpu_offload=False)
    assert info.value.field == field


def test_bad_paths_are_config_errors(tmp_path: Path) -> None:
    plugin = LlamaCppPlugin()

    def create(path: Path | None) -> None:
        asyncio.run(plugin.create_session([CPU], ModelConfig("m", path=path), {}))

    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigError, match=f"model file {missing} does not exist"):
        create(missing)
    with pytest.raises(ConfigError, match="needs a model path"):
        create(None)
    with pytest.raises(ConfigError, match="is not a file"):
        create(tmp_path)
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00\x01not a gguf at all")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        create(not_gguf)


@pytest.mark.slow
def test_truncated_gguf_is_a_session_error(tmp_path: Path, gguf: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf.read_bytes()[:4096])
    with pytest.raises(SessionError, match="could not load"):
        asyncio.run(LlamaCppPlugin().create_session([CPU], ModelConfig("m", path=broken), {}))


# -- a loaded model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_chat_answers_paris_greedily(session: LlamaCppSession) -> None:
    reply = asyncio.run(session.chat(PARIS, GenerationParams(max_tokens=16)))
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"
    assert reply.prompt_tokens > 0
    assert 0 < reply.completion_tokens <= 16
    assert reply.model == "smollm2"


@pytest.mark.slow
def test_streamed_chat_equals_the_greedy_reply(session: LlamaCppSession) -> None:
    async def run() -> tuple[Completion, list[str], str | None, StreamChunk]:
        whole = await session.chat(PARIS, GenerationParams(max_tokens=16))
        pieces, finish, last = [], None, None
        async for chunk in session.stream_chat(PARIS, GenerationParams(max_tokens=16)):
            assert finish is None, "nothing may follow the chunk that carries finish_reason"
            pieces.append(chunk.text)
            finish, last = chunk.finish_reason, chunk
        assert last is not None
        return whole, pieces, finish, last

    whole, pieces, finish, last = asyncio.run(run())
    assert len([p for p in pieces if p]) >= 3
    assert "".join(pieces) == whole.text
    assert finish == "stop"
    # llama.cpp's stream has no usage: the session counts, as its non-streamed usage does
    assert (last.prompt_tokens, last.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)


@pytest.mark.slow
def test_completion_stops_at_max_tokens(session: LlamaCppSession) -> None:
    async def run() -> tuple[Completion, str]:
        done = await session.generate("Once upon a time", GenerationParams(max_tokens=4))
        streamed = [
            c async for c in session.stream_generate("Once upon a time", GenerationParams(max_tokens=4))
        ]
        assert streamed[-1].finish_reason == "length"
        assert (streamed[-1].prompt_tokens, streamed[-1].completion_tokens) == (done.prompt_tokens, 4)
        return done, "".join(c.text for c in streamed)

    done, streamed_text = asyncio.run(run())
    assert done.finish_reason == "length"
    assert done.completion_tokens == 4
    assert done.text.strip()
    assert streamed_text == done.text


@pytest.mark.slow
def test_stop_sequences_end_generation(session: LlamaCppSession) -> None:
    reply = asyncio.run(session.chat(PARIS, GenerationParams(max_tokens=16, stop=("Paris",))))
    assert "Paris" not in reply.text
    assert reply.finish_reason == "stop"


@pytest.mark.slow
def test_batches_run_sequentially_with_the_same_results(session: LlamaCppSession) -> None:
    params = GenerationParams(max_tokens=4)
    prompts = ["The sky is", "Two plus two is"]

    async def run() -> tuple[list[str], list[str]]:
        batch = await session.generate_batch(prompts, params)
        single = [await session.generate(p, params) for p in prompts]
        return [c.text for c in batch], [c.text for c in single]

    batch, single = asyncio.run(run())
    assert session.batch_mode is BatchMode.SEQUENTIAL
    assert session.max_batch_size == 1
    assert batch == single


@pytest.mark.slow
def test_abandoned_stream_frees_the_model_thread(session: LlamaCppSession) -> None:
    async def run() -> str:
        async for _chunk in session.stream_generate("Count: 1, 2, 3,", GenerationParams(max_tokens=64)):
            break
        return (await session.chat(PARIS, GenerationParams(max_tokens=16))).text

    assert "Paris" in asyncio.run(run())


@pytest.mark.slow
def test_context_overflow_is_a_config_error(session: LlamaCppSession) -> None:
    with pytest.raises(ConfigError, match="n_ctx"):
        asyncio.run(session.generate("word " * 2000, GenerationParams(max_tokens=4)))


@pytest.mark.slow
def test_empty_prompt_is_a_config_error(session: LlamaCppSession) -> None:
    with pytest.raises(ConfigError, match="prompt is empty"):
        asyncio.run(session.generate("", GenerationParams(max_tokens=4)))


@pytest.mark.slow
def test_bad_embedding_inputs_are_config_errors_and_harmless(embed_session: LlamaCppSession) -> None:
    with pytest.raises(ConfigError, match="input 1 is empty"):
        asyncio.run(embed_session.embed(["fine", ""]))
    with pytest.raises(ConfigError, match="raise options n_batch"):
        asyncio.run(embed_session.embed(["word " * 600]))
    assert len(asyncio.run(embed_session.embed(["still works"]))[0]) == SMOLLM2_EMBEDDING_DIM


@pytest.mark.slow
def test_embeddings_need_embedding_option(session: LlamaCppSession) -> None:
    with pytest.raises(SessionError, match="embedding: true"):
        asyncio.run(session.embed(["hello"]))


@pytest.mark.slow
def test_embeddings_have_the_model_dim(embed_session: LlamaCppSession) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "The cat sat on the mat."]
    vectors = asyncio.run(embed_session.embed(texts))
    assert len(vectors) == 3
    assert all(len(v) == SMOLLM2_EMBEDDING_DIM for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-6 for v in vectors)  # unit length
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    assert asyncio.run(embed_session.embed([])) == []


@pytest.mark.slow
def test_close_is_idempotent_and_final(gguf: Path) -> None:
    opened = _open(gguf)
    asyncio.run(opened.close())
    asyncio.run(opened.close())
    assert opened.closed
    with pytest.raises(SessionError, match="closed"):
        asyncio.run(opened.chat(PARIS, GenerationParams(max_tokens=2)))


@pytest.mark.slow
def test_mean_pooling_packs_texts_and_matches_the_per_text_mean(
    gguf: Path, embed_session: LlamaCppSession
) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "The cat sat on the mat."]
    pooled = _open(gguf, embedding=True, pooling="mean")
    try:
        packed = asyncio.run(pooled.embed(texts))
    finally:
        asyncio.run(pooled.close())
    one_by_one = asyncio.run(embed_session.embed(texts))
    # Batch composition changes llama.cpp's float rounding a little, so compare directions (unit vectors).
    assert _cosine(packed[0], packed[2]) > 0.999
    for left, right in zip(packed, one_by_one, strict=True):
        assert _cosine(left, right) > 0.999
    assert _cosine(packed[0], packed[1]) < 0.99


def _cosine(left: list[float], right: list[float]) -> float:
    return sum(a * b for a, b in zip(left, right, strict=True))


def test_gguf_type_adds_one_requant_build_step(gguf: Path) -> None:
    plugin = LlamaCppPlugin()
    config = ModelConfig("m", path=gguf, options={"gguf_type": "f16"})
    (profile,) = plugin.required_build_profiles([CPU], config)
    assert profile.name == "gguf-requant"
    assert profile.flags == ("type=f16",)
    assert "llama-cpp-python" in profile.compiler_version
    with pytest.raises(ConfigError, match="no 'gguf-requant' artifact"):
        asyncio.run(plugin.create_session([CPU], config, {}))


@pytest.mark.slow
def test_the_widened_gguf_is_built_once_and_answers_the_readme_question(gguf: Path, tmp_path: Path) -> None:
    """The bundled Q4_1 file loops at temperature 0 on this question; widened to f16 it answers."""
    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore

    plugin = LlamaCppPlugin()
    config = ModelConfig("smollm2", path=gguf, max_seq_len=1024, options={"n_threads": 1, "gguf_type": "f16"})
    store = ArtifactStore(tmp_path / "store")
    artifacts = build_all(plugin, [CPU], config, store)
    built = artifacts["gguf-requant"].path / "model.gguf"
    assert built.stat().st_size > 2 * gguf.stat().st_size  # 16-bit weights, not 4-bit
    assert build_all(plugin, [CPU], config, store)["gguf-requant"].id == artifacts["gguf-requant"].id

    async def ask() -> str:
        session = await plugin.create_session([CPU], config, artifacts)
        try:
            question = [{"role": "user", "content": "What is the capital of France?"}]
            return (await session.chat(question, GenerationParams(max_tokens=32))).text
        finally:
            await session.close()

    assert "Paris" in asyncio.run(ask())
