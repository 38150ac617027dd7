"""``xpuflow.advise``: the workload advisor on this machine's inventory.

The decision itself is pure (``policy.advisor``); this module only supplies the inventory, detecting
it once per process when the caller passes none::

    decision = xpuflow.advise(7e9, batch_size=8, precision="bf16", strategy="latency")
    decision.device, decision.reason
"""

from __future__ import annotations

import threading

from xpuflow.discovery.inventory import Inventory
from xpuflow.types import Precision, RoutingDecision, Strategy, Task

__all__ = ["advise", "detect"]

_lock = threading.Lock()
_cached: Inventory | None = None


def detect(*, refresh: bool = False) -> Inventory:
    """This machine's inventory. Detected once per process; ``refresh=True`` probes again
    (free memory changes as models load, so refresh before placement decisions that depend on it)."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            _cached = Inventory.detect()
        return _cached


def advise(
    model_size: float,
    batch_size: int = 1,
    precision: str | Precision = "fp32",
    strategy: str | Strategy = "auto",
    task: str | Task = "inference",
    model_format: str | None = None,
    inventory: Inventory | None = None,
) -> RoutingDecision:
    """Where a workload of ``model_size`` parameters fits best, with the reason and the alternatives.

    Raises ConfigError for invalid inputs (naming the valid values) and CapabilityError when no
    device can hold the model.
    """
    from xpuflow.policy.advisor import advise_workload

    return advise_workload(
        inventory if inventory is not None else detect(),
        model_size,
        batch_size=batch_size,
        precision=precision,
        strategy=strategy,
        task=task,
        model_format=model_format,
    )
