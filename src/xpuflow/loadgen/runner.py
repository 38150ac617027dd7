"""Send a bounded load to one OpenAI-compatible endpoint and time every request.

A ``BenchPlan`` says where and how much; ``run_bench`` sends it with aiohttp and returns one
``RequestRecord`` per request::

    plan = BenchPlan(url="http://127.0.0.1:8000", concurrency=8, num_requests=200, stream=True)
    result = await run_bench(plan, specs=closed_loop_specs(DEFAULT_PROMPTS, plan.max_tokens))

Every run ends by itself: after ``num_requests`` requests or once ``duration_s`` has passed (no request
starts after it; those running finish, each bounded by ``timeout_s``). All traffic goes to ``plan.url``.
With ``stream`` the time to first token (TTFT) and the gaps between content chunks (inter-token latency)
are taken from the arrival times of the SSE chunks.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from xpuflow.errors import ConfigError
from xpuflow.loadgen.arrivals import RequestSpec

__all__ = ["BenchPlan", "BenchResult", "RequestRecord", "endpoint_url", "run_bench"]

#: Most requests in flight when only a rate is set: a server slower than the rate makes arrivals wait
#: for a free slot (their lateness is recorded) instead of opening sockets without end.
DEFAULT_MAX_IN_FLIGHT = 1024
_ERROR_TEXT_CHARS = 300


def endpoint_url(url: str) -> str:
    """The request URL for ``url``: a base (``http://host:8000``), ``.../v1``, or a full
    ``.../v1/chat/completions`` or ``.../v1/completions`` URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"URL must look like http://127.0.0.1:8000, got '{url}'", field="URL")
    path = parts.path.rstrip("/")
    if not path.endswith("/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _check(
    name: str,
    value: float | None,
    low: float,
    expected: str,
    *,
    high: float | None = None,
    exclusive: bool = False,
) -> None:
    if value is None:
        return
    if value < low or (exclusive and value == low) or (high is not None and value > high):
        raise ConfigError(f"{name} must be {expected}, got {value}", field=name)


@dataclass(frozen=True)
class BenchPlan:
    """How to load one endpoint. At least one of ``num_requests`` and ``duration_s`` bounds the run.

    Specs without send times go back to back from ``concurrency`` clients (a closed loop; 1 when
    unset); specs with send times (a rate or a trace) go at those times (an open loop) and
    ``concurrency`` caps how many run at once. ``rate_per_s`` is recorded with the results.
    """

    url: str
    model: str = "chat"
    concurrency: int | None = None
    rate_per_s: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    stream: bool = True
    max_tokens: int = 64
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        endpoint_url(self.url)
        if self.num_requests is None and self.duration_s is None:
            raise ConfigError("bound the run with --requests N or --duration-s S", field="--requests")
        _check("--concurrency", self.concurrency, 1, "from 1 to 100000", high=100_000)
        _check("--rate", self.rate_per_s, 0, "> 0 requests per second", exclusive=True)
        _check("--requests", self.num_requests, 1, ">= 1")
        _check("--duration-s", self.duration_s, 0, "> 0 seconds", exclusive=True)
        _check("--max-tokens", self.max_tokens, 1, ">= 1")
        _check("--timeout-s", self.timeout_s, 0, "> 0 seconds", exclusive=True)

    @property
    def endpoint(self) -> str:
        return endpoint_url(self.url)

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON data; the API key is never written out."""
        return {
            "url": self.endpoint,
            "model": self.model,
            "concurrency": self.concurrency,
            "rate_per_s": self.rate_per_s,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "stream": self.stream,
            "max_tokens": self.max_tokens,
            "timeout_s": self.timeout_s,
            "api_key": "set" if self.api_key else None,
        }


@dataclass
class RequestRecord:
    """How one request went. Times are seconds; ``start_s`` counts from the start of the run.

    ``status`` is the HTTP status, 0 when no response came (``error_kind`` then says why: "timeout" or
    "connection"); a stream that broke or reported an error after a 200 has ``error_kind`` "stream".
    """

    index: int
    start_s: float
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    status: int = 0
    error_kind: str | None = None
    error: str | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    scheduled_s: float | None = None  # the planned send time (open loop); start_s - scheduled_s is lateness

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.status == 200

    @property
    def outcome(self) -> str:
        """``ok``, the HTTP status (``503``), or how it failed (``timeout``, ``connection``, ``stream``)."""
        if self.ok:
            return "ok"
        if self.error_kind in (None, "http"):
            return str(self.status)
        return self.error_kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start_s": round(self.start_s, 6),
            "scheduled_s": None if self.scheduled_s is None else round(self.scheduled_s, 6),
            "latency_ms": round(self.latency_s * 1000.0, 3),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000.0, 3),
            "itl_ms": [round(v * 1000.0, 3) for v in self.itl_s],
            "status": self.status,
            "outcome": self.outcome,
            "error": self.error,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
        }


@dataclass
class BenchResult:
    """All records of a run, in the order they finished, and the run's wall-clock length."""

    plan: BenchPlan
    records: list[RequestRecord]
    wall_s: float
    started_at_s: float  # epoch seconds


def _body(plan: BenchPlan, spec: RequestSpec) -> bytes:
    payload: dict[str, Any] = {"model": plan.model, "max_tokens": spec.max_tokens, "stream": plan.stream}
    if plan.is_chat:
        payload["messages"] = list(spec.prompt.messages)
    else:
        payload["prompt"] = spec.prompt.text
    return json.dumps(payload).encode()


