"""``xpuflow.init``: make unchanged ``from_pretrained`` code land on the advised device.

    import xpuflow
    device = xpuflow.init(device="auto")        # a torch.device
    model = AutoModelForCausalLM.from_pretrained(path)   # unchanged line; now on `device`
    inputs = tokenizer(text, return_tensors="pt").to(device)

The hook wraps ``PreTrainedModel.from_pretrained`` and moves the real model object it returns with
``.to(device)``: no proxy, so ``isinstance``, ``generation_config`` and sampling defaults are exactly
what transformers gives. A call that passes ``device_map`` keeps its own placement. With
``device="auto"`` each model is placed by the workload advisor from its parameter count and dtype,
among the devices torch can address. ``xpuflow.deinit()`` removes the hook.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.types import ResourceType

__all__ = ["deinit", "init", "torch_device"]

_TORCH_TYPES = (ResourceType.CPU, ResourceType.GPU, ResourceType.IGPU)
_lock = threading.Lock()
_state: dict[str, Any] = {}


def torch_device(resource_id: str) -> Any:
    """The ``torch.device`` for an xpuflow resource id; a clear error for devices torch cannot address."""
    import torch

    kind, _, index = resource_id.partition(":")
    if kind == "cpu":
        return torch.device("cpu")
    if kind in ("cuda", "rocm"):  # ROCm builds of torch address AMD GPUs as "cuda"
        return torch.device("cuda", int(index or 0))
    if kind == "mps":
        return torch.device("mps")
    if kind == "xpu":
        return torch.device("xpu", int(index or 0))
    if kind == "dml":
        import torch_directml

        return torch_directml.device(int(index or 0))
    raise CapabilityError(
        f"torch cannot address '{resource_id}'; run this model through an xpuflow backend "
        "(xpuflow.runtime(device=...)) or choose a cpu/cuda/mps/xpu device"
    )


def _dtype_precision(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    return {"float16": "fp16", "bfloat16": "bf16", "int8": "int8"}.get(name, "fp32")


def _torch_inventory(inventory: Inventory) -> Inventory:
    return Inventory.of(
        r for r in inventory.resources if r.type in _TORCH_TYPES and not r.id.startswith(("igpu", "xe"))
    )


def _place(model: Any, inventory: Inventory) -> Any:
    from xpuflow.policy.advisor import advise_workload

    decision = advise_workload(
        _torch_inventory(inventory),
        float(sum(p.numel() for p in model.parameters())),
        precision=_dtype_precision(getattr(model, "dtype", "float32")),
    )
    assert decision.device is not None
    return torch_device(decision.device)


def init(device: str = "auto", *, inventory: Inventory | None = None) -> Any:
    """Install the placement hook; return the ``torch.device`` models go to ("auto": the advised
    device for a small model; each model is still placed by its own size)."""
    import transformers

    from xpuflow.workload import detect

    inv = inventory if inventory is not None else detect()
    if device != "auto" and inv.get(device) is None:
        known = ", ".join(r.id for r in inv.resources)
        raise ConfigError(f"device '{device}' is not on this machine; known devices: {known}, or 'auto'")
    fixed = torch_device(device) if device != "auto" else None
    base = transformers.PreTrainedModel
    with _lock:
        original = _state.get("original") or base.__dict__["from_pretrained"].__func__

        @functools.wraps(original)
        def from_pretrained(cls: Any, *args: Any, **kwargs: Any) -> Any:
            model = original(cls, *args, **kwargs)
            if kwargs.get("device_map") is not None:
                return model
            return model.to(fixed if fixed is not None else _place(model, inv))

        base.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign,assignment]
        _state.update(original=original, device=fixed)
    return fixed if fixed is not None else _place_default(inv)


def _place_default(inventory: Inventory) -> Any:
    from xpuflow.policy.advisor import advise_workload

    decision = advise_workload(_torch_inventory(inventory), 1e8)
    assert decision.device is not None
    return torch_device(decision.device)


def deinit() -> None:
    """Remove the placement hook (no-op when not installed)."""
    with _lock:
        original = _state.pop("original", None)
        _state.clear()
    if original is not None:
        import transformers

        transformers.PreTrainedModel.from_pretrained = classmethod(original)  # type: ignore[method-assign,assignment]
