"""``DeviceRouter``: the ``device-router`` package's API, backed by xpuflow's discovery and advisor.

Code written for ``device-router`` migrates with a rename of the import::

    # from device_router import DeviceRouter, RoutingStrategy
    from xpuflow.device_router import DeviceRouter, RoutingStrategy

    router = DeviceRouter()
    router.detect()
    decision = router.route(model_size=1_000_000, batch_size=32, precision="fp32",
                            strategy=RoutingStrategy.AUTO)
    print(f"Use {decision.device} ({decision.reason})")
    model.to(router.assign(decision.device))      # torch.device("cuda", 0), or "cuda:0" without torch

What differs from ``device-router``, and why:

- ``decision.device`` is an xpuflow resource id ("cuda:0", "igpu:0", "npu:0", "cpu"), not a bare kind
  ("cuda", "directml"): a machine may have several of each. ``assign`` accepts both spellings.
- ``route`` keeps the requested precision (device-router turned fp32 into fp16 on GPUs); faster
  precisions are suggested in ``decision.details["hints"]``. ``use_amp`` is set for training only.
- Invalid input raises ``xpuflow.errors.ConfigError`` (a ``ValueError``) naming the valid values, and a
  workload that fits nowhere raises ``CapabilityError`` with every device's reason, where device-router
  fell back to "cpu".
- ``detect()`` returns the ``Inventory`` (device-router returned the overview dict; call ``overview()``).
- ``assign`` raises ``BackendUnavailable`` naming the backend to use when torch cannot address a device
  (an NPU, a PIM part, a remote server), where device-router returned None.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xpuflow.discovery.base import Probe
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import BackendUnavailable, ConfigError
from xpuflow.policy.advisor import advise_workload
from xpuflow.types import Precision, ResourceType, RoutingDecision, Strategy, Task

__all__ = ["DeviceRouter", "RoutingStrategy"]

#: device-router's strategy enum: the same members (AUTO, LATENCY, THROUGHPUT, POWER) and values.
RoutingStrategy = Strategy

# The software to use where torch cannot address an NPU, by vendor.
_NPU_BACKENDS: Mapping[str, str] = {
    "intel": "OpenVINO (the openvino backend)",
    "amd": "ONNX Runtime with the Vitis AI execution provider (Ryzen AI)",
    "rebellions": "the RBLN SDK",
    "furiosa": "the Furiosa SDK",
    "huawei": "torch_npu (pip install torch-npu)",
}
_KNOWN_KINDS = "cpu, cuda:N, rocm:N, mps, xpu:N, igpu:N (or dml:N, directml), npu:N, pim:N, remote:NAME"


class DeviceRouter:
    """Detects devices once and routes workloads to them with xpuflow's workload advisor.

    Give an ``inventory`` to route over known resources (tests, declared fleets); otherwise the first
    call that needs one runs ``Inventory.detect(probes, declared=declared)``.
    """

    def __init__(
        self,
        inventory: Inventory | None = None,
        *,
        probes: Iterable[Probe] | None = None,
        declared: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self._inventory = inventory
        self._probes = list(probes) if probes is not None else None
        self._declared = declared

    # ------------------------------------------------------------------------------------ detection

    def detect(self) -> Inventory:
        """Run xpuflow's hardware discovery (every probe; never raises) and keep the result."""
        self._inventory = Inventory.detect(self._probes, declared=self._declared)
        return self._inventory

    @property
    def inventory(self) -> Inventory:
        """The inventory routed over, detected on first use."""
        if self._inventory is None:
            return self.detect()
        return self._inventory

    def overview(self) -> dict[str, list[dict[str, Any]]]:
        """Resources grouped by kind: cuda, rocm, gpu, igpu, npu, pim, cpu, remote (every key present)."""
        return self.inventory.overview()

    def status(self) -> dict[str, list[dict[str, Any]]]:
        """device-router's alias of ``overview()``."""
        return self.overview()

    @property
    def cuda_available(self) -> bool:
        return any(r.id.startswith("cuda") for r in self.inventory.resources)

    @property
    def directml_available(self) -> bool:
        """True when an integrated GPU was found (device-router reached iGPUs through DirectML)."""
        return any(r.type is ResourceType.IGPU for r in self.inventory.resources)

    @property
    def cpu_info(self) -> dict[str, Any]:
        cpu = self.inventory.cpu
        return cpu.to_dict() if cpu is not None else {}

    # -------------------------------------------------------------------------------------- routing

    def route(
        self,
        model_size: float,
        batch_size: int = 1,
        precision: Precision | str = "fp32",
        strategy: Strategy | str = "auto",
        task: Task | str = "inference",
        model_format: str | None = None,
        *,
        is_training: bool | None = None,
        is_onnx: bool | None = None,
    ) -> RoutingDecision:
        """Choose the device for a workload (see ``xpuflow.policy.advise_workload``).

        ``is_training`` and ``is_onnx`` are device-router's spellings of ``task="training"`` and
        ``model_format="onnx"``; giving both spellings with different meanings is a ``ConfigError``.
        """
        if is_training is not None:
            wanted = Task.TRAINING if is_training else Task.INFERENCE
            if task not in ("inference", wanted):
                raise ConfigError(
                    f"is_training={is_training} contradicts task={task!r}; give one of them", field="task"
                )
            task = wanted
        if is_onnx is not None:
            if is_onnx and model_format is not None and _format_name(model_format) != "onnx":
                raise ConfigError(
                    f"is_onnx=True contradicts model_format={model_format!r}; give one of them",
                    field="model_format",
                )
            if is_onnx:
                model_format = "onnx"
        return advise_workload(
            self.inventory, model_size, batch_size, precision, strategy, task, model_format
        )

    def assign(self, device: str | RoutingDecision) -> Any:
        """The ``torch.device`` for a resource id (or a decision), or the id itself when torch is absent.

        "cuda:1" -> ``torch.device("cuda", 1)``; "rocm:0" -> ``torch.device("cuda", 0)`` on a ROCm build;
        "mps:0" -> ``torch.device("mps")``; "igpu:0", "dml:0" or "directml" -> ``torch_directml.device(0)``;
        "npu:0" on Huawei Ascend -> ``torch.device("npu", 0)`` via torch_npu. Devices torch cannot address
        (other NPUs, PIM parts, remote servers) raise ``BackendUnavailable`` naming what to use instead.
        """
        device_id = device.device if isinstance(device, RoutingDecision) else device
        if not isinstance(device_id, str) or not device_id.strip():
            raise ConfigError(f"assign() needs a device id such as 'cuda:0', got {device!r}", field="device")
        device_id = device_id.strip()
        kind, _, suffix = device_id.partition(":")
        kind = kind.lower()
        index = int(suffix) if suffix.isdigit() else None
        if kind not in _TORCH_KINDS and kind not in _NOT_TORCH_KINDS:
            raise ConfigError(
                f"unknown device id {device_id!r}; expected one of {_KNOWN_KINDS}", field="device"
            )
        torch = _optional_import("torch")
        if torch is None:
            return device_id
        if kind == "cpu":
            return torch.device("cpu")
        if kind == "cuda":
            return torch.device("cuda", index) if index is not None else torch.device("cuda")
        if kind == "rocm":
            if getattr(torch.version, "hip", None) is None:
                raise BackendUnavailable(
                    f"{device_id} is an AMD GPU but this torch build has no ROCm support; install torch"
                    " for ROCm, or run the model through the llama.cpp backend (HIP)"
                )
            return torch.device("cuda", index or 0)
        if kind == "mps":
            return torch.device("mps")
        if kind == "xpu":
            return torch.device("xpu", index or 0)
        if kind in ("igpu", "dml", "directml"):
            directml = _optional_import("torch_directml")
            if directml is None:
                raise BackendUnavailable(
                    f"torch reaches {device_id} through torch-directml, which is not installed"
                    " (pip install torch-directml, on Windows); or run the model through OpenVINO or"
                    " ONNX Runtime"
                )
            return directml.device(index or 0)
        if kind == "npu":
            vendor = self._vendor(device_id)
            if vendor in ("huawei", "") and _optional_import("torch_npu") is not None:
                return torch.device("npu", index or 0)
            backend = _NPU_BACKENDS.get(vendor, "the NPU vendor's runtime")
            raise BackendUnavailable(
                f"torch cannot address {device_id}{f' ({vendor} NPU)' if vendor else ''}; run the model"
                f" through {backend}, e.g. xpuflow.runtime(device={device_id!r})"
            )
        if kind == "pim":
            raise BackendUnavailable(
                f"torch cannot address {device_id}; processing-in-memory parts run through their vendor"
                f" SDK, e.g. xpuflow.runtime(device={device_id!r})"
            )
        raise BackendUnavailable(
            f"{device_id} is a remote model server; send requests through xpuflow's router"
            " (xpuflow serve) or its OpenAI-compatible endpoint, not through torch"
        )

    def _vendor(self, device_id: str) -> str:
        if self._inventory is None:
            return ""
        resource = self._inventory.get(device_id)
        return resource.vendor.lower() if resource is not None else ""

    def __repr__(self) -> str:
        found = (
            "not detected" if self._inventory is None else ", ".join(r.id for r in self._inventory.resources)
        )
        return f"DeviceRouter({found})"


_TORCH_KINDS = frozenset({"cpu", "cuda", "rocm", "mps", "xpu", "igpu", "dml", "directml"})
_NOT_TORCH_KINDS = frozenset({"npu", "pim", "remote"})


def _format_name(value: Any) -> str:
    return str(getattr(value, "value", value)).strip().lower().lstrip(".")


def _optional_import(name: str) -> Any:
    """The module, or None when it is not installed (or an earlier import was blocked)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