def _error_text(raw: str) -> str:
    """The server's message from an OpenAI error body, or the body itself, cut short."""
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("detail", raw)
        raw = str(message)
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return raw[:_ERROR_TEXT_CHARS]


def _chunk_text(event: dict[str, Any], chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "") if isinstance(delta, dict) else ""
    return str(choice.get("text") or "")


def _usage(record: RequestRecord, event: dict[str, Any]) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            record.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            record.prompt_tokens = usage["prompt_tokens"]


class _Client:
    """One aiohttp session for the run; ``send`` never raises for a failed request."""

    def __init__(self, plan: BenchPlan, session: Any, clock: Callable[[], float], run_start_s: float) -> None:
        self._plan = plan
        self._session = session
        self._clock = clock
        self._run_start_s = run_start_s
        self._url = plan.endpoint
        self._headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if plan.api_key:
            self._headers["Authorization"] = f"Bearer {plan.api_key}"

    async def send(self, index: int, spec: RequestSpec) -> RequestRecord:
        import aiohttp

        started = self._clock()
        record = RequestRecord(index, started - self._run_start_s, scheduled_s=spec.offset_s)
        try:
            await asyncio.wait_for(self._exchange(record, spec, started), self._plan.timeout_s)
        except asyncio.TimeoutError:
            record.error_kind = "timeout"
            record.error = f"no complete answer within {self._plan.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            record.error_kind = "connection" if record.status == 0 else "stream"
            record.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_CHARS]
        except ValueError as exc:  # a 200 whose body is not the JSON it should be
            record.error_kind = "stream"
            record.error = f"bad response body: {exc}"[:_ERROR_TEXT_CHARS]
        record.latency_s = self._clock() - started
        return record

    async def _exchange(self, record: RequestRecord, spec: RequestSpec, started: float) -> None:
        body = _body(self._plan, spec)
        async with self._session.post(self._url, data=body, headers=self._headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error_kind = "http"
                record.error = _error_text(await resp.text(errors="replace"))
            elif self._plan.stream:
                await self._read_stream(resp, record, started)
            else:
                event = await resp.json(content_type=None)
                _usage(record, event if isinstance(event, dict) else {})

    async def _read_stream(self, resp: Any, record: RequestRecord, started: float) -> None:
        chat = self._plan.is_chat
        last: float | None = None
        chunks = 0
        done = False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                error = event["error"]
                record.error_kind = "stream"
                record.error = str(error.get("message", error) if isinstance(error, dict) else error)[
                    :_ERROR_TEXT_CHARS
                ]
                return
            _usage(record, event)
            if _chunk_text(event, chat):
                now = self._clock()
                if last is None:
                    record.ttft_s = now - started
                else:
                    record.itl_s.append(now - last)
                last = now
                chunks += 1
        if not done:
            record.error_kind = "stream"
            record.error = "the stream ended without [DONE]"
        record.output_tokens = record.output_tokens or chunks


async def run_bench(
    plan: BenchPlan,
    specs: Iterator[RequestSpec],
    *,
    on_record: Callable[[RequestRecord], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> BenchResult:
    """Send ``specs`` (at their offsets when they have one, else back to back) until the plan's bound.

    ``on_record`` is called as each request finishes (for a progress bar).
    """
    import aiohttp

    first = next(specs, None)
    if first is None:
        return BenchResult(plan, [], 0.0, time.time())
    specs = itertools.chain([first], specs)
    open_loop = first.offset_s is not None
    limit = plan.concurrency or (DEFAULT_MAX_IN_FLIGHT if open_loop else 1)
    records: list[RequestRecord] = []
    started_at_s = time.time()
    start = clock()
    deadline = None if plan.duration_s is None else start + plan.duration_s
    indices = iter(range(plan.num_requests)) if plan.num_requests is not None else itertools.count()

    def finish(record: RequestRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    def next_spec() -> tuple[int, RequestSpec] | None:
        if deadline is not None and clock() >= deadline:
            return None
        index = next(indices, None)
        spec = None if index is None else next(specs, None)
        return None if index is None or spec is None else (index, spec)

    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        client = _Client(plan, session, clock, start)
        if open_loop:
            await _open_loop(client, next_spec, finish, limit, clock, start, deadline)
        else:

            async def closed_loop_client() -> None:
                while (item := next_spec()) is not None:
                    finish(await client.send(*item))

            await asyncio.gather(*(closed_loop_client() for _ in range(limit)))
    return BenchResult(plan, records, clock() - start, started_at_s)


async def _open_loop(
    client: _Client,
    next_spec: Callable[[], tuple[int, RequestSpec] | None],
    finish: Callable[[RequestRecord], None],
    limit: int,
    clock: Callable[[], float],
    start: float,
    deadline: float | None,
) -> None:
    """Send each spec at its offset; at most ``limit`` at once (a late one waits for a free slot)."""
    slots = asyncio.Semaphore(limit)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, spec: RequestSpec) -> None:
        try:
            finish(await client.send(index, spec))
        finally:
            slots.release()

    while (item := next_spec()) is not None:
        index, spec = item
        send_at = start + (spec.offset_s or 0.0)
        if deadline is not None and send_at >= deadline:
            break
        delay = send_at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(one(index, spec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
