"""The Open Inference Protocol's REST form on the gateway: ``/v2/...`` (KServe v2, Triton, MLServer).

    GET  /v2/health/live                      200 {"live": true}
    GET  /v2/health/ready                     200 {"ready": true}, 503 while starting or draining
    GET  /v2                                  server metadata
    GET  /v2/models/{model}[/versions/{v}]    model metadata (inputs, outputs: names, datatypes, shapes)
    GET  /v2/models/{model}[/versions/{v}]/ready
    POST /v2/models/{model}[/versions/{v}]/infer

Inputs come as JSON tensors or with Triton's binary tensor extension (``Inference-Header-Content-Length``,
``parameters.binary_data_size``), which ``tritonclient.http`` uses by default; an output asked for with
``parameters.binary_data`` (or every output, with the request's ``binary_data_output``) is answered in
binary form, the rest as JSON. Errors are ``{"error": "..."}`` with the HTTP status of the matching
OpenAI endpoint (401, 403, 404, 429 with Retry-After, 503, 504...). Keys, routing, queues and metrics
are the OpenAI endpoints' own (``serving.oip_service``)::

    routes = oip_routes(OIPService(gateway))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from xpuflow.backends.remote.oip_client import BINARY_HEADER
from xpuflow.backends.remote.oip_tensors import datatype_of, from_json, from_raw, to_json_data, to_raw
from xpuflow.errors import ConfigError
from xpuflow.serving.inference import decision_headers
from xpuflow.serving.oip_service import OIPError, OIPRequestInfo, OIPService

__all__ = ["oip_routes"]


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data, separators=(",", ":")), status, dict(headers or {}), media_type="application/json"
    )


def _error(exc: OIPError) -> Response:
    return _json({"error": exc.message}, exc.status, exc.headers)


def _authorization(request: Request) -> bytes | None:
    value = request.headers.get("authorization")
    return value.encode("latin-1") if value is not None else None


def _parse_inputs(
    body: bytes, json_length: int | None
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    """The request's JSON and its input arrays, from JSON data or binary parts."""
    if json_length is not None and not 0 <= json_length <= len(body):
        raise OIPError(400, f"{BINARY_HEADER} is {json_length} but the body has {len(body)} bytes")
    try:
        header = json.loads(body[:json_length] if json_length is not None else body)
    except ValueError as exc:
        raise OIPError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise OIPError(
            400, 'the request needs "inputs": a list of tensors with name, shape, datatype and data'
        )
    binary = memoryview(body)[json_length:] if json_length is not None else memoryview(b"")
    offset = 0
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for index, tensor in enumerate(header["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise OIPError(400, f"inputs[{index}] needs a name, a shape, a datatype and data")
        name = tensor["name"]
        try:
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                    raise OIPError(400, f"input '{name}': binary_data_size {size!r} runs past the body")
                inputs[name] = from_raw(
                    tensor.get("datatype", ""),
                    tensor.get("shape", ()),
                    bytes(binary[offset : offset + size]),
                    name,
                )
                offset += size
            else:
                if "data" not in tensor:
                    raise OIPError(400, f"input '{name}' has no data")
                inputs[name] = from_json(
                    tensor.get("datatype", ""), tensor.get("shape", ()), tensor["data"], name
                )
        except ConfigError as exc:
            raise OIPError(400, str(exc)) from exc
    return header, inputs


def _encode_outputs(
    header: Mapping[str, Any], outputs: Mapping[str, np.ndarray[Any, Any]]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    wanted = header.get("outputs")
    all_binary = bool((header.get("parameters") or {}).get("binary_data_output"))
    binary_of: dict[str, bool] = {}
    if isinstance(wanted, list) and wanted:
        for item in wanted:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or name not in outputs:
                raise OIPError(400, f"unknown output '{name}'; outputs: {', '.join(outputs)}")
            binary_of[name] = bool((item.get("parameters") or {}).get("binary_data", all_binary))
    else:
        binary_of = dict.fromkeys(outputs, all_binary)
    described, parts = [], []
    for name, binary in binary_of.items():
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary:
            raw = to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = to_json_data(array)
        described.append(entry)
    return described, parts


def oip_routes(service: OIPService) -> list[BaseRoute]:
    """The ``/v2`` routes over ``service``."""
    settings = service.gateway.settings

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = await service.ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(service.server_metadata())

    async def model_metadata(request: Request) -> Response:
        try:
            service.check_key(_authorization(request))
            params = request.path_params
            meta = await service.model_metadata(params["model"], params.get("version", ""))
        except OIPError as exc:
            return _error(exc)
        return _json(meta.to_dict())

    async def model_ready(request: Request) -> Response:
        params = request.path_params
        try:
            service.check_key(_authorization(request))
            service.model(params["model"], params.get("version", ""))
        except OIPError as exc:
            return _error(exc)
        is_ready = await service.model_ready(params["model"], params.get("version", ""))
        return _json({"name": params["model"], "ready": is_ready}, 200 if is_ready else 503)

    async def infer(request: Request) -> Response:
        params = request.path_params
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
                raise OIPError(
                    413, f"the body is larger than gateway.max_body_bytes ({settings.max_body_bytes})"
                )
            body = await request.body()
            if len(body) > settings.max_body_bytes:
                raise OIPError(
                    413, f"the body is larger than gateway.max_body_bytes ({settings.max_body_bytes})"
                )
            raw_length = request.headers.get(BINARY_HEADER)
            if raw_length is not None and not raw_length.strip().isdigit():
                raise OIPError(400, f"{BINARY_HEADER} must be a number of bytes, got {raw_length!r}")
            header, inputs = _parse_inputs(body, int(raw_length) if raw_length is not None else None)
            info = OIPRequestInfo(
                authorization=_authorization(request),
                priority=request.headers.get("x-priority"),
                qos_class=request.headers.get("x-qos-class"),
                request_id=str(header.get("id") or ""),
            )
            outputs, decision = await service.infer(
                params["model"], inputs, info, version=params.get("version", "")
            )
            described, parts = _encode_outputs(header, outputs)
        except OIPError as exc:
            return _error(exc)
        answer: dict[str, Any] = {"model_name": params["model"], "model_version": "1", "outputs": described}
        if header.get("id"):
            answer["id"] = header["id"]
        text = json.dumps(answer, separators=(",", ":")).encode()
        if not parts:
            response = Response(text, 200, media_type="application/json")
        else:
            response = Response(
                b"".join([text, *parts]),
                200,
                {BINARY_HEADER: str(len(text))},
                media_type="application/octet-stream",
            )
        # already encoded: no round trip through str and a header dict for every answer
        response.raw_headers.extend(decision_headers(decision))
        return response

    model = "/v2/models/{model}"
    version = "/v2/models/{model}/versions/{version}"
    return [
        Route(model + "/infer", infer, methods=["POST"]),
        Route(version + "/infer", infer, methods=["POST"]),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route(model + "/ready", model_ready),
        Route(version + "/ready", model_ready),
        Route(model, model_metadata),
        Route(version, model_metadata),
    ]
