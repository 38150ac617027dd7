"""Model residency: which models are loaded on one device, loaded on demand, idled out, and evicted
least recently used by bytes.

Each resident model holds an unsheddable grant of its context's budget in the device's
``AdmissionController``, so models and requests share one account. To make room, the least recently
used models are unloaded first, never a pinned one, one in use, or one held by a Guaranteed context.
After each unload the device's free memory is measured again through ``free_bytes`` (allocators do
not always give memory back) and the difference is recorded as external memory. Loading and
unloading are injected coroutines, so a real session or a fake does the work::

    residency = ModelResidency(controller, load=open_session, unload=close_session, free_bytes=probe)
    residency.register("chat/0", 900 * MB, context="models", keep_alive_s=300)
    async with residency.hold("chat/0") as held:    # loads it (evicting LRU models) unless resident
        await held.handle.chat(...)                 # held.cold: this hold loaded it
    await residency.idle_out()                      # unloads what was unused for its keep_alive_s

A model in use is never unloaded: ``hold`` counts users, and a model leaves the table before its
unload is awaited, so a request that arrives meanwhile loads it again instead of using a closing one.
A load that would fit once the models in use now are released waits for them (``wait_for_room_s``)
instead of failing; one that pinned or Guaranteed models block fails at once (``ModelDoesNotFit``).
Loads and evictions of one device are serialised by a lock; a request for a model that is already
resident never waits for it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from xpuflow.errors import AdmissionRejected, ConfigError, ModelDoesNotFit
from xpuflow.scheduling.qos.admission import AdmissionController, Grant, QoSPolicy, _fmt

__all__ = ["Held", "ModelDoesNotFit", "ModelResidency", "ResidentModel"]

LoadFn = Callable[[str], Awaitable[Any]]
UnloadFn = Callable[[str, Any], Awaitable[None]]
FreeBytesFn = Callable[[], int | None]


@dataclass(eq=False, slots=True)
class ResidentModel:
    name: str
    context: str
    size_bytes: int
    handle: Any
    grant: Grant
    pinned: bool = False
    in_use: int = 0
    loaded_at_s: float = 0.0
    last_used_s: float = 0.0
    keep_alive_s: float | None = None


@dataclass(frozen=True, slots=True)
class Held:
    """A model held for one use: its handle, and whether this hold loaded it (a cold start)."""

    handle: Any
    cold: bool


@dataclass(slots=True)
class _Known:
    size_bytes: int
    context: str
    pinned: bool
    keep_alive_s: float | None
    loads: int = 0
    evictions: int = 0
    load_ms: list[float] = field(default_factory=list)


class ModelResidency:
    """Loads and evicts models on one device; see the module docstring. One event loop at a time."""

    def __init__(
        self,
        controller: AdmissionController,
        *,
        load: LoadFn,
        unload: UnloadFn,
        free_bytes: FreeBytesFn | None = None,
        now_s: Callable[[], float] = lambda: 0.0,
        retry_after_s: float = 5.0,
        wait_for_room_s: float = 0.0,
    ) -> None:
        self._ctrl = controller
        self._load = load
        self._unload = unload
        self._free_bytes = free_bytes
        self._now_s = now_s
        self._retry_after_s = retry_after_s
        self._models: OrderedDict[str, ResidentModel] = OrderedDict()  # least recently used first
        self._known: dict[str, _Known] = {}
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()  # set when a model's last user lets go (room may be evictable)
        self._wait_for_room_s = wait_for_room_s
        self.loads = 0
        self.evictions = 0
        self.idle_unloads = 0

    @property
    def controller(self) -> AdmissionController:
        return self._ctrl

    @property
    def resident(self) -> list[str]:
        """Model names, least recently used first."""
        return list(self._models)

    def get(self, name: str) -> ResidentModel | None:
        return self._models.get(name)

    def resident_bytes(self) -> int:
        return sum(m.size_bytes for m in self._models.values())

    # -- what may be loaded --------------------------------------------------------------------------

    def register(
        self,
        name: str,
        size_bytes: int,
        *,
        context: str,
        pinned: bool = False,
        keep_alive_s: float | None = None,
    ) -> None:
        """Declare a model that ``hold`` and ``load`` may load later (its size, context and rules)."""
        if size_bytes <= 0:
            raise ConfigError(f"model '{name}' size must be positive", field="size_bytes")
        self._known[name] = _Known(size_bytes, context, pinned, keep_alive_s)

    def adopt(self, name: str, size_bytes: int, handle: Any, *, context: str, pinned: bool = True) -> None:
        """Account a model that is already loaded (a pinned deployment loaded at start). Raises
        ModelDoesNotFit when the budget cannot hold it; nothing is evicted for it."""
        self.register(name, size_bytes, context=context, pinned=pinned)
        reason = self._ctrl.check(context, size_bytes, sheddable=False)
        if reason is not None:
            raise ModelDoesNotFit(
                f"model '{name}' holds {_fmt(size_bytes)}, more than the budget has left "
                f"({_fmt(self._ctrl.available_bytes())} free); raise the budget or load it on demand",
                reasons=[reason],
            )
        grant = self._ctrl.admit(context, size_bytes, now_s=self._now_s(), sheddable=False).grant
        assert grant is not None
        now = self._now_s()
        self._models[name] = ResidentModel(name, context, size_bytes, handle, grant, pinned, 0, now, now)

    # -- using a model -------------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[Held]:
        """Hold a registered model for one use, loading it first if needed (see ``ensure``)."""
        model = self._models.get(name)
        cold = False
        if model is None:
            async with self._lock:
                model = self._models.get(name)
                if model is None:
                    await self._ensure_locked(name)
                    model = self._models[name]
                    cold = True
        model.in_use += 1  # no await between the lookup and this: an eviction cannot slip in
        self._models.move_to_end(name)
        try:
            yield Held(model.handle, cold)
        finally:
            model.in_use -= 1
            model.last_used_s = self._now_s()
            if not model.in_use:
                self._released.set()

    async def ensure(
        self, name: str, size_bytes: int | None = None, *, context: str | None = None, pinned: bool = False
    ) -> Any:
        """Return the loaded model's handle, loading it (and evicting LRU models) if needed. A model not
        registered yet is registered with ``size_bytes`` and ``context``.

        Raises ModelDoesNotFit naming the sizes when no set of evictable models frees enough room,
        and nothing is evicted in that case."""
        known = self._known.get(name)
        if known is None:
            if size_bytes is None or context is None:
                raise ConfigError(f"model '{name}' is not registered; give its size and context")
            self.register(name, size_bytes, context=context, pinned=pinned)
        elif name not in self._models:
            # the next load takes these (a model may come back in another context or unpinned)
            known.size_bytes = size_bytes or known.size_bytes
            known.context = context or known.context
            known.pinned = pinned
        async with self._lock:
            model = self._models.get(name)
            if model is not None:
                self._models.move_to_end(name)
                model.pinned = model.pinned or pinned
                self._known[name].pinned = model.pinned
                return model.handle
            return await self._ensure_locked(name)

    async def _ensure_locked(self, name: str) -> Any:
        known = self._known.get(name)
        if known is None:
            raise ConfigError(f"model '{name}' is not registered with the residency of its device")
        size_bytes, context = known.size_bytes, known.context
        waited_until = self._now_s() + self._wait_for_room_s
        evicted = 0
        while True:
            self.remeasure()  # plan with what the device holds now, not what the last unload left
            _victims, reason = self._plan(context, size_bytes)
            if reason is None:
                # Evict least recently used first, only until it fits: after each unload memory is
                # re-measured. A planned victim that a request took meanwhile (hold() needs no lock) is
                # skipped; if what is left no longer makes room, plan again.
                while self._ctrl.check(context, size_bytes, sheddable=False) is not None:
                    candidates = self._candidates()
                    if not candidates:
                        break
                    await self._evict_locked(candidates[0].name)
                    evicted += 1
                if self._ctrl.check(context, size_bytes, sheddable=False) is None:
                    break
                continue
            left = waited_until - self._now_s()
            if not self._room_after_users(context, size_bytes) or left <= 0:
                held = self.resident_bytes() - sum(m.size_bytes for m in self._candidates())
                raise ModelDoesNotFit(
                    f"model '{name}' needs {_fmt(size_bytes)} in context '{context}' but it does not fit "
                    f"even after evicting every evictable model ({_fmt(held)} is held by pinned, in-use or "
                    f"guaranteed models; {_fmt(self._ctrl.available_bytes())} free now); retry when a "
                    f"model is released, or raise the device's residency budget",
                    retry_after_s=self._retry_after_s,
                    reasons=[reason],
                )
            # models in use hold the room; they can be evicted once their requests end: wait (bounded)
            self._released.clear()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._released.wait(), left)
        try:
            grant = self._ctrl.admit(context, size_bytes, now_s=self._now_s(), sheddable=False).grant
        except AdmissionRejected as exc:  # re-measurement found memory that was not given back
            raise ModelDoesNotFit(
                f"model '{name}' needs {_fmt(size_bytes)} but the device still lacks room after evicting "
                f"{evicted} model(s), because memory was not given back: {exc}",
                retry_after_s=self._retry_after_s,
                reasons=[str(exc)],
            ) from exc
        assert grant is not None
        began = self._now_s()
        try:
            handle = await self._load(name)
        except BaseException:
            self._ctrl.release(grant, "failed", now_s=self._now_s())
            raise
        now = self._now_s()
        self._models[name] = ResidentModel(
            name, context, size_bytes, handle, grant, known.pinned, 0, now, now, known.keep_alive_s
        )
        self.loads += 1
        known.loads += 1
        known.load_ms.append((now - began) * 1000.0)
        del known.load_ms[:-64]
        return handle

    def _plan(self, context: str, size_bytes: int) -> tuple[list[ResidentModel], str | None]:
        """The least recently used evictable models whose unloading makes room, and why it still would
        not fit (None: it fits)."""
        victims: list[ResidentModel] = []
        reason = self._ctrl.check(context, size_bytes, sheddable=False)
        candidates = self._candidates()
        while reason is not None and candidates:
            victims.append(candidates.pop(0))
            reason = self._ctrl.check(
                context, size_bytes, sheddable=False, releasing=[v.grant for v in victims]
            )
        return victims, reason

    def _room_after_users(self, context: str, size_bytes: int) -> bool:
        """Whether it would fit once the models in use now are released and evicted too (pinned and
        Guaranteed ones stay): then waiting helps, else nothing will."""
        releasable = [
            m.grant for m in self._models.values() if not m.pinned and m.grant.qos is not QoSPolicy.GUARANTEED
        ]
        return self._ctrl.check(context, size_bytes, sheddable=False, releasing=releasable) is None

    def _candidates(self) -> list[ResidentModel]:
        """Models that may be evicted, least recently used first."""
        return [
            m
            for m in self._models.values()
            if not m.pinned and m.in_use == 0 and m.grant.qos is not QoSPolicy.GUARANTEED
        ]

    # -- unloading -----------------------------------------------------------------------------------

    async def evict(self, name: str) -> bool:
        """Unload a model now and re-measure free memory; False when it was not loaded. Refuses pinned
        and in-use models."""
        async with self._lock:
            return await self._evict_locked(name)

    async def unload(self, name: str) -> bool:
        """Unload a model whatever holds it (its worker is stopping); False when it was not loaded."""
        async with self._lock:
            return await self._evict_locked(name, force=True)

    async def _evict_locked(self, name: str, *, force: bool = False) -> bool:
        model = self._models.get(name)
        if model is None:
            return False
        if not force and (model.pinned or model.in_use):
            why = "pinned" if model.pinned else f"in use by {model.in_use} request(s)"
            raise ConfigError(f"model '{name}' is {why} and cannot be unloaded now", field="model")
        del self._models[name]  # first: a request arriving during the unload loads it again
        try:
            await self._unload(name, model.handle)
        finally:
            self._ctrl.release(model.grant, "evicted", now_s=self._now_s())
            self.evictions += 1
            known = self._known.get(name)
            if known is not None:
                known.evictions += 1
            self.remeasure()
        return True

    async def idle_out(self) -> list[str]:
        """Unload every model unused for longer than its ``keep_alive_s`` (pinned ones stay)."""
        now = self._now_s()
        idle = [
            m.name
            for m in self._models.values()
            if m.keep_alive_s is not None
            and not m.pinned
            and m.in_use == 0
            and now - m.last_used_s >= m.keep_alive_s
        ]
        gone = []
        for name in idle:
            async with self._lock:
                model = self._models.get(name)
                if model is None or model.in_use or now - model.last_used_s < (model.keep_alive_s or 0):
                    continue
                await self._evict_locked(name)
                self.idle_unloads += 1
                gone.append(name)
        return gone

    def remeasure(self) -> None:
        """Read the device's free bytes and charge what our grants do not explain as external memory."""
        if self._free_bytes is None:
            return
        free = self._free_bytes()
        if free is None:
            return
        ctrl = self._ctrl
        external = ctrl.capacity_bytes - free - ctrl.used_bytes()
        ctrl.set_external_bytes(external, now_s=self._now_s())

    def unpin(self, name: str) -> None:
        model = self._models.get(name)
        if model is not None:
            model.pinned = False
        known = self._known.get(name)
        if known is not None:
            known.pinned = False

    async def close(self) -> None:
        """Unload every model, pinned and in use ones too, and release its grant."""
        async with self._lock:
            for name in list(self._models):
                await self._evict_locked(name, force=True)

    # -- what it looks like --------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One row per registered model: resident or not, bytes, users, idle time, loads, evictions."""
        now = self._now_s()
        rows = []
        for name, known in self._known.items():
            model = self._models.get(name)
            ordered = sorted(known.load_ms)
            rows.append(
                {
                    "name": name,
                    "resident": model is not None,
                    "size_bytes": known.size_bytes,
                    "context": known.context,
                    "pinned": known.pinned,
                    "in_use": model.in_use if model is not None else 0,
                    "idle_s": None if model is None or model.in_use else round(now - model.last_used_s, 3),
                    "keep_alive_s": known.keep_alive_s,
                    "loads": known.loads,
                    "evictions": known.evictions,
                    "load_ms_p50": ordered[len(ordered) // 2] if ordered else None,
                }
            )
        return rows
