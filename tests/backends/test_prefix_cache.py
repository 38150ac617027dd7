"""The prefix cache's bookkeeping (pure) and, on SmolLM2, that reusing a prefix changes no output."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xpuflow.backends.prefix_cache import PrefixCache, common_prefix_length, middle_padded


def test_common_prefix_length() -> None:
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]], limit=1) == 1
    assert common_prefix_length([[5], [6]]) == 0


def test_middle_padding_keeps_the_prefix_in_front_and_pads_before_each_rest() -> None:
    ids, mask = middle_padded([[1, 2, 3], [1, 2, 7, 8, 9]], 2, pad_id=0)
    assert ids == [[1, 2, 0, 0, 3], [1, 2, 7, 8, 9]]
    assert mask == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]
    # no prefix: plain left padding
    assert middle_padded([[4], [5, 6]], 0, 0) == ([[0, 4], [5, 6]], [[0, 1], [1, 1]])
    assert middle_padded([], 3, 0) == ([], [])


def test_middle_padding_refuses_rows_that_do_not_fit_the_prefix() -> None:
    with pytest.raises(ValueError, match="a token after"):
        middle_padded([[1, 2], [1, 2, 3]], 2, 0)
    with pytest.raises(ValueError, match="do not share"):
        middle_padded([[1, 2, 3], [1, 9, 3]], 2, 0)


@given(
    st.lists(st.integers(0, 5), max_size=6),
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=5),
)
def test_middle_padding_preserves_every_row(prefix: list[int], tails: list[list[int]]) -> None:
    rows = [prefix + tail for tail in tails]
    n = len(prefix)
    ids, mask = middle_padded(rows, n, pad_id=-1)
    assert len({len(r) for r in ids}) == 1
    for row, got, m in zip(rows, ids, mask, strict=True):
        assert [t for t, keep in zip(got, m, strict=True) if keep] == row
        assert got[:n] == prefix


def _rows(prefix: Sequence[int], *tails: Sequence[int]) -> list[list[int]]:
    return [list(prefix) + list(t) for t in tails]


def test_a_batch_teaches_its_shared_prefix_then_reuses_it() -> None:
    cache = PrefixCache(min_tokens=4)
    shared = list(range(10))
    rows = _rows(shared, [20, 21], [30])
    prefix, value = cache.plan(rows)
    assert prefix == tuple(shared)
    assert value is None  # compute, then put
    cache.put(prefix, "kv")
    # a later single request with the same opening reuses it
    again, value = cache.plan(_rows(shared, [40, 41, 42]))
    assert (again, value) == (tuple(shared), "kv")
    assert (cache.stats()["hits"], cache.stats()["tokens_reused"]) == (1, 10)


def test_a_single_prompt_never_stores_itself() -> None:
    cache = PrefixCache(min_tokens=2)
    assert cache.plan([list(range(50))]) == ((), None)
    assert len(cache) == 0


def test_short_shared_prefixes_are_not_worth_it() -> None:
    cache = PrefixCache(min_tokens=8)
    assert cache.plan(_rows([1, 2, 3], [4], [5])) == ((), None)


def test_a_prefix_always_leaves_each_row_a_token_of_its_own() -> None:
    cache = PrefixCache(min_tokens=2)
    cache.put([1, 2, 3, 4], "kv")
    # the row is exactly the stored prefix: nothing of it may be reused
    assert cache.plan([[1, 2, 3, 4]]) == ((), None)
    # identical rows share all but their last token
    prefix, _ = cache.plan([[9, 9, 9, 9], [9, 9, 9, 9]])
    assert prefix == (9, 9, 9)


def test_the_longest_matching_prefix_wins_and_rows_must_all_match() -> None:
    cache = PrefixCache(min_tokens=2)
    cache.put([1, 2], "short")
    cache.put([1, 2, 3, 4], "long")
    assert cache.plan([[1, 2, 3, 4, 5]]) == ((1, 2, 3, 4), "long")
    assert cache.plan([[1, 2, 3, 4, 5], [1, 2, 9]]) == ((1, 2), "short")
    assert cache.plan([[7, 1, 2, 3]]) == ((), None)


def test_a_longer_shared_prefix_is_learned_beyond_a_stored_one() -> None:
    cache = PrefixCache(min_tokens=3)
    cache.put([1, 2, 3], "template")
    rows = _rows([1, 2, 3, 10, 11, 12, 13], [50], [60])
    assert cache.plan(rows) == ((1, 2, 3, 10, 11, 12, 13), None)
    rows = _rows([1, 2, 3, 10], [50], [60])  # only one token more: reuse the stored one
    assert cache.plan(rows) == ((1, 2, 3), "template")


def test_seeds_are_computed_on_first_use_and_entries_are_evicted_lru() -> None:
    cache = PrefixCache(capacity=2, min_tokens=2)
    cache.add_seed([1, 2, 3])
    cache.add_seed([1])  # too short to be worth a seed
    assert len(cache) == 1
    assert cache.plan([[1, 2, 3, 4]]) == ((1, 2, 3), None)
    cache.put([1, 2, 3], "seed")
    cache.put([5, 6], "a")
    cache.plan([[1, 2, 3, 9]])  # touch the seed: [5, 6] is now the oldest
    cache.put([7, 8], "b")
    assert cache.stats()["prefix_lengths"] == [2, 3]
    assert cache.plan([[5, 6, 0]]) == ((), None)
    assert cache.plan([[7, 8, 0]]) == ((7, 8), "b")


def test_the_token_budget_evicts_the_oldest_and_refuses_a_prefix_longer_than_itself() -> None:
    cache = PrefixCache(capacity=8, min_tokens=2, max_tokens=10)
    cache.put(list(range(4)), "a")
    cache.put(list(range(100, 105)), "b")
    assert cache.stats()["tokens"] == 9
    cache.put(list(range(200, 204)), "c")  # 13 > 10: "a" goes
    assert cache.stats()["prefix_lengths"] == [4, 5]
    assert cache.stats()["tokens"] == 9
    cache.put(list(range(300, 320)), "too long")
    assert cache.stats()["prefix_lengths"] == [4, 5]
    # a batch sharing more than the budget learns only the budget's worth
    rows = [[*range(500, 530), 1], [*range(500, 530), 2]]
    prefix, value = cache.plan(rows)
    assert (len(prefix), value) == (10, None)
    cache.clear()
    assert cache.stats()["tokens"] == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=0)
    with pytest.raises(ValueError, match="min_tokens"):
        PrefixCache(min_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(min_tokens=8, max_tokens=4)


# -- on the real model ----------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name a primary colour."}],
    [{"role": "user", "content": "Write a haiku about the sea and the wind at night."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}],
]


@pytest.mark.slow
def test_reusing_prefixes_changes_no_output_on_smollm2() -> None:
    import torch

    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import GenerationParams, ModelConfig
    from xpuflow.backends.transformers.plugin import TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path
    from xpuflow.types import Resource, ResourceType

    torch.set_num_threads(1)
    cpu = Resource("cpu", ResourceType.CPU, "host CPU")
    plugin = TransformersPlugin()
    params = GenerationParams(max_tokens=12)

    async def run(prefix_cache: bool) -> tuple[list[str], list[str], list[str], dict[str, object]]:
        config = ModelConfig(
            "smollm2",
            smollm2_gguf_path(),
            "chat",
            max_batch_size=8,
            options={"prefix_cache": prefix_cache},
        )
        artifacts = build_all(plugin, [cpu], config, ArtifactStore())
        session = await plugin.create_session([cpu], config, artifacts)
        try:
            batch = [c.text for c in await session.chat_batch(CHATS, params)]
            singles = [(await session.chat(c, params)).text for c in CHATS]
            streamed = []
            for chat in CHATS[:2]:
                streamed.append("".join([c.text async for c in session.stream_chat(chat, params)]))
            stats = session.prefix_cache.stats() if session.prefix_cache else {}
            return batch, singles, streamed, stats
        finally:
            await session.close()

    cached = asyncio.run(run(True))
    plain = asyncio.run(run(False))
    assert cached[:3] == plain[:3]
    assert cached[0] == cached[1]  # and batched rows equal single requests
    stats = cached[3]
    # The batch shares no prefix worth it (the last chat has its own system prompt); the first single
    # chat computes the seeded template opening, the next two and both streams reuse it, and the chat
    # with its own system prompt does not match it.
    assert (stats["misses"], stats["hits"]) == (1, 4), stats
    assert stats["tokens_reused"] > 0
    assert plain[3] == {}


@pytest.mark.slow
def test_a_model_that_cannot_start_from_a_cached_prefix_is_served_without_the_cache(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import GenerationParams, ModelConfig
    from xpuflow.backends.transformers.plugin import TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path
    from xpuflow.types import Resource, ResourceType

    torch.set_num_threads(1)
    cpu = Resource("cpu", ResourceType.CPU, "host CPU")
    plugin = TransformersPlugin()
    config = ModelConfig("smollm2", smollm2_gguf_path(), "chat", max_batch_size=4)

    async def run() -> list[str]:
        artifacts = build_all(plugin, [cpu], config, ArtifactStore())
        session = await plugin.create_session([cpu], config, artifacts)
        real = session._model.generate

        def refuses_cached_prefixes(**kwargs: object) -> object:
            if session.cache_kwarg in kwargs:
                raise RuntimeError("this cache cannot be extended")
            return real(**kwargs)

        session._model.generate = refuses_cached_prefixes
        try:
            return [c.text for c in await session.chat_batch(CHATS[:2], GenerationParams(max_tokens=6))]
        finally:
            await session.close()

    texts = asyncio.run(run())
    assert all(texts)
    assert "prefix caching is off" in caplog.text


def test_bad_prefix_cache_options_are_config_errors() -> None:
    from xpuflow.backends.base import ModelConfig
    from xpuflow.backends.transformers.plugin import TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path
    from xpuflow.errors import ConfigError
    from xpuflow.types import Resource, ResourceType

    cpu = Resource("cpu", ResourceType.CPU, "host CPU")
    for options, field in (
        ({"prefix_cache": "yes"}, "options.prefix_cache"),
        ({"prefix_cache_entries": 0}, "options.prefix_cache_entries"),
    ):
        config = ModelConfig("smollm2", smollm2_gguf_path(), "chat", options=options)
        with pytest.raises(ConfigError) as info:
            TransformersPlugin().required_build_profiles([cpu], config)
        assert info.value.field == field
