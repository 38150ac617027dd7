"""Which requests may share a batch, and how a batch becomes calls on a session.

Pure mapping, no scheduling: the worker decides *when* a batch runs; this module decides *with whom*
a request may run and *what* the session is asked::

    group = batch_group(request)                     # equal groups may share a batch
    results = await run_batch(session, [r1, r2, r3], native=True)   # one chat_batch call

Compatibility. Requests share a batch when their ``WorkRequest.batch_key()`` (kind, streaming,
temperature, top_p, stop, seed) and their ``max_tokens`` are equal. Sessions return text, not tokens,
so a result generated to a larger limit cannot be cut back to a smaller one exactly (the transformers
session stops each row at its end-of-sequence token but runs the batch to its largest limit), and a
16-token request would wait for a 512-token batch-mate. Streamed requests run alone.

Calls. A session that batches natively (``BatchMode.NATIVE``) gets the batch forms: ``chat_batch``,
``generate_batch``, and one ``embed`` over every text of every request in the batch, split back per
request. Other sessions get the single forms, one request at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Hashable, Sequence
from typing import Any

from xpuflow.backends.base import Completion, Session, StreamChunk
from xpuflow.errors import ConfigError, SessionError
from xpuflow.scheduling.request import RequestKind, WorkRequest

__all__ = ["Result", "batch_group", "open_stream", "run_batch", "run_one", "work_units"]

Result = Completion | list[list[float]] | dict[str, Any]
"""What a request gets back: a completion, one vector per text of an embedding request, or the named
outputs of a tensor request."""


def batch_group(request: WorkRequest, streaming: bool = False) -> Hashable:
    """Requests with equal groups may share a batch."""
    if streaming:
        return ("stream", request.request_id)  # streams run alone
    if request.kind is RequestKind.EMBEDDING:
        return (request.kind,)
    return (*request.batch_key(), request.params.max_tokens)


def work_units(request: WorkRequest) -> float:
    """The work of one request, for service times per unit: ``max_tokens`` for generation, 1 for
    embeddings."""
    if request.kind in (RequestKind.EMBEDDING, RequestKind.TENSOR):
        return 1.0
    return float(request.params.max_tokens)


async def run_batch(
    session: Session, requests: Sequence[WorkRequest], *, native: bool, owner: str = "worker"
) -> list[Result]:
    """Run one batch of same-group requests; results in the requests' order. ``owner`` names the
    worker in error messages."""
    first = requests[0]
    params = first.params
    payloads = [r.payload for r in requests]
    if first.kind is RequestKind.EMBEDDING:
        if not (native and len(requests) > 1):
            return [await session.embed(texts) for texts in payloads]
        flat = [text for texts in payloads for text in texts]
        vectors = await session.embed(flat)
        if len(vectors) != len(flat):
            raise SessionError(f"session of {owner} returned {len(vectors)} vectors for {len(flat)} texts")
        out: list[Result] = []
        start = 0
        for texts in payloads:
            out.append(vectors[start : start + len(texts)])
            start += len(texts)
        return out
    if first.kind is RequestKind.TENSOR:
        # a session that batches tensors natively joins the batch's rows into one call (kserve_v2)
        run_many = getattr(session, "run_batch", None)
        if native and len(requests) > 1 and callable(run_many):
            return list(await run_many(payloads))
        return [await session.run(p) for p in payloads]
    if first.kind is RequestKind.CHAT:
        if native:
            return list(await session.chat_batch(payloads, params))
        return [await session.chat(p, params) for p in payloads]
    if native:
        return list(await session.generate_batch(payloads, params))
    return [await session.generate(p, params) for p in payloads]


def run_one(
    session: Session, request: WorkRequest, *, native: bool, owner: str = "worker"
) -> Awaitable[Result]:
    """What ``run_batch(session, [request], ...)`` runs, as the session's own call where there is one
    (its awaitable, not a coroutine around it: a worker's fast path awaits it in the caller's task)."""
    kind = request.kind
    if not native:
        if kind is RequestKind.CHAT:
            return session.chat(request.payload, request.params)
        if kind is RequestKind.COMPLETION:
            return session.generate(request.payload, request.params)
        if kind is RequestKind.EMBEDDING:
            return session.embed(request.payload)
    return _first(run_batch(session, [request], native=native, owner=owner))


async def _first(results: Awaitable[list[Result]]) -> Result:
    return (await results)[0]


def open_stream(session: Session, request: WorkRequest) -> AsyncIterator[StreamChunk]:
    """The session's stream for a chat or completion request."""
    if request.kind is RequestKind.CHAT:
        return session.stream_chat(request.payload, request.params)
    if request.kind is RequestKind.COMPLETION:
        return session.stream_generate(request.payload, request.params)
    raise ConfigError("embedding requests cannot be streamed", field="stream")
