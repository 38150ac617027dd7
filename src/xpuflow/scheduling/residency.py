"""Model residency: which models are loaded on one device, loaded on demand and evicted LRU by bytes.

Each resident model holds an unsheddable grant of its context's budget in the device's
``AdmissionController``, so models and requests share one account. To make room, the least recently
used models are unloaded first, never a pinned one, one in use, or one held by a Guaranteed context.
After each unload the device's free memory is measured again through ``free_bytes`` (allocators do
not always give memory back) and the difference is recorded as external memory. Loading and
unloading are injected callbacks, so a real session or a fake does the work::

    residency = ModelResidency(controller, load=open_session, unload=close_session, free_bytes=probe)
    handle = residency.ensure("llama-8b", 9 * GB, context="chat")
    with residency.use("llama-8b"):
        ...
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from xpuflow.errors import AdmissionRejected, CapabilityError, ConfigError
from xpuflow.scheduling.admission import AdmissionController, Grant, QoSPolicy, _fmt

__all__ = ["ModelDoesNotFit", "ModelResidency", "ResidentModel"]

LoadFn = Callable[[str], Any]
UnloadFn = Callable[[str, Any], None]
FreeBytesFn = Callable[[], int | None]


class ModelDoesNotFit(CapabilityError):
    """A model cannot be made resident even after every evictable model was unloaded."""


@dataclass(eq=False, slots=True)
class ResidentModel:
    name: str
    context: str
    size_bytes: int
    handle: Any
    grant: Grant
    pinned: bool = False
    in_use: int = 0


class ModelResidency:
    """Loads and evicts models on one device. Not thread-safe; the owner serializes calls."""

    def __init__(
        self,
        controller: AdmissionController,
        *,
        load: LoadFn,
        unload: UnloadFn,
        free_bytes: FreeBytesFn | None = None,
        now_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._ctrl = controller
        self._load = load
        self._unload = unload
        self._free_bytes = free_bytes
        self._now_s = now_s
        self._models: OrderedDict[str, ResidentModel] = OrderedDict()  # least recently used first
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> list[str]:
        """Model names, least recently used first."""
        return list(self._models)

    def get(self, name: str) -> ResidentModel | None:
        return self._models.get(name)

    def resident_bytes(self) -> int:
        return sum(m.size_bytes for m in self._models.values())

    def _candidates(self) -> list[ResidentModel]:
        """Models that may be evicted, least recently used first."""
        return [
            m
            for m in self._models.values()
            if not m.pinned and m.in_use == 0 and m.grant.qos is not QoSPolicy.GUARANTEED
        ]

    def ensure(self, name: str, size_bytes: int, *, context: str, pinned: bool = False) -> Any:
        """Return the loaded model's handle, loading it (and evicting LRU models) if needed.

        Raises ModelDoesNotFit naming the sizes when no set of evictable models frees enough room,
        and nothing is evicted in that case."""
        model = self._models.get(name)
        if model is not None:
            self._models.move_to_end(name)
            model.pinned = model.pinned or pinned
            return model.handle
        if size_bytes <= 0:
            raise ConfigError(f"model '{name}' size must be positive", field="size_bytes")
        victims: list[ResidentModel] = []
        reason = self._ctrl.check(context, size_bytes, sheddable=False)
        candidates = self._candidates()
        while reason is not None and candidates:
            victims.append(candidates.pop(0))
            reason = self._ctrl.check(
                context, size_bytes, sheddable=False, releasing=[v.grant for v in victims]
            )
        if reason is not None:
            held = self.resident_bytes() - sum(m.size_bytes for m in self._candidates())
            raise ModelDoesNotFit(
                f"model '{name}' needs {_fmt(size_bytes)} in context '{context}' but it does not fit even "
                f"after evicting every evictable model ({_fmt(held)} is held by pinned, in-use or "
                f"guaranteed models; {_fmt(self._ctrl.available_bytes())} free now)",
                reasons=[reason],
            )
        # Evict only the victims that turn out to be needed: after each unload, memory is re-measured.
        for victim in victims:
            if self._ctrl.check(context, size_bytes, sheddable=False) is None:
                break
            self.evict(victim.name)
        try:
            grant = self._ctrl.admit(context, size_bytes, now_s=self._now_s(), sheddable=False).grant
        except AdmissionRejected as exc:  # re-measurement found memory that was not given back
            raise ModelDoesNotFit(
                f"model '{name}' needs {_fmt(size_bytes)} but the device still lacks room after evicting "
                f"{len(victims)} model(s): {exc}",
                reasons=[str(exc)],
            ) from exc
        assert grant is not None
        try:
            handle = self._load(name)
        except BaseException:
            self._ctrl.release(grant, "failed", now_s=self._now_s())
            raise
        self._models[name] = ResidentModel(name, context, size_bytes, handle, grant, pinned)
        self.loads += 1
        return handle

    def evict(self, name: str) -> None:
        """Unload a model now and re-measure free memory. Refuses pinned and in-use models."""
        model = self._models.get(name)
        if model is None:
            return
        if model.pinned or model.in_use:
            raise ConfigError(f"model '{name}' is pinned or in use and cannot be evicted", field="model")
        del self._models[name]
        try:
            self._unload(name, model.handle)
        finally:
            self._ctrl.release(model.grant, "evicted", now_s=self._now_s())
            self.evictions += 1
            self.remeasure()

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

    @contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Hold a resident model so it is not evicted while in use."""
        model = self._models.get(name)
        if model is None:
            raise ConfigError(f"model '{name}' is not resident; call ensure() first", field="model")
        model.in_use += 1
        self._models.move_to_end(name)
        try:
            yield model.handle
        finally:
            model.in_use -= 1

    def close(self) -> None:
        """Unload every model and release its grant."""
        for model in list(self._models.values()):
            model.pinned, model.in_use = False, 0
            self.evict(model.name)
