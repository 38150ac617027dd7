"""Pure decisions: functions of their inputs, no I/O, no threads, no clocks.

The workload advisor places a model on a device::

    from xpuflow.policy import advise_workload
    decision = advise_workload(inventory, model_size=7e9, precision="fp16", strategy="latency")
"""

from xpuflow.policy.advisor import (
    DEFAULT_CONTEXT_TOKENS,
    VALID_PRECISIONS,
    VALID_STRATEGIES,
    VALID_TASKS,
    MemoryEstimate,
    advise_workload,
    estimate_memory,
)
from xpuflow.policy.device_model import DeviceProfile, profile_inventory, profile_resource

__all__ = [
    "DEFAULT_CONTEXT_TOKENS",
    "VALID_PRECISIONS",
    "VALID_STRATEGIES",
    "VALID_TASKS",
    "DeviceProfile",
    "MemoryEstimate",
    "advise_workload",
    "estimate_memory",
    "profile_inventory",
    "profile_resource",
]
