"""The OpenAI wire format: request bodies, responses, stream chunks and server-sent events.

Pure functions and one incremental SSE decoder, no I/O, so the remote backend and llama.cpp (whose
Python API returns OpenAI-shaped dicts) share one reading of the format::

    body = chat_request("smollm2", messages, GenerationParams(max_tokens=16), stream=True)
    decoder = SSEDecoder()
    for data in decoder.feed(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\\n\\n'):
        chunk = stream_chunk(json.loads(data))   # StreamChunk(text='Hi', finish_reason=None)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from xpuflow.backends.base import ChatMessage, Completion, GenerationParams, StreamChunk

# dict first: isinstance against a tuple stops at the exact type before the Mapping ABC's slower check
# (JSON gives dicts; this runs for every streamed event)
_MAPPING = (dict, Mapping)

__all__ = [
    "DONE",
    "SSEDecoder",
    "chat_request",
    "completion_from_response",
    "completion_request",
    "embedding_request",
    "embeddings_from_response",
    "error_message",
    "parse_retry_after",
    "sampling_fields",
    "stream_chunk",
]

#: The payload of the last event of an OpenAI stream.
DONE = "[DONE]"

# Longest server error text carried into an exception message; HTML error pages can be huge.
_MAX_ERROR_CHARS = 500


def sampling_fields(params: GenerationParams) -> dict[str, Any]:
    """The OpenAI sampling fields for ``params`` (temperature 0 means greedy on every server we target)."""
    fields: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        fields["stop"] = list(params.stop)
    if params.seed is not None:
        fields["seed"] = params.seed
    return fields


def chat_request(
    model: str, messages: Sequence[ChatMessage], params: GenerationParams, *, stream: bool = False
) -> dict[str, Any]:
    """The body of ``POST /v1/chat/completions``."""
    return {
        "model": model,
        "messages": [dict(m) for m in messages],
        "stream": stream,
        **sampling_fields(params),
    }


def completion_request(
    model: str, prompt: str, params: GenerationParams, *, stream: bool = False
) -> dict[str, Any]:
    """The body of ``POST /v1/completions``."""
    return {"model": model, "prompt": prompt, "stream": stream, **sampling_fields(params)}


def embedding_request(model: str, texts: Sequence[str]) -> dict[str, Any]:
    """The body of ``POST /v1/embeddings`` for a list of inputs (one vector per input, in order)."""
    return {"model": model, "input": list(texts)}


def _first_choice(body: Mapping[str, Any]) -> Mapping[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], _MAPPING):
        raise ValueError(f"response has no choices: {_truncate(json.dumps(body, default=str))}")
    return choices[0]


def _finish_reason(value: Any) -> str:
    # Servers send "stop", "length", "eos" (TGI), "tool_calls", "content_filter" or nothing at all; the
    # contract only knows "stop" and "length", and running out of tokens is the one callers act on.
    return "length" if value == "length" else "stop"


def completion_from_response(body: Mapping[str, Any], *, default_model: str = "") -> Completion:
    """A ``Completion`` from a chat or text completion response. Raises ValueError if malformed."""
    choice = _first_choice(body)
    message = choice.get("message")
    text = message.get("content") if isinstance(message, _MAPPING) else choice.get("text")
    usage = body.get("usage")
    if not isinstance(usage, _MAPPING):
        usage = {}
    return Completion(
        text=str(text or ""),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=_finish_reason(choice.get("finish_reason")),
        model=str(body.get("model") or default_model),
    )


def stream_chunk(event: Mapping[str, Any]) -> StreamChunk | None:
    """The ``StreamChunk`` in one chat or text completion stream event, or None when it carries nothing
    (a role-only delta). A ``usage`` object on the event (the usage-only last event of
    ``stream_options.include_usage``, or servers that always send it) becomes the chunk's token counts."""
    usage = event.get("usage")
    counts: dict[str, int] = {}
    if isinstance(usage, _MAPPING):
        for key in ("prompt_tokens", "completion_tokens"):
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                counts[key] = value
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], _MAPPING):
        return StreamChunk("", None, **counts) if counts else None
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, _MAPPING) else choice.get("text")
    raw_finish = choice.get("finish_reason")
    finish = _finish_reason(raw_finish) if raw_finish else None
    if not text and finish is None and not counts:
        return None
    return StreamChunk(str(text or ""), finish, **counts)


def embeddings_from_response(body: Mapping[str, Any], expected: int) -> list[list[float]]:
    """The vectors of an embeddings response in input order. Raises ValueError if malformed."""
    data = body.get("data")
    if not isinstance(data, list) or len(data) != expected:
        got = len(data) if isinstance(data, list) else "no"
        raise ValueError(f"embeddings response has {got} vectors for {expected} inputs")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
    return [[float(x) for x in item["embedding"]] for item in ordered]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date; None when absent or
    unreadable (a malformed header must not turn a clear upstream error into a crash)."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        import time

        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def error_message(text: str) -> str:
    """The human message in an error body: OpenAI's ``error.message``, FastAPI's ``detail``, TGI's
    ``error``, or the raw text (shortened)."""
    try:
        body = json.loads(text)
    except ValueError:
        return _truncate(text.strip()) or "(empty body)"
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return _truncate(str(error["message"]))
        if isinstance(error, str) and error:
            return _truncate(error)
        for key in ("detail", "message"):
            if body.get(key):
                value = body[key]
                return _truncate(value if isinstance(value, str) else json.dumps(value))
    return _truncate(text.strip())


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class SSEDecoder:
    """Incremental decoder for ``text/event-stream``: feed bytes as they arrive, get each complete
    event's ``data`` as soon as its blank line arrives.

    Follows the WHATWG rules that matter for OpenAI streams: lines end in LF, CRLF or CR (even split
    across reads); several ``data:`` lines of one event join with LF; comment lines (``:``) and other
    fields are ignored; a partial UTF-8 character waits for its next bytes. ``[DONE]`` is returned like
    any other payload; the caller stops on it.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event completed by ``chunk``, in order."""
        self._buffer += chunk
        events: list[str] = []
        while True:
            line, found = self._next_line()
            if not found:
                return events
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def flush(self) -> list[str]:
        """Events left when the stream ends without a final blank line."""
        if self._buffer:
            self._buffer += b"\n\n"
            return self.feed(b"")
        events = ["\n".join(self._data)] if self._data else []
        self._data = []
        return events

    def _next_line(self) -> tuple[str, bool]:
        buffer = self._buffer
        lf, cr = buffer.find(b"\n"), buffer.find(b"\r")
        if cr == -1 or (lf != -1 and lf < cr):
            if lf == -1:
                return "", False
            end, skip = lf, lf + 1
        elif cr + 1 == len(buffer):
            return "", False  # the LF of a CRLF may come in the next read
        else:
            end, skip = cr, cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
        self._buffer = buffer[skip:]
        # LF and CR never occur inside a multi-byte UTF-8 sequence, so a whole line decodes cleanly.
        return buffer[:end].decode("utf-8", errors="replace"), True
