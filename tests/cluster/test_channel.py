"""``cluster.channel`` on loopback, without Ray: answers, streams, cancellation both ways, the token,
and what a closed connection does to the calls it carried."""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from xpuflow.cluster.channel import ChannelClient, ChannelClosed, ChannelServer

TOKEN = "secret-token"


class Handlers:
    """Echo handlers that record what was started and what was cancelled."""

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.cancelled: list[Any] = []
        self.release = asyncio.Event()

    async def call(self, wire: Any) -> tuple[str, Any]:
        self.started.append(wire)
        try:
            if wire == "wait":
                await self.release.wait()
            if wire == "fail":
                return "err", "it failed"
            if wire == "unpicklable":
                return "ok", lambda: None  # a result that cannot cross the wire
            return "ok", {"echo": wire}
        except asyncio.CancelledError:
            self.cancelled.append(wire)
            raise

    async def stream(self, wire: Any) -> AsyncIterator[tuple[str, Any]]:
        self.started.append(wire)
        try:
            for i in range(int(wire["n"])):
                if wire.get("slow"):
                    await asyncio.sleep(0.01)
                yield "chunk", i
        except asyncio.CancelledError:
            self.cancelled.append(wire)
            raise


async def _pair(handlers: Handlers) -> tuple[ChannelServer, ChannelClient]:
    server = await ChannelServer.start((handlers.call, handlers.stream), host="127.0.0.1", token=TOKEN)
    return server, ChannelClient("127.0.0.1", server.port, TOKEN)


async def _drain(stream: Any) -> None:
    while True:
        await asyncio.wait_for(stream.next(), 1.0)


async def _until(check: Any, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.005)


def test_calls_and_streams_are_answered_over_one_connection() -> None:
    async def go() -> None:
        handlers = Handlers()
        server, client = await _pair(handlers)
        try:
            answers = await asyncio.gather(*(client.call(i) for i in range(50)))
            assert answers == [("ok", {"echo": i}) for i in range(50)]
            assert await client.call("fail") == ("err", "it failed")
            kind, error = await asyncio.wait_for(client.call("unpicklable"), 2.0)  # answered, not lost
            assert kind == "err"
            assert "pickle" in error.message.lower()
            stream = await client.stream({"n": 5})
            assert [value async for _kind, value in stream] == [0, 1, 2, 3, 4]
            big = "x" * 3_000_000  # frames larger than a socket read arrive whole
            assert await client.call(big) == ("ok", {"echo": big})
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(go())


def test_cancelling_a_call_or_closing_a_stream_cancels_it_on_the_server() -> None:
    async def go() -> None:
        handlers = Handlers()
        server, client = await _pair(handlers)
        try:
            waiting = asyncio.ensure_future(client.call("wait"))
            await _until(lambda: "wait" in handlers.started)
            waiting.cancel()
            await _until(lambda: "wait" in handlers.cancelled)

            wire = {"n": 1000, "slow": True}
            stream = await client.stream(wire)
            assert await stream.next() == ("chunk", 0)
            stream.close()
            await _until(lambda: wire in handlers.cancelled)
            assert await client.call(7) == ("ok", {"echo": 7})  # the connection carries on
        finally:
            await client.aclose()
            await server.aclose()

    asyncio.run(go())


def test_a_closed_server_fails_open_calls_and_streams_at_once() -> None:
    async def go() -> None:
        handlers = Handlers()
        server, client = await _pair(handlers)
        waiting = asyncio.ensure_future(client.call("wait"))
        stream = await client.stream({"n": 1000, "slow": True})
        await _until(lambda: "wait" in handlers.started)
        await server.aclose()  # as when the actor stops or its process dies
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(waiting, 1.0)
        with pytest.raises(ChannelClosed):
            await _drain(stream)
        with pytest.raises(ChannelClosed, match="cannot open"):
            await client.call(1)  # nobody listens there any more

    asyncio.run(go())


def test_a_gateway_that_goes_away_cancels_its_work_on_the_server() -> None:
    async def go() -> None:
        handlers = Handlers()
        server, client = await _pair(handlers)
        try:
            waiting = asyncio.ensure_future(client.call("wait"))
            await _until(lambda: "wait" in handlers.started)
            await client.aclose()
            await _until(lambda: "wait" in handlers.cancelled)
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(waiting, 1.0)
        finally:
            await server.aclose()

    asyncio.run(go())


def test_a_peer_without_the_token_is_cut_off_before_anything_is_unpickled() -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (exec, ("raise SystemExit('unpickled')",))

    async def go() -> None:
        handlers = Handlers()
        server, _client = await _pair(handlers)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            for body in (b"wrong-token", pickle.dumps(("call", 1, Boom()))):
                writer.write(struct.pack(">I", len(body)) + body)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 2.0) == b""  # closed, nothing answered
            assert handlers.started == []
            writer.close()

            wrong = ChannelClient("127.0.0.1", server.port, "not-the-token")
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(wrong.call(1), 2.0)
        finally:
            await server.aclose()

    asyncio.run(go())
