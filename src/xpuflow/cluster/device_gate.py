"""Device partitions on a cluster node: one ``ComputeTokens`` per partitioned device, shared by the
worker actors of its partitions, which are separate processes.

On one machine the partitions of a device share a ``ComputeTokens`` object in the gateway's process
(``docs/qos.md``). In cluster mode the device's workers are actors on its node, so the tokens live in a
``DeviceGateActor`` placed on the same node, and each worker holds a token around every batch through the
gate's ``cluster.channel``: a token is a stream that the gate answers with ``granted`` once the partition's
fair turn comes, and the token is given back when the worker closes that stream, or when the worker's
connection drops (its process died), so a lost worker never keeps a token::

    gate = DeviceGate.start(ray, device="cpu@a", node_id=..., num_tokens=2, shares={"chat": 0.75, ...})
    await gate.ready()                                    # the actor is up; its channel is open
    hold = RemoteComputeGate(gate.actor, "chat", token)   # in a worker actor: Worker(compute_gate=hold)
    async with hold():                                    # one token of partition "chat" for a batch
        ...
    gate.busy_shares(), gate.granted["chat"]             # the last reading, for status and the dashboard
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from xpuflow.clock import Clock, SystemClock
from xpuflow.cluster.channel import ChannelClient, ChannelClosed, ChannelServer
from xpuflow.cluster.messages import WireError, error_to_wire
from xpuflow.cluster.tasks import Once, cancel_and_wait
from xpuflow.errors import SessionError
from xpuflow.scheduling.qos.partitions import ComputeTokens

__all__ = ["DeviceGate", "DeviceGateActor", "RemoteComputeGate"]

log = logging.getLogger(__name__)


class DeviceGateActor:
    """The Ray actor that holds one device's ``ComputeTokens`` (see the module docstring)."""

    def __init__(self, num_tokens: int, shares: Mapping[str, float], token: str) -> None:
        import ray

        self.tokens = ComputeTokens(num_tokens, dict(shares))
        self._token = token
        self._node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._server = Once(
            lambda: ChannelServer.start((self._call, self._hold), host=self._node_ip, token=self._token)
        )

    async def address(self) -> str:
        """Open the gate's channel if needed; its ``host:port``."""
        return (await self._server()).address

    async def _call(self, wire: Any) -> tuple[str, Any]:
        return "err", WireError("session", f"the device gate answers token streams only, not {wire!r}")

    async def _hold(self, partition: Any) -> AsyncIterator[tuple[str, Any]]:
        try:
            async with self.tokens.hold(str(partition)):
                yield "granted", None
                await asyncio.Event().wait()  # held until the worker closes the stream or goes away
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield "err", error_to_wire(exc)

    async def state(self) -> dict[str, Any]:
        tokens = self.tokens
        return {
            "num_tokens": tokens.num_tokens,
            "granted": dict(tokens.granted),
            "busy_s": dict(tokens.busy_s),
            "held": {name: tokens.held(name) for name in tokens.busy_shares()},
        }


class RemoteComputeGate:
    """A worker's ``compute_gate`` in cluster mode: ``async with gate():`` holds one token of its
    partition on the device's ``DeviceGateActor``."""

    def __init__(self, gate_actor: Any, partition: str, token: str) -> None:
        self._actor = gate_actor
        self.partition = partition
        self._token = token
        self._client: ChannelClient | None = None

    async def _connect(self) -> ChannelClient:
        if self._client is None:
            address = await self._actor.address.remote()
            host, _, port = str(address).rpartition(":")
            self._client = ChannelClient(host, int(port), self._token)
        return self._client

    @asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        client = await self._connect()
        try:
            stream = await client.stream(self.partition)
            kind, value = await stream.next()
        except (ChannelClosed, StopAsyncIteration) as exc:
            self._client = None  # the gate moved or restarted: ask it where it listens next time
            raise SessionError(
                f"the compute gate of partition '{self.partition}' is unreachable: {exc}"
            ) from exc
        try:
            if kind != "granted":
                message = value.message if isinstance(value, WireError) else str(value)
                raise SessionError(f"partition '{self.partition}': {message}")
            yield
        finally:
            stream.close()  # gives the token back

    def __call__(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._hold()


class DeviceGate:
    """The gateway's view of one device's gate actor: starts it, and keeps its last reading (the
    ``ComputeTokens`` fields the orchestrator's partition status reads)."""

    def __init__(
        self,
        actor: Any,
        *,
        device: str,
        num_tokens: int,
        shares: Mapping[str, float],
        clock: Clock | None = None,
        interval_s: float = 1.0,
    ) -> None:
        self.actor = actor
        self.device = device
        self.num_tokens = num_tokens
        self._shares = dict(shares)
        self._clock = clock or SystemClock()
        self._interval_s = interval_s
        self.granted: Counter[str] = Counter()
        self.busy_s: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._poller: asyncio.Task[None] | None = None

    async def ready(self, timeout_s: float = 120.0) -> None:
        await asyncio.wait_for(self.actor.address.remote(), timeout_s)
        await self._read()
        self._poller = asyncio.create_task(self._poll(), name=f"device-gate-{self.device}")

    async def _read(self) -> None:
        state = await asyncio.wait_for(self.actor.state.remote(), 5.0)
        self.granted = Counter(state.get("granted") or {})
        self.busy_s = dict(state.get("busy_s") or {})
        self._held = dict(state.get("held") or {})

    async def _poll(self) -> None:
        while True:
            await self._clock.sleep(self._interval_s)
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("device gate %s: no reading (%s)", self.device, exc)

    def held(self, name: str) -> int:
        return int(self._held.get(name, 0))

    def busy_shares(self) -> dict[str, float]:
        total = sum(self.busy_s.values())
        return {n: (self.busy_s.get(n, 0.0) / total if total > 0 else 0.0) for n in self._shares}

    async def stop(self) -> None:
        if self._poller is not None:
            await cancel_and_wait(self._poller)
            self._poller = None
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)
