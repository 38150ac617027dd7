"""The backend contracts, the registry, the blocking bridge and the shipped fake."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from xpuflow.backends import registry
from xpuflow.backends.base import BackendPlugin, GenerationParams, ModelConfig, Session
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.errors import BackendError, ConfigError, SessionError
from xpuflow.testing.fake_backend import FakePlugin, FakeSession


def test_model_config_validates() -> None:
    with pytest.raises(ConfigError, match="model_id"):
        ModelConfig(model_id="")
    with pytest.raises(ConfigError, match="max_batch_size"):
        ModelConfig(model_id="m", max_batch_size=0)
    with pytest.raises(ValueError):
        ModelConfig(model_id="m", task="painting")  # type: ignore[arg-type]


def test_generation_params_validate() -> None:
    for kwargs in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(ConfigError):
            GenerationParams(**kwargs)  # type: ignore[arg-type]
    assert GenerationParams().temperature == 0.0  # greedy by default


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="llamacpp"):
        registry.get_backend("nonexistent")


def test_list_backends_never_raises_and_gives_reasons() -> None:
    statuses = registry.list_backends()
    assert {s.name for s in statuses} >= set(registry.BUILTIN_BACKENDS)
    assert all(s.reason for s in statuses)


def test_plugin_failing_to_load_is_skipped_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "broken", "xpuflow.no_such_module:Plugin")
    registry.get_backend.cache_clear()
    try:
        status = next(s for s in registry.list_backends() if s.name == "broken")
        assert not status.available
        assert "no_such_module" in status.reason
    finally:
        registry.get_backend.cache_clear()


def test_fake_plugin_satisfies_protocol() -> None:
    assert isinstance(FakePlugin(), BackendPlugin)


def test_base_session_reports_unsupported_operations() -> None:
    async def go() -> None:
        session = Session("m")
        with pytest.raises(BackendError, match="embeddings"):
            await session.embed(["x"])
        async with session:
            pass
        assert session.closed

    asyncio.run(go())


def test_fake_session_streams_batches_and_fails_on_demand() -> None:
    async def go() -> None:
        session = FakeSession("f", fail_next=1)
        with pytest.raises(SessionError):
            await session.generate("a b", GenerationParams())
        out = await session.generate_batch(["a b c", "d"], GenerationParams(max_tokens=2))
        assert [c.text for c in out] == ["c b", "d"]
        assert out[0].finish_reason == "length"
        chunks = [c async for c in session.stream_generate("x y", GenerationParams())]
        assert "".join(c.text for c in chunks) == "y x"
        assert chunks[-1].finish_reason == "stop"
        assert session.batch_sizes == [1, 2, 1]

    asyncio.run(go())


def test_blocking_runner_streams_incrementally_and_stops_early() -> None:
    produced: list[int] = []
    gate = threading.Event()

    def items():  # type: ignore[no-untyped-def]
        for i in range(1000):
            produced.append(i)
            yield i
            if i == 0:
                assert gate.wait(5), "item 0 never reached the consumer while the producer waited"

    async def go() -> None:
        runner = BlockingRunner("t")
        seen = []
        async with contextlib.aclosing(runner.iterate(items, max_buffered=4)) as stream:
            async for item in stream:
                seen.append(item)
                gate.set()  # item 1 is only produced after item 0 arrived: no buffering
                await asyncio.sleep(0.01)  # a slow reader: the producer waits for room
                if item == 3:
                    break
        assert seen == [0, 1, 2, 3]
        assert await runner.call(lambda x: x * 2, 21) == 42
        runner.close()

    asyncio.run(go())
    # the four items read, at most four more buffered, one more pulled before seeing the stop
    assert len(produced) <= 9, produced


def test_blocking_runner_rejects_an_empty_buffer() -> None:
    async def go() -> None:
        runner = BlockingRunner("t")
        with pytest.raises(ValueError, match="max_buffered"):
            async for _ in runner.iterate(lambda: iter([1]), max_buffered=0):
                pass
        runner.close()

    asyncio.run(go())


def test_blocking_runner_propagates_errors() -> None:
    def boom():  # type: ignore[no-untyped-def]
        yield 1
        raise RuntimeError("model crashed")

    async def go() -> None:
        runner = BlockingRunner("t")
        with pytest.raises(RuntimeError, match="model crashed"):
            async for _ in runner.iterate(boom):
                pass
        runner.close()

    asyncio.run(go())
