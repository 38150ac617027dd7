"""GET /openapi.json describes what the gateway really does: schemathesis fuzzes the app against it."""

from __future__ import annotations

import pytest
from test_app import KEY, gateway

from xpuflow.serving.app import create_app
from xpuflow.serving.settings import GatewaySettings
from xpuflow.testing.fake_engine import FakeEngine
from xpuflow.testing.run_async import run_async

OPERATIONS = {
    "/v1/chat/completions": {"post"},
    "/v1/completions": {"post"},
    "/v1/embeddings": {"post"},
    "/v1/models": {"get"},
    "/v1/models/{model}": {"get"},
    "/health": {"get"},
    "/ready": {"get"},
    "/metrics": {"get"},
    "/admin/workers": {"get"},
    "/admin/workers/{worker_id}/drain": {"post"},
    "/admin/workers/{worker_id}/undrain": {"post"},
    "/admin/reload": {"post"},
}


@run_async
async def test_the_document_lists_every_endpoint_and_the_served_models() -> None:
    async with gateway() as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert {path: set(ops) for path, ops in document["paths"].items()} == OPERATIONS
    chat = document["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["model"]["enum"] == ["chat"]
    embed = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert embed["properties"]["model"]["enum"] == ["embed"]
    assert {"400", "401", "404", "413", "415", "422", "429", "503"} <= set(chat["responses"])
    assert chat["security"] == [{"bearer": []}]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "retry-after" in chat["responses"]["429"]["headers"]
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]


@run_async
async def test_an_open_gateway_documents_no_security() -> None:
    async with gateway(api_keys={}) as client:
        document = (await client.get("/openapi.json")).json()
    assert "security" not in document["paths"]["/v1/chat/completions"]["post"]


def test_fuzzing_the_app_finds_no_5xx_and_no_response_off_the_document() -> None:
    pytest.importorskip("schemathesis")
    from xpuflow.serving.fuzz import fuzz_app

    app = create_app(FakeEngine(), GatewaySettings(api_keys={KEY: "team-a"}))
    summary = fuzz_app(app, max_cases=400, api_key=KEY, seed=16)
    assert summary["cases"] == 400
    assert summary["server_errors"] == 0, summary["failures"]
    assert summary["nonconforming"] == 0, "\n\n".join(summary["failures"])
    assert summary["transport_errors"] == 0, summary["failures"]
    assert summary["by_operation"]["POST /v1/chat/completions"] > 40
    statuses = set(summary["by_status"])
    assert "200" in statuses
    assert statuses & {"400", "422"}  # invalid data was sent and refused


def test_fuzz_needs_a_positive_case_count() -> None:
    pytest.importorskip("schemathesis")
    from xpuflow.serving.fuzz import fuzz_app

    with pytest.raises(ValueError, match="at least 1"):
        fuzz_app(create_app(FakeEngine()), max_cases=0)
