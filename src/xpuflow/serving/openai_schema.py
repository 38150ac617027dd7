"""The OpenAI HTTP API as the gateway speaks it: request validation, responses, SSE chunks and errors.

Requests are checked by hand, field by field, because this runs on every call and a schema library
costs more than the rest of the gateway's path; every refusal names its field in ``param``::

    parsed = parse_chat(load_json(body), settings)  # or APIError(422, ..., param="messages[0].role")
    parsed.payload, parsed.params, parsed.stream, parsed.include_usage

    chat_response("chatcmpl-1", "chat", 1700000000, completion)   # bytes, ready to send
    ChatStream("chatcmpl-1", "chat", 1700000000).chunk("Hel")     # b'data: {...}\\n\\n'

Errors take OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is
not a JSON object, 422 for a field with a wrong type, range or value, 404 for an unknown model.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from xpuflow import jsonio
from xpuflow.backends.base import Completion, GenerationParams
from xpuflow.errors import XpuflowError
from xpuflow.serving.settings import GatewaySettings
from xpuflow.types import RequestKind, frozen_from_fields

__all__ = [
    "SSE_DONE",
    "APIError",
    "ChatStream",
    "ParsedRequest",
    "chat_response",
    "completion_response",
    "embeddings_response",
    "error_body",
    "load_json",
    "model_object",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "require_json_content_type",
]

SSE_DONE = b"data: [DONE]\n\n"

_INT64 = 1 << 63
_MAX_STOPS = 4
_MAX_MODEL_CHARS = 256
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(XpuflowError):
    """An HTTP error answer of the gateway, in OpenAI's error shape. Raised and caught inside the HTTP
    layer only; ``headers`` are added to the response (e.g. ``retry-after``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _STATUS_TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """An OpenAI error body."""
    error = {"message": message, "type": type, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(422, f"{param}: {message}", param=param, code=code)


@dataclass(slots=True)
class ParsedRequest:
    """A validated request body: what the engine needs plus how to shape the answer."""

    model: str
    kind: RequestKind
    payload: Any
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None  # OpenAI's end-user id: requests of one user keep going to one worker


# -- reading --------------------------------------------------------------------------------------


def _is_json_media_type(content_type: bytes) -> bool:
    if content_type == b"application/json":
        return True  # what almost every client sends, without the parse below
    media, _, params = content_type.partition(b";")
    media = media.strip().lower()
    if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
        return False
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"charset" and value.strip().strip(b'"').lower() not in (
            b"utf-8",
            b"utf8",
        ):
            return False  # JSON is UTF-8 (RFC 8259); a body in another charset would be misread
    return True


def require_json_content_type(content_type: bytes | None) -> None:
    """Accept ``application/json`` (or an ``application/*+json`` type), with at most a UTF-8 charset.

    Raises APIError 415 otherwise. Why it matters: a web page can POST ``text/plain`` or a form to a
    local gateway without a CORS preflight; a JSON content type cannot be sent that way."""
    if content_type is not None and _is_json_media_type(content_type):
        return
    got = "none" if content_type is None else repr(content_type[:100].decode("latin-1"))
    raise APIError(
        415,
        f"the request body must be JSON sent with 'Content-Type: application/json' (got {got})",
        param="content-type",
        code="unsupported_media_type",
    )


# 19 digits in a row (found as 19 zeros once every digit reads 0: faster than a regular expression):
# maybe an integer past 64 bits, or digits in a string, for the standard library
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def load_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object. Raises APIError 400 when it is not one."""
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        # (bytes.find, not ``in``: on Python 3.11 ``bytes in bytes`` first tries the needle as an integer
        # and formats the TypeError it then drops, which cost more than the search)
        if body.translate(_DIGITS_TO_ZERO).find(_LONG_DIGITS) < 0:
            # orjson reads what the standard library reads, to the same values, except integers past 64
            # bits (a float for it) and what it refuses (NaN, a lone surrogate, a byte-order mark), which
            # the standard library reads as before, with its exact integers and its error messages
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                data = json.loads(body)
        else:
            data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(
            400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json"
        )
    if (body.find(b"\\ud") >= 0 or body.find(b"\\uD") >= 0) and not _valid_unicode(data):
        raise APIError(400, "the request body holds an unpaired UTF-16 surrogate escape", code="invalid_json")
    return data


def _valid_unicode(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_valid_unicode(k) and _valid_unicode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_valid_unicode(v) for v in value)
    return True


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise _invalid("model", "missing required field; name one of the models at GET /v1/models", "missing")
    if not isinstance(model, str) or not model or len(model) > _MAX_MODEL_CHARS:
        raise _invalid("model", f"must be a non-empty string of at most {_MAX_MODEL_CHARS} characters")
    return model


def _bool(data: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(name, f"must be true or false, got {_type_name(value)}")
    return value


def _number(
    data: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"must be a number, got {_type_name(value)}")
    ok = (low < value if low_open else low <= value) and value <= high  # NaN fails both
    if not ok:
        bracket = "(" if low_open else "["
        raise _invalid(name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _int(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 8.0 is the integer 8 (as JSON Schema says)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"must be an integer, got {_type_name(value)}")
    if not low <= value <= high:
        raise _invalid(name, f"must be between {low} and {high}, got {value}")
    return value


def _refuse(data: Mapping[str, Any], name: str, allowed: tuple[Any, ...], why: str) -> None:
    value = data.get(name)
    # compared as JSON values: 0 is not false (Python says it is), 1.0 is 1
    if value is not None and not any(
        isinstance(value, bool) == isinstance(ok, bool) and value == ok for ok in allowed
    ):
        raise _invalid(name, why, "unsupported_value")


def _stop(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > _MAX_STOPS:
        raise _invalid("stop", f"must be a string or a list of at most {_MAX_STOPS} strings")
    for i, stop in enumerate(stops):
        if not isinstance(stop, str) or not stop:
            raise _invalid(f"stop[{i}]" if value is stops else "stop", "must be a non-empty string")
    return tuple(stops)


def _params(data: Mapping[str, Any], settings: GatewaySettings) -> GenerationParams:
    # Each check runs only for a field the body has (a missing field and null read the same): most
    # bodies name two or three of them, and this runs on every request. Both max_tokens fields are
    # checked, so a bad value is refused even where the other one wins.
    limit = settings.max_tokens_limit
    max_tokens = _int(data, "max_completion_tokens", 1, limit) if "max_completion_tokens" in data else None
    legacy = _int(data, "max_tokens", 1, limit) if "max_tokens" in data else None
    if max_tokens is None:
        max_tokens = legacy
    temperature = _number(data, "temperature", 0.0, 2.0) if "temperature" in data else None
    top_p = _number(data, "top_p", 0.0, 1.0, low_open=True) if "top_p" in data else None
    seed = _int(data, "seed", -_INT64, _INT64 - 1) if "seed" in data else None
    n = data.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _invalid("n", f"only n=1 is supported, got {n!r}", "unsupported_value")
    # GenerationParams(...) without its __init__: every value is checked above (and default_max_tokens
    # by GatewaySettings), which is all its __post_init__ checks
    return frozen_from_fields(
        GenerationParams,
        {
            "max_tokens": settings.default_max_tokens if max_tokens is None else max_tokens,
            "temperature": 0.0 if temperature is None else temperature,
            "top_p": 1.0 if top_p is None else top_p,
            "stop": _stop(data) if "stop" in data else (),
            "seed": seed,
        },
    )


def _stream(data: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(data, "stream")
    options = data.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _invalid("stream_options", f"must be an object, got {_type_name(options)}")
    return stream, _bool(options, "include_usage") if "include_usage" in options else False


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict):
                raise _invalid(f"{where}[{j}]", "must be an object such as {'type': 'text', 'text': '...'}")
            kind = part.get("type")
            if kind != "text":
                raise _invalid(
                    f"{where}[{j}].type",
                    f"only 'text' content parts are supported, got {kind!r}",
                    "unsupported_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid(f"{where}[{j}].text", f"must be a string, got {_type_name(text)}")
            texts.append(text)
        return "\n".join(texts)
    raise _invalid(where, f"must be a string or a list of text parts, got {_type_name(value)}")


def _messages(data: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = data.get("messages")
    if messages is None:
        raise _invalid("messages", "missing required field; send a list of {role, content}", "missing")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(
                f"messages[{i}]", f"must be an object with role and content, got {_type_name(message)}"
            )
        role = message.get("role")
        mapped = _ROLES.get(role) if isinstance(role, str) else None
        if mapped is None:
            raise _invalid(
                f"messages[{i}].role",
                f"must be one of system, developer, user, assistant, got {role!r}",
                "unsupported_value" if role in ("tool", "function") else "invalid_value",
            )
        if "content" not in message:
            raise _invalid(f"messages[{i}].content", "missing required field", "missing")
        out.append({"role": mapped, "content": _content(message["content"], f"messages[{i}].content")})
    return out


def parse_chat(data: Mapping[str, Any], settings: GatewaySettings) -> ParsedRequest:
    """Validate a ``POST /v1/chat/completions`` body."""
    model = _model(data)
    messages = _messages(data)
    # the checks of fields a body rarely has run only when it has them (missing and null read the same)
    if "tools" in data:
        _refuse(data, "tools", ([],), "tool calling is not supported by this server")
    if "functions" in data:
        _refuse(data, "functions", ([],), "function calling is not supported by this server")
    if "logprobs" in data:
        _refuse(data, "logprobs", (False,), "logprobs are not supported by this server")
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _invalid("response_format", "only {'type': 'text'} is supported", "unsupported_value")
    stream, include_usage = _stream(data) if "stream" in data or "stream_options" in data else _NO_STREAM
    params = _params(data, settings)
    user = _user(data) if "user" in data else None
    return ParsedRequest(model, RequestKind.CHAT, messages, params, stream, include_usage, user=user)


_NO_STREAM = (False, False)


def parse_completion(data: Mapping[str, Any], settings: GatewaySettings) -> ParsedRequest:
    """Validate a ``POST /v1/completions`` body (one prompt per request)."""
    model = _model(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise _invalid("prompt", "missing required field; send a string", "missing")
    if not isinstance(prompt, str):
        raise _invalid(
            "prompt", "must be a string (or a list holding one string); token arrays are not supported"
        )
    _refuse(data, "echo", (False,), "echo is not supported by this server")
    _refuse(data, "suffix", ("",), "suffix is not supported by this server")
    _refuse(data, "logprobs", (0,), "logprobs are not supported by this server")
    _refuse(data, "best_of", (1,), "best_of other than 1 is not supported by this server")
    stream, include_usage = _stream(data)
    return ParsedRequest(
        model,
        RequestKind.COMPLETION,
        prompt,
        _params(data, settings),
        stream,
        include_usage,
        user=_user(data),
    )


def _user(data: Mapping[str, Any]) -> str | None:
    user = data.get("user")
    if user is None or user == "":
        return None
    if not isinstance(user, str) or len(user) > 256:
        raise _invalid("user", "must be a string of at most 256 characters (an end-user id)")
    return user


def parse_embeddings(data: Mapping[str, Any], settings: GatewaySettings) -> ParsedRequest:
    """Validate a ``POST /v1/embeddings`` body."""
    model = _model(data)
    texts = data.get("input")
    if texts is None:
        raise _invalid("input", "missing required field; send a string or a list of strings", "missing")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or len(texts) > settings.max_embedding_inputs:
        raise _invalid("input", f"must be a string or a list of 1 to {settings.max_embedding_inputs} strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise _invalid(
                f"input[{i}]", f"must be a string (token arrays are not supported), got {_type_name(text)}"
            )
    fmt = data.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _invalid("encoding_format", f"must be 'float' or 'base64', got {fmt!r}")
    dimensions = _int(data, "dimensions", 1, 1 << 16)
    return ParsedRequest(
        model,
        RequestKind.EMBEDDING,
        texts,
        GenerationParams(),
        encoding_format=fmt or "float",
        dimensions=dimensions,
    )


# -- writing --------------------------------------------------------------------------------------


def _dumps(data: Any) -> bytes:
    # a lone surrogate in model output is replaced: it must not turn a finished answer into a 500
    return jsonio.dumps(data)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(
    response_id: str, model: str, created: int, completion: Completion, prompt_tokens: int | None = None
) -> bytes:
    """A ``chat.completion`` object. ``prompt_tokens`` overrides the completion's own count when given."""
    prompt = prompt_tokens or completion.prompt_tokens
    return _dumps(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(prompt, completion.completion_tokens),
        }
    )


def completion_response(
    response_id: str, model: str, created: int, completion: Completion, prompt_tokens: int | None = None
) -> bytes:
    """A ``text_completion`` object."""
    prompt = prompt_tokens or completion.prompt_tokens
    return _dumps(
        {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": completion.text,
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(prompt, completion.completion_tokens),
        }
    )


def embeddings_response(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int, encoding_format: str = "float"
) -> bytes:
    """An embeddings list; ``base64`` packs each vector as little-endian float32, as OpenAI does."""
    data = []
    for i, vector in enumerate(vectors):
        embedding: Any
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        else:
            embedding = [float(x) if math.isfinite(x) else 0.0 for x in vector]
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return _dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


def model_object(name: str, created: int, owned_by: str, **extra: Any) -> dict[str, Any]:
    """One entry of ``GET /v1/models``; ``extra`` carries xpuflow's own fields (task, tiers)."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by, **extra}


_ROLE_CHOICE = b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'


class ChatStream:
    """The SSE events of one streamed chat or text completion. The JSON around the text is formatted
    once per stream; each chunk only encodes its text."""

    def __init__(self, response_id: str, model: str, created: int, *, chat: bool = True) -> None:
        self.chat = chat
        head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion"}
        self._head = _dumps({**head, "created": created, "model": model})[:-1] + b',"choices":'

    def _event(self, choices: bytes, tail: bytes = b"") -> bytes:
        return b"data: " + self._head + choices + tail + b"}\n\n"

    def role(self) -> bytes:
        """The first chat event: the assistant role with empty content (as OpenAI sends it)."""
        return self._event(
            b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
        )

    def chunk(self, text: str, finish_reason: str | None = None) -> bytes:
        finish = b"null" if finish_reason is None else _dumps(finish_reason)
        if self.chat:
            delta = b'{"content":' + _dumps(text) + b"}" if text else b"{}"
            choice = b'[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + finish + b"}]"
        else:
            choice = (
                b'[{"index":0,"text":' + _dumps(text) + b',"logprobs":null,"finish_reason":' + finish + b"}]"
            )
        return self._event(choice)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The last event when ``stream_options.include_usage`` is set: no choices, only usage."""
        return self._event(b"[]", b',"usage":' + _dumps(_usage(prompt_tokens, completion_tokens)))

    @staticmethod
    def error(message: str, type: str = "server_error", code: str | None = None) -> bytes:
        """An error event that ends a stream which failed after it started (clients raise on it)."""
        return b"data: " + error_body(message, type, None, code) + b"\n\n"
