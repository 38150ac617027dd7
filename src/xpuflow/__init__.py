"""xpuflow: serve ML and LLM workloads across heterogeneous hardware.

Names load lazily so ``import xpuflow`` stays fast and never imports a vendor library::

    import xpuflow
    inv = xpuflow.detect()
    decision = xpuflow.advise(7e9, batch_size=8, precision="bf16", strategy="latency")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Alternative": "xpuflow.types",
    "Capability": "xpuflow.types",
    "OptimizedFor": "xpuflow.types",
    "Precision": "xpuflow.types",
    "Resource": "xpuflow.types",
    "ResourceType": "xpuflow.types",
    "RoutingDecision": "xpuflow.types",
    "Strategy": "xpuflow.types",
    "Task": "xpuflow.types",
    "Inventory": "xpuflow.discovery.inventory",
    "detect": "xpuflow.workload",
    "advise": "xpuflow.workload",
    "DeviceRouter": "xpuflow.device_router",
    "ComplexityScorer": "xpuflow.policy.complexity",
    "AdaptiveRouter": "xpuflow.routing.adaptive",
    "RoutingConfig": "xpuflow.routing.adaptive",
    "DeviceRuntime": "xpuflow.device_runtime",
    "runtime": "xpuflow.device_runtime",
    "init": "xpuflow.migrate",
    "deinit": "xpuflow.migrate",
    "BuildProfile": "xpuflow.artifacts.profile",
    "BuildArtifact": "xpuflow.artifacts.profile",
    "ModelConfig": "xpuflow.backends.base",
    "GenerationParams": "xpuflow.backends.base",
    "Session": "xpuflow.backends.base",
    "BackendPlugin": "xpuflow.backends.base",
    "get_backend": "xpuflow.backends.registry",
    "list_backends": "xpuflow.backends.registry",
    "load_config": "xpuflow.config",
    "XpuflowError": "xpuflow.errors",
    "ConfigError": "xpuflow.errors",
    "CapabilityError": "xpuflow.errors",
    "BackendError": "xpuflow.errors",
}

__all__ = [
    "AdaptiveRouter",
    "Alternative",
    "BackendError",
    "BackendPlugin",
    "BuildArtifact",
    "BuildProfile",
    "Capability",
    "CapabilityError",
    "ComplexityScorer",
    "ConfigError",
    "DeviceRouter",
    "DeviceRuntime",
    "GenerationParams",
    "Inventory",
    "ModelConfig",
    "OptimizedFor",
    "Precision",
    "Resource",
    "ResourceType",
    "RoutingConfig",
    "RoutingDecision",
    "Session",
    "Strategy",
    "Task",
    "XpuflowError",
    "__version__",
    "advise",
    "deinit",
    "detect",
    "get_backend",
    "init",
    "list_backends",
    "load_config",
    "runtime",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xpuflow' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
    from xpuflow.backends.base import BackendPlugin, GenerationParams, ModelConfig, Session
    from xpuflow.backends.registry import get_backend, list_backends
    from xpuflow.config import load_config
    from xpuflow.device_router import DeviceRouter
    from xpuflow.device_runtime import DeviceRuntime, runtime
    from xpuflow.discovery.inventory import Inventory
    from xpuflow.errors import BackendError, CapabilityError, ConfigError, XpuflowError
    from xpuflow.migrate import deinit, init
    from xpuflow.policy.complexity import ComplexityScorer
    from xpuflow.routing.adaptive import AdaptiveRouter, RoutingConfig
    from xpuflow.types import (
        Alternative,
        Capability,
        OptimizedFor,
        Precision,
        Resource,
        ResourceType,
        RoutingDecision,
        Strategy,
        Task,
    )
    from xpuflow.workload import advise, detect
