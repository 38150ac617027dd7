"""The backend registry: a dict of built-ins plus the ``xpuflow.backends`` entry-point group.

Plugins load lazily by name. One that fails to load is logged and skipped with its reason; an unknown
name lists the valid ones::

    plugin = get_backend("llamacpp")
    for status in list_backends():
        print(status.name, status.available, status.reason)
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from xpuflow.backends.base import BackendPlugin
from xpuflow.errors import BackendUnavailable, ConfigError

__all__ = ["BUILTIN_BACKENDS", "BackendStatus", "backend_names", "get_backend", "list_backends"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "xpuflow.backends"

#: name -> "module:attribute" of a plugin class (instantiated with no arguments).
BUILTIN_BACKENDS: dict[str, str] = {
    "llamacpp": "xpuflow.backends.llamacpp:LlamaCppPlugin",
    "transformers": "xpuflow.backends.transformers.plugin:TransformersPlugin",
    "onnxruntime": "xpuflow.backends.encoders.onnxruntime:OnnxRuntimePlugin",
    "openvino": "xpuflow.backends.encoders.openvino:OpenVinoPlugin",
    "remote_openai": "xpuflow.backends.remote.openai:RemoteOpenAIPlugin",
    "kserve_v2": "xpuflow.backends.remote.kserve_v2:KServeV2Plugin",
    "binary": "xpuflow.backends.binary.plugin:BinaryPlugin",
    "fake": "xpuflow.testing.fake_backend:FakePlugin",
}


@dataclass(frozen=True)
class BackendStatus:
    """One backend as ``xpuflow info`` lists it."""

    name: str
    available: bool
    reason: str
    version: str | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "version": self.version,
            "source": self.source,
        }


@cache
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Every known backend name, built-ins first."""
    extra = sorted(n for n in _entry_points() if n not in BUILTIN_BACKENDS)
    return [*BUILTIN_BACKENDS, *extra]


def load_target(target: str) -> Any:
    """The object a ``package.module:attribute`` reference names (a plugin class, a routing rule)."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@cache
def get_backend(name: str) -> BackendPlugin:
    """The plugin instance for ``name``. Raises ConfigError for an unknown name (listing valid ones)
    and BackendUnavailable when the plugin's module cannot be loaded."""
    loader: Callable[[], Any]
    if name in BUILTIN_BACKENDS:
        loader = functools.partial(load_target, BUILTIN_BACKENDS[name])
    elif name in _entry_points():
        loader = _entry_points()[name].load
    else:
        raise ConfigError(
            f"unknown backend '{name}'; valid backends: {', '.join(backend_names())}", field="backend"
        )
    try:
        plugin_cls = loader()
        plugin: BackendPlugin = plugin_cls()
    except Exception as exc:
        raise BackendUnavailable(f"backend '{name}' failed to load: {type(exc).__name__}: {exc}") from exc
    return plugin


def list_backends() -> list[BackendStatus]:
    """Every backend with whether it is usable here, why, and its version. Never raises."""
    statuses = []
    for name in backend_names():
        source = "builtin" if name in BUILTIN_BACKENDS else "entry-point"
        try:
            availability = get_backend(name).availability()
        except Exception as exc:
            log.warning("backend %s skipped: %s", name, exc)
            statuses.append(BackendStatus(name, False, str(exc), None, source))
            continue
        statuses.append(
            BackendStatus(name, availability.available, availability.reason, availability.version, source)
        )
    return statuses
