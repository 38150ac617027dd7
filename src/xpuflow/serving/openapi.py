"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand from what the handlers do (``openai_schema`` parses the bodies), so it states the real
contract: every status an endpoint can answer, the OpenAI error shape, and request schemas exactly as
strict as the parser. It is built per gateway, so ``model`` lists the models this gateway serves (per
endpoint: chat models for chat and completions, embedding models for embeddings) and the limits and
the security scheme follow its settings::

    document = openapi_document(catalog.models.values(), settings)
    document["paths"]["/v1/chat/completions"]["post"]["responses"].keys()   # "200", "400", ...

Optional request fields accept ``null`` (the parser treats it as absent); unknown fields are ignored,
so request objects allow additional properties. ``serving.fuzz`` runs schemathesis against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from xpuflow.engine import ModelInfo
from xpuflow.serving.settings import GatewaySettings

__all__ = ["openapi_document"]

_INT64 = 1 << 63
# what the gateway accepts in x-priority: surrounding blanks and any case are fine, empty means normal
_PRIORITY = "^[ \\t]*([Hh][Ii][Gg][Hh]|[Nn][Oo][Rr][Mm][Aa][Ll]|[Ll][Oo][Ww])?[ \\t]*$"
_MAX_STOPS = 4
_MAX_MODEL_CHARS = 256

_ERROR_TEXT = {
    "400": "Bad request: body not a JSON object, bad header, model/endpoint mismatch, Host not allowed",
    "401": "Missing or unknown API key",
    "403": "A key without the right for this endpoint, or the endpoint is disabled",
    "404": "Unknown model, worker or path",
    "405": "Method not allowed (the `Allow` header lists the allowed ones)",
    "413": "Body over max_body_bytes",
    "415": "Body not sent as application/json",
    "422": "A field with a wrong type, range or value, or a field this server does not support",
    "429": "Rate limited by admission control or by the upstream server; see Retry-After",
    "500": "A bug in xpuflow (logged with its traceback)",
    "501": "The engine has no admin control for this operation",
    "502": "A remote model server failed",
    "503": "No worker can take the request, or the server is shutting down; see Retry-After",
    "504": "No answer within the request timeout",
}
_RETRY_AFTER = {
    "retry-after": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"anyOf": [dict(schema), {"type": "null"}]}


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_TEXT[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status in ("429", "503"):
        response["headers"] = dict(_RETRY_AFTER)
    return response


def _errors(*statuses: str) -> dict[str, Any]:
    # 405 (wrong method), 400 (Host) and 503 (shutting down) can answer on every path.
    return {s: _error(s) for s in sorted({"400", "405", "503", *statuses})}


def _json(schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": dict(schema)}}}


def _model_field(names: list[str], task: str) -> dict[str, Any]:
    described = f"A {task} model from GET /v1/models; another name gets 404"
    if names:
        return {"type": "string", "enum": names, "description": described}
    return {"type": "string", "minLength": 1, "maxLength": _MAX_MODEL_CHARS, "description": described}


def _sampling(settings: GatewaySettings) -> dict[str, Any]:
    tokens = {"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit}
    nonempty = {"type": "string", "minLength": 1}
    return {
        "max_completion_tokens": _nullable(tokens),
        "max_tokens": _nullable(tokens),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "stop": _nullable(
            {"anyOf": [nonempty, {"type": "array", "items": nonempty, "maxItems": _MAX_STOPS}]}
        ),
        "seed": _nullable({"type": "integer", "minimum": -_INT64, "maximum": _INT64 - 1}),
        "n": {"enum": [1, None], "description": "Only 1"},
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(
            {"type": "object", "properties": {"include_usage": _nullable({"type": "boolean"})}}
        ),
    }


def _chat_request(models: list[str], settings: GatewaySettings) -> dict[str, Any]:
    part = {
        "type": "object",
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "required": ["type", "text"],
    }
    message = {
        "type": "object",
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]},
        },
        "required": ["role", "content"],
    }
    empty = {"type": "array", "maxItems": 0, "description": "Tool calling is not supported"}
    return {
        "type": "object",
        "properties": {
            "model": _model_field(models, "chat"),
            "messages": {"type": "array", "items": message, "minItems": 1},
            **_sampling(settings),
            "tools": _nullable(empty),
            "functions": _nullable(empty),
            "logprobs": {"enum": [False, None], "description": "Not supported"},
            "response_format": _nullable(
                {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]}
            ),
        },
        "required": ["model", "messages"],
    }


def _completion_request(models: list[str], settings: GatewaySettings) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "model": _model_field(models, "chat"),
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
            **_sampling(settings),
            "echo": {"enum": [False, None], "description": "Not supported"},
            "suffix": {"enum": ["", None], "description": "Not supported"},
            "logprobs": {"enum": [0, None], "description": "Not supported"},
            "best_of": {"enum": [1, None], "description": "Only 1"},
        },
        "required": ["model", "prompt"],
    }


def _embeddings_request(models: list[str], settings: GatewaySettings) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "`dimensions` (an integer) must equal the model's vector size, or 422.",
        "properties": {
            "model": _model_field(models, "embedding"),
            "input": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": settings.max_embedding_inputs,
                    },
                ]
            },
            "encoding_format": {"enum": ["float", "base64", None]},
        },
        "required": ["model", "input"],
    }


