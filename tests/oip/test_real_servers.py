"""Real model servers as workers: MLServer 1.7 (scikit-learn) and a kserve 0.21 ModelServer, each in its
own venv on 127.0.0.1, reached by the ``kserve_v2`` backend over REST and gRPC, and served again by
``xpuflow serve`` to the official Triton client."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from oip_model_servers import ModelServerProcess, kserve_server, mlserver
from oip_serve import Served, xpuflow_serve

from xpuflow.backends.base import ModelConfig
from xpuflow.backends.remote.kserve_v2 import KServeV2Plugin
from xpuflow.errors import RemoteError

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def _kembed(texts: list[str]) -> np.ndarray[Any, Any]:
    return np.array([[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in texts], np.float32)


@pytest.fixture(scope="module")
def ml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    with mlserver(Path(tmp_path_factory.mktemp("mlserver"))) as server:
        yield server


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    with kserve_server(Path(tmp_path_factory.mktemp("kserve"))) as server:
        yield server


def _config(server: ModelServerProcess, protocol: str, model: str, task: str) -> ModelConfig:
    base = server.rest if protocol == "rest" else server.grpc
    return ModelConfig(model_id=model, task=task, options={"base_url": base, "protocol": protocol})


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_mlserver_sklearn_through_kserve_v2(ml: ModelServerProcess, protocol: str) -> None:
    async def main() -> None:
        async with await KServeV2Plugin().create_session(
            [], _config(ml, protocol, "iris", "tensor"), {}
        ) as s:
            meta = await s.metadata()
            assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("input-0", "FP64", (-1, 4))]
            assert await s.health()
            out = await s.run(np.array(ml.expected["x"]))
            assert out["predict"].reshape(-1).tolist() == ml.expected["y"]
            rows = [np.array(ml.expected["x"][:3]), np.array(ml.expected["x"][3:])]
            parts = await s.run_batch(rows)  # one request of 10 rows, split back 3 + 7
            assert [p["predict"].reshape(-1).tolist() for p in parts] == [
                ml.expected["y"][:3],
                ml.expected["y"][3:],
            ]
            with pytest.raises(RemoteError) as bad:
                await s.run(np.zeros((2, 3)))  # the model takes 4 features
            assert bad.value.status in (400, 422, 500)  # MLServer's own answer, passed on
        async with await KServeV2Plugin().create_session(
            [], _config(ml, protocol, "nope", "tensor"), {}
        ) as s:
            with pytest.raises(RemoteError) as unknown:
                await s.run(np.zeros((1, 4)))
            assert unknown.value.status == 404
            assert "nope" in str(unknown.value)  # the server's message names the model
            assert not await s.health()

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_kserve_model_server_embeddings_through_kserve_v2(ks: ModelServerProcess, protocol: str) -> None:
    async def main() -> None:
        async with await KServeV2Plugin().create_session(
            [], _config(ks, protocol, "kembed", "embedding"), {}
        ) as session:
            texts = ["hello", "open inference", "protocol"]
            np.testing.assert_allclose(await session.embed(texts), _kembed(texts), rtol=1e-6)
            assert await session.health()

    asyncio.run(main())


@pytest.fixture(scope="module")
def front(
    tmp_path_factory: pytest.TempPathFactory, ml: ModelServerProcess, ks: ModelServerProcess
) -> Iterator[Served]:
    """``xpuflow serve`` in front of both servers: iris over gRPC, kembed over REST."""
    config = {
        "deployments": [
            {"name": "iris", "backend": "kserve_v2", "task": "tensor", "max_batch_size": 16,
             "options": {"base_url": ml.grpc, "protocol": "grpc"}},
            {"name": "kembed", "backend": "kserve_v2", "task": "embedding",
             "options": {"base_url": ks.rest, "protocol": "rest"}},
        ]
    }  # fmt: skip
    with xpuflow_serve(Path(tmp_path_factory.mktemp("front")), config) as served:
        yield served


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_through_xpuflow_to_real_servers(
    front: Served, ml: ModelServerProcess, protocol: str
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module: Any = httpclient if protocol == "http" else grpcclient
    address = front.url.removeprefix("http://") if protocol == "http" else front.grpc
    client = module.InferenceServerClient(address)
    try:
        meta = client.get_model_metadata("iris")
        inputs = (
            meta["inputs"]
            if protocol == "http"
            else [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs]
        )
        assert inputs == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
        x = module.InferInput("input-0", [10, 4], "FP64")
        x.set_data_from_numpy(np.array(ml.expected["x"]))
        labels = client.infer("iris", [x]).as_numpy("predict")
        assert labels.reshape(-1).tolist() == ml.expected["y"]
        text = module.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"hello", b"protocol"], dtype=object))
        vectors = client.infer("kembed", [text]).as_numpy("embedding")
        np.testing.assert_allclose(vectors, _kembed(["hello", "protocol"]), rtol=1e-6)
    finally:
        client.close()
