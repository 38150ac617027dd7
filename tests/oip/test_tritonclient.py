"""The official Triton client (``tritonclient`` http and grpc) against ``xpuflow serve``, unchanged:
health, metadata, embeddings and tensors through the engine, keys and errors."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest
from oip_serve import KEY, Served

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


def auth() -> dict[str, str]:
    """A fresh headers dict per call: tritonclient.http adds its binary header to the dict it is given."""
    return {"authorization": f"Bearer {KEY}"}


TEXTS = ["hello world", "the Open Inference Protocol", "ünïcödé"]


def _openai_embeddings(served: Served, texts: list[str]) -> list[list[float]]:
    request = urllib.request.Request(
        served.url + "/v1/embeddings",
        data=json.dumps({"model": "embed", "input": texts}).encode(),
        headers={"content-type": "application/json", **auth()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [item["embedding"] for item in json.loads(response.read())["data"]]


def _text_input(module: Any, texts: list[str], binary: bool | None = None) -> Any:
    tensor = module.InferInput("text", [len(texts)], "BYTES")
    data = np.array([t.encode() for t in texts], dtype=object)
    if binary is None:
        tensor.set_data_from_numpy(data)
    else:
        tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


@pytest.fixture(scope="module")
def http(fake_gateway: Served) -> Any:
    client = httpclient.InferenceServerClient(fake_gateway.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(fake_gateway: Served) -> Any:
    client = grpcclient.InferenceServerClient(fake_gateway.grpc)
    yield client
    client.close()


def test_health_and_server_metadata(http: Any, grpc: Any) -> None:
    assert http.is_server_live()
    assert http.is_server_ready()
    assert grpc.is_server_live()
    assert grpc.is_server_ready()
    assert http.get_server_metadata()["name"] == "xpuflow"
    assert grpc.get_server_metadata().name == "xpuflow"
    assert http.is_model_ready("embed", headers=auth())
    assert grpc.is_model_ready("embed", headers=auth())
    assert not grpc.is_model_ready("chat", headers=auth())  # chat models are not served over OIP


def test_model_metadata(http: Any, grpc: Any) -> None:
    meta = http.get_model_metadata("embed", headers=auth())
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    gmeta = grpc.get_model_metadata("embed", headers=auth())
    assert [(t.name, t.datatype, list(t.shape)) for t in gmeta.inputs] == [("text", "BYTES", [-1])]


@pytest.mark.parametrize("binary", [True, False])
def test_http_embeddings_match_the_openai_endpoint(fake_gateway: Served, http: Any, binary: bool) -> None:
    out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    result = http.infer("embed", [_text_input(httpclient, TEXTS, binary)], outputs=[out], headers=auth())
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (3, 8)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, np.array(_openai_embeddings(fake_gateway, TEXTS)), rtol=1e-6)


def test_grpc_embeddings_match_the_openai_endpoint(fake_gateway: Served, grpc: Any) -> None:
    result = grpc.infer("embed", [_text_input(grpcclient, TEXTS)], headers=auth())
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (3, 8)
    np.testing.assert_allclose(vectors, np.array(_openai_embeddings(fake_gateway, TEXTS)), rtol=1e-6)
    response = result.get_response()
    assert response.model_name == "embed"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tensor_model_through_the_engine(http: Any, grpc: Any, protocol: str) -> None:
    module, client = (httpclient, http) if protocol == "http" else (grpcclient, grpc)
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = module.InferInput("x", [2, 3], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("double", [tensor], headers=auth())
    np.testing.assert_array_equal(result.as_numpy("x_x2"), data * 2)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_keys_are_checked(protocol: str, http: Any, grpc: Any) -> None:
    module, client = (httpclient, http) if protocol == "http" else (grpcclient, grpc)
    with pytest.raises(InferenceServerException) as missing:
        client.infer("embed", [_text_input(module, ["x"])])
    assert "missing API key" in str(missing.value)
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("embed", [_text_input(module, ["x"])], headers={"authorization": "Bearer sk-wrong-key"})
    assert "invalid API key" in str(wrong.value)
    if protocol == "grpc":
        assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
    else:
        assert wrong.value.status() == "401"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clear_errors(protocol: str, http: Any, grpc: Any) -> None:
    module, client = (httpclient, http) if protocol == "http" else (grpcclient, grpc)
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [_text_input(module, ["x"])], headers=auth())
    assert "model 'nope' is not served here" in str(unknown.value)
    assert unknown.value.status() == ("StatusCode.NOT_FOUND" if protocol == "grpc" else "404")
    with pytest.raises(InferenceServerException) as chat:
        client.infer("chat", [_text_input(module, ["x"])], headers=auth())
    assert "use POST /v1/chat/completions" in str(chat.value)
    numbers = module.InferInput("text", [2], "FP32")
    numbers.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_type:
        client.infer("embed", [numbers], headers=auth())
    assert "must be BYTES" in str(wrong_type.value)
    assert wrong_type.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")


def test_grpc_unknown_output_and_unimplemented_rpcs(grpc: Any) -> None:
    wanted = [grpcclient.InferRequestedOutput("embedding"), grpcclient.InferRequestedOutput("nope")]
    with pytest.raises(InferenceServerException) as unknown:
        grpc.infer("embed", [_text_input(grpcclient, ["x"])], outputs=wanted, headers=auth())
    assert "unknown output 'nope'; outputs: embedding" in str(unknown.value)
    assert unknown.value.status() == "StatusCode.INVALID_ARGUMENT"
    result = grpc.infer("embed", [_text_input(grpcclient, ["x"])], outputs=wanted[:1], headers=auth())
    assert result.as_numpy("embedding").shape[0] == 1
    with pytest.raises(InferenceServerException) as repository:
        grpc.get_model_repository_index(headers=auth())
    assert repository.value.status() == "StatusCode.UNIMPLEMENTED"


def test_metrics_count_oip_requests(fake_gateway: Served, http: Any) -> None:
    http.infer("embed", [_text_input(httpclient, ["counted"])], headers=auth())
    with urllib.request.urlopen(fake_gateway.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'model="embed"' in text


@pytest.mark.parametrize("binary", [False, True])
def test_rest_answers_say_where_they_ran(fake_gateway: Served, binary: bool) -> None:
    header = {
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["where"]}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": binary}}],
    }
    request = urllib.request.Request(
        fake_gateway.url + "/v2/models/embed/infer",
        data=json.dumps(header).encode(),
        headers={"content-type": "application/json", **auth()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body, headers = response.read(), response.headers
    assert headers["x-xpuflow-worker"]
    assert headers["x-xpuflow-device"]
    assert headers["x-xpuflow-route-reason"]
    assert int(headers["content-length"]) == len(body)
    if binary:
        assert headers["content-type"] == "application/octet-stream"
        length = int(headers["Inference-Header-Content-Length"])
        assert json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == len(body) - length
    else:
        assert headers["content-type"] == "application/json"
        assert "Inference-Header-Content-Length" not in headers
        assert len(json.loads(body)["outputs"][0]["data"]) == 8