_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
    "required": ["prompt_tokens", "total_tokens"],
}
_FINISH = {"anyOf": [{"type": "string"}, {"type": "null"}]}


def _completion_object(kind: str, choice: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"index": {"type": "integer"}, **choice, "finish_reason": _FINISH},
                    "required": ["index", *choice, "finish_reason"],
                },
            },
            "usage": _USAGE,
        },
        "required": ["id", "object", "created", "model", "choices", "usage"],
    }


_MESSAGE = {
    "message": {
        "type": "object",
        "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]}},
        "required": ["role", "content"],
    }
}
_EMBEDDINGS = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "anyOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string", "description": "base64 of little-endian float32"},
                        ]
                    },
                },
                "required": ["object", "index", "embedding"],
            },
        },
        "usage": {"type": "object"},
    },
    "required": ["object", "data", "model"],
}
_MODEL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "task": {"type": "string"},
        "tiers": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "object", "created", "owned_by"],
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
        }
    },
    "required": ["error"],
    "additionalProperties": False,
}
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}


def _inference(
    summary: str, body: Mapping[str, Any], ok: Mapping[str, Any], *, streams: bool, secured: bool
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": dict(ok)}}
    if streams:
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "description": "One server-sent event: a chunk object as JSON, an error object, or [DONE]",
                "properties": {"data": {"type": "string"}},
                "required": ["data"],
            }
        }
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": [
            {
                "name": "x-priority",
                "in": "header",
                "required": False,
                "description": "Order in the worker queues: high, normal (also when empty) or low; any case",
                "schema": {"type": "string", "pattern": _PRIORITY},
            }
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": dict(body)}}},
        "responses": {
            "200": {
                "description": "The answer (server-sent events when `stream` is true)",
                "headers": {"x-request-id": {"schema": {"type": "string"}}},
                "content": content,
            },
            **_errors("401", "403", "404", "413", "415", "422", "429", "500", "502", "504"),
        },
    }
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def _get(summary: str, ok: dict[str, Any], *errors: str, secured: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*errors)}}
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def _admin(summary: str, ok: Mapping[str, Any], *, worker: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {"200": _json(ok, "Done"), **_errors("401", "403", "404", "415", "500", "501")},
    }
    if worker:
        operation["parameters"] = [
            {"name": "worker_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    return operation


def openapi_document(models: Iterable[ModelInfo], settings: GatewaySettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a gateway serving ``models`` with ``settings``."""
    served = list(models)
    chat = sorted(m.name for m in served if m.task != "embedding")
    embed = sorted(m.name for m in served if m.task == "embedding")
    secured = settings.auth_enabled
    drain = {"type": "object", "properties": {"worker": {"type": "string"}, "draining": {"type": "boolean"}}}
    metrics_errors = ("401", "403") if settings.metrics_require_key else ()
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": _inference(
                "Chat completion",
                _chat_request(chat, settings),
                _completion_object("chat.completion", _MESSAGE),
                streams=True,
                secured=secured,
            )
        },
        "/v1/completions": {
            "post": _inference(
                "Text completion of one prompt",
                _completion_request(chat, settings),
                _completion_object("text_completion", {"text": {"type": "string"}}),
                streams=True,
                secured=secured,
            )
        },
        "/v1/embeddings": {
            "post": _inference(
                "One vector per input",
                _embeddings_request(embed, settings),
                _EMBEDDINGS,
                streams=False,
                secured=secured,
            )
        },
        "/v1/models": {
            "get": _get(
                "The logical models",
                _json(
                    {
                        "type": "object",
                        "properties": {
                            "object": {"const": "list"},
                            "data": {"type": "array", "items": _MODEL},
                        },
                        "required": ["object", "data"],
                    },
                    "The models",
                ),
                "401",
                "403",
                secured=secured,
            )
        },
        "/v1/models/{model}": {
            "get": {
                **_get("One model", _json(_MODEL, "The model"), "401", "403", "404", secured=secured),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/health": {"get": _get("Liveness", _json(_STATUS, "The process answers"))},
        "/ready": {
            "get": {
                "summary": "Readiness: 503 while starting, after a failed check, or while draining",
                "responses": {
                    "200": _json(_STATUS, "Ready"),
                    **_errors(),
                    "503": _json(
                        {
                            **_STATUS,
                            "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
                        },
                        "Starting, draining or failed (with the reason)",
                    ),
                },
            }
        },
        "/metrics": {
            "get": _get(
                "Prometheus metrics",
                {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                *metrics_errors,
                secured=settings.metrics_require_key,
            )
        },
        "/admin/workers": {
            "get": {**_admin("Workers and their live state", {"type": "object"}, worker=False)}
        },
        "/admin/workers/{worker_id}/drain": {
            "post": _admin("Send a worker no new requests", drain, worker=True)
        },
        "/admin/workers/{worker_id}/undrain": {"post": _admin("Take a worker back", drain, worker=True)},
        "/admin/reload": {
            "post": _admin(
                "Re-read the config and apply it",
                {"type": "object", "properties": {"reloaded": {"type": "boolean"}, "changes": {}}},
                worker=False,
            )
        },
    }
    del paths["/admin/workers"]["get"]["responses"]["415"]  # a GET sends no body
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "xpuflow gateway",
            "version": "1",
            "description": "OpenAI-compatible endpoints in front of every configured device (docs/api.md).",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
