"""xpuflow device types as Ray resources, so Ray places a worker where its kind of device is.

Ray knows ``CPU``, ``GPU`` and ``memory`` by itself; other accelerators are custom resources that a node
declares when it joins (``ray start --resources '{"accel_npu": 1}'``)::

    ray_resources_for(ResourceType.NPU)                 # {"accel_npu": 1.0}
    ray_resources_for(ResourceType.CPU, num_cpus=2.0)   # {"CPU": 2.0}

Pure data: no Ray import here.
"""

from __future__ import annotations

from collections.abc import Mapping

from xpuflow.types import ResourceType

__all__ = ["RAY_RESOURCE", "node_has_room", "ray_resources_for"]

#: The Ray resource one device of each type is counted in (None: nothing to reserve).
RAY_RESOURCE: Mapping[ResourceType, str | None] = {
    ResourceType.GPU: "GPU",
    ResourceType.IGPU: "accel_igpu",
    ResourceType.NPU: "accel_npu",
    ResourceType.PIM: "accel_pim",
    ResourceType.CPU: "CPU",
    ResourceType.REMOTE: None,  # a remote server is reached over the network, from any node
}


def ray_resources_for(
    device_type: ResourceType, *, num_cpus: float = 1.0, memory_bytes: int | None = None
) -> dict[str, float]:
    """The Ray resources one worker on a device of ``device_type`` reserves: one accelerator, or
    ``num_cpus`` CPUs for a CPU worker, plus ``memory`` (bytes) when the model's size is known."""
    name = RAY_RESOURCE[ResourceType(device_type)]
    wanted: dict[str, float] = {}
    if name == "CPU":
        if num_cpus > 0:
            wanted["CPU"] = float(num_cpus)
    elif name is not None:
        wanted[name] = 1.0
    if memory_bytes:
        wanted["memory"] = float(memory_bytes)
    return wanted


def node_has_room(node_resources: Mapping[str, float], wanted: Mapping[str, float]) -> str | None:
    """None when a node offering ``node_resources`` can hold ``wanted``; else why not."""
    for name, amount in wanted.items():
        have = float(node_resources.get(name, 0.0))
        if have + 1e-9 < amount:
            return f"needs {name}={amount:g}, the node offers {have:g}"
    return None
