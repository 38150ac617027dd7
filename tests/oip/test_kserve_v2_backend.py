"""The ``kserve_v2`` backend over REST and gRPC, against xpuflow's own OIP endpoints (``xpuflow serve``
with fake models): metadata, embeddings, tensors, batches, readiness and errors with the server's message."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from oip_serve import KEY, Served

from xpuflow.backends.base import ModelConfig
from xpuflow.backends.registry import get_backend
from xpuflow.backends.remote.kserve_v2 import KServeV2Plugin, KServeV2Session
from xpuflow.errors import ConfigError, RemoteError
from xpuflow.testing.fake_backend import FakeSession

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _options(served: Served, protocol: str, **extra: Any) -> dict[str, Any]:
    base = served.url if protocol == "rest" else served.grpc
    return {"base_url": base, "protocol": protocol, "api_key": KEY, **extra}


async def _session(served: Served, protocol: str, model: str, task: str, **extra: Any) -> KServeV2Session:
    config = ModelConfig(model_id=model, task=task, options=_options(served, protocol, **extra))
    return await KServeV2Plugin().create_session([], config, {})


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_embeddings_metadata_and_health(fake_gateway: Served, protocol: str) -> None:
    async def main() -> None:
        async with await _session(fake_gateway, protocol, "embed", "embedding") as session:
            meta = await session.metadata()
            assert [(t.name, t.datatype) for t in meta.inputs] == [("text", "BYTES")]
            vectors = await session.embed(["a", "b"])
            expected = await FakeSession().embed(["a", "b"])  # what the fake behind xpuflow answers (fp64)
            np.testing.assert_allclose(vectors, expected, rtol=1e-6)
            batches = await session.embed_batch([["a"], ["b", "c"]])
            assert [len(b) for b in batches] == [1, 2]
            assert await session.health()
            assert session.metrics().successes >= 2

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_tensor_runs_and_batches(fake_gateway: Served, protocol: str) -> None:
    async def main() -> None:
        async with await _session(fake_gateway, protocol, "double", "tensor") as session:
            out = await session.run({"x": np.ones((2, 3), dtype=np.float32)})
            np.testing.assert_array_equal(out["x_x2"], np.full((2, 3), 2.0, dtype=np.float32))
            parts = await session.run_batch([{"x": np.ones((1, 2))}, {"x": np.zeros((3, 2))}])
            assert [p["x_x2"].shape for p in parts] == [(1, 2), (3, 2)]

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_errors_carry_the_servers_message(fake_gateway: Served, protocol: str) -> None:
    async def main() -> None:
        async with await _session(fake_gateway, protocol, "nope", "tensor") as session:
            with pytest.raises(RemoteError) as unknown:
                await session.run({"x": np.ones(1)})
            assert unknown.value.status == 404
            assert not unknown.value.retryable
            assert "model 'nope' is not served here" in str(unknown.value)
            assert not await session.health()
        async with await _session(
            fake_gateway, protocol, "embed", "embedding", api_key="sk-wrong-key"
        ) as bad:
            with pytest.raises(RemoteError) as denied:
                await bad.embed(["x"])
            assert denied.value.status == 401
            assert "invalid API key" in str(denied.value)

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_server_that_is_down_is_retryable(protocol: str) -> None:
    from oip_serve import free_port

    async def main() -> None:
        port = free_port()
        base = f"http://127.0.0.1:{port}" if protocol == "rest" else f"127.0.0.1:{port}"
        config = ModelConfig(
            model_id="m", task="embedding", options={"base_url": base, "protocol": protocol, "timeout_s": 2}
        )
        async with await KServeV2Plugin().create_session([], config, {}) as session:
            with pytest.raises(RemoteError) as info:
                await session.embed(["x"])
            assert info.value.retryable
            assert not await session.health()

    asyncio.run(main())


def test_cancelled_calls_end_on_the_wire(fake_gateway: Served) -> None:
    async def main() -> None:
        async with await _session(fake_gateway, "grpc", "embed", "embedding") as session:
            task = asyncio.create_task(session.embed(["x"] * 4))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await session.embed(["still works"])  # the channel survives a cancelled call

    asyncio.run(main())


@pytest.mark.parametrize(
    ("options", "task", "message"),
    [
        ({"protocol": "rest"}, "embedding", "needs options.base_url"),
        ({"base_url": "127.0.0.1:1", "protocol": "rest"}, "embedding", "must be an http:// or https:// URL"),
        ({"base_url": "http://h:1", "protocol": "grpc"}, "embedding", "must be host:port for protocol grpc"),
        ({"base_url": "h:1", "protocol": "soap"}, "embedding", "must be rest or grpc"),
        ({"base_url": "http://h:1", "colour": 1}, "embedding", "unknown kserve_v2 option(s) colour"),
        ({"base_url": "http://h:1"}, "chat", "use remote_openai for chat servers"),
    ],
)
def test_config_errors_name_the_fix(options: dict[str, Any], task: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        asyncio.run(
            KServeV2Plugin().create_session([], ModelConfig(model_id="m", task=task, options=options), {})
        )
    assert message in str(info.value)


def test_registered() -> None:
    assert isinstance(get_backend("kserve_v2"), KServeV2Plugin)
    assert get_backend("kserve_v2").availability().available
