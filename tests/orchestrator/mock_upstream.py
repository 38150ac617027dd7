"""A scripted OpenAI-compatible upstream on 127.0.0.1, in its own process, for fault tests.

    python mock_upstream.py --delay-ms 20 --stream-s 2     # prints "ready <port>" once listening

Chat completions answer after ``--delay-ms`` (the first one after ``--first-delay-ms``: a cold start);
streams send five events spread over ``--stream-s``.
``GET /health`` answers at once. ``POST /admin/fail?seconds=5`` makes completions answer 500 for that
long (the process keeps running), so a test can fail every upstream at once and heal them. Its own
process, so a test can SIGSTOP, SIGCONT and kill it like a real server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def _reply(text: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": "mock",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _event(text: str | None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


def make_app(delay_s: float, stream_s: float, name: str, first_delay_s: float = 0.0) -> web.Application:
    failing_until = [0.0]
    cold = [first_delay_s > 0]

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if time.monotonic() < failing_until[0]:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if not body.get("stream"):
            if cold[0]:
                cold[0] = False
                await asyncio.sleep(first_delay_s)
            await asyncio.sleep(delay_s)
            return web.json_response(_reply(name))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = [name, " a", " b", " c", " d"]
        for word in words:
            await response.write(_event(word))
            await asyncio.sleep(stream_s / len(words))
        await response.write(_event(None, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def fail(request: web.Request) -> web.Response:
        failing_until[0] = time.monotonic() + float(request.query.get("seconds", "5"))
        return web.json_response({"failing_for_s": request.query.get("seconds", "5")})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_post("/admin/fail", fail)
    return app


async def main(port: int, delay_s: float, stream_s: float, name: str, first_delay_s: float) -> None:
    runner = web.AppRunner(make_app(delay_s, stream_s, name, first_delay_s), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"ready {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--stream-s", type=float, default=1.0)
    parser.add_argument("--name", default="mock")
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(
        main(args.port, args.delay_ms / 1000.0, args.stream_s, args.name, args.first_delay_ms / 1000.0)
    )
