"""``xpuflow.runtime``: the two-line migration from GPU-only code to whatever device is best.

    rt = xpuflow.runtime("auto")                 # or "cpu", "cuda:0", "npu:0", ...
    rt.load_model("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    rt.chat([{"role": "user", "content": "Capital of France?"}], max_tokens=16)   # -> "Paris..."
    rt.switch("cuda:0")                          # loaded models move with it

A ``DeviceRuntime`` is synchronous on the outside; inside it drives the same async backend sessions the
gateway uses, on a private event-loop thread. The backend is chosen from the model's format and the
device (GGUF -> llamacpp, a Hugging Face folder -> transformers, or onnxruntime for embedding models,
ONNX -> onnxruntime, or openvino on an NPU), and build steps go through the artifact store.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xpuflow.backends.base import ChatMessage, GenerationParams, ModelConfig, ModelTask, Session
from xpuflow.discovery.inventory import Inventory
from xpuflow.errors import CapabilityError, ConfigError
from xpuflow.model_files import estimate_params, model_format
from xpuflow.types import Resource, ResourceType

__all__ = ["DeviceRuntime", "LoadedModel", "runtime"]

T = TypeVar("T")

_EMBEDDING_ARCHITECTURES = ("BertModel", "XLMRobertaModel", "MPNetModel", "RobertaModel", "NomicBertModel")


class _LoopThread:
    """A private event loop on a daemon thread, so sync callers can drive async sessions."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="xpuflow-runtime", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


@dataclass
class LoadedModel:
    """One model loaded in a runtime: where it came from, which backend runs it, on which device."""

    name: str
    path: Path
    task: ModelTask
    backend: str
    device: str
    session: Session
    options: Mapping[str, Any]


def _hf_task(path: Path) -> ModelTask:
    import json

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if any(a in _EMBEDDING_ARCHITECTURES for a in architectures) or (path / "modules.json").is_file():
        return ModelTask.EMBEDDING
    return ModelTask.CHAT


def _choose_backend(fmt: str, task: ModelTask, device: Resource) -> str:
    if fmt == "gguf":
        if device.type in (ResourceType.CPU, ResourceType.GPU):
            return "llamacpp"
        return "transformers"
    if fmt == "onnx":
        return "openvino" if device.type in (ResourceType.NPU, ResourceType.IGPU) else "onnxruntime"
    if task is ModelTask.EMBEDDING and device.type in (ResourceType.CPU, ResourceType.NPU, ResourceType.GPU):
        return "onnxruntime" if device.type is not ResourceType.NPU else "openvino"
    return "transformers"


class DeviceRuntime:
    """Loads models on one device and runs them; ``switch`` moves every loaded model to another."""

    def __init__(
        self,
        device: str = "auto",
        *,
        inventory: Inventory | None = None,
        store: Any = None,
        timeout_s: float = 600.0,
    ) -> None:
        from xpuflow.workload import detect

        self._inventory = inventory if inventory is not None else detect()
        self._requested = device
        self._store = store
        self._timeout_s = timeout_s
        self._loop = _LoopThread()
        self._models: dict[str, LoadedModel] = {}
        self._default: str | None = None
        self.device = self._resolve(device, model_size=None) if device != "auto" else None

    # -- device choice -------------------------------------------------------------------------
    def _resolve(self, device: str, model_size: float | None) -> str:
        if device != "auto":
            if self._inventory.get(device) is None:
                known = ", ".join(r.id for r in self._inventory.resources)
                raise ConfigError(
                    f"device '{device}' is not on this machine; known devices: {known}, or 'auto'"
                )
            return device
        from xpuflow.workload import advise

        decision = advise(model_size or 1e8, inventory=self._inventory)
        assert decision.device is not None
        return decision.device

    # -- models -----------------------------------------------------------------------------------
    def load_model(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        task: str | None = None,
        backend: str | None = None,
        **options: Any,
    ) -> LoadedModel:
        """Load a model (GGUF file, ONNX file or HF folder) on this runtime's device and return it.

        The first model loaded is the default for ``generate``/``chat``/``embed``.
        """
        model_path = Path(path).expanduser().resolve()
        fmt = model_format(model_path)
        model_task = ModelTask(task) if task else (_hf_task(model_path) if fmt == "hf" else ModelTask.CHAT)
        if fmt == "onnx" and not task:
            model_task = ModelTask.EMBEDDING
        device = self.device or self._resolve("auto", estimate_params(model_path, fmt))
        loaded = self._open(name or model_path.stem, model_path, model_task, backend, device, options)
        self._models[loaded.name] = loaded
        self._default = self._default or loaded.name
        if self.device is None:
            self.device = device
        return loaded

    def _open(
        self,
        name: str,
        path: Path,
        task: ModelTask,
        backend: str | None,
        device: str,
        options: Mapping[str, Any],
    ) -> LoadedModel:
        from xpuflow.artifacts.builder import build_all
        from xpuflow.artifacts.store import ArtifactStore
        from xpuflow.backends.registry import get_backend

        resource = self._inventory.get(device)
        assert resource is not None
        fmt = model_format(path)
        backend_name = backend or _choose_backend(fmt, task, resource)
        plugin = get_backend(backend_name)
        availability = plugin.availability()
        if not availability.available:
            raise CapabilityError(f"backend '{backend_name}' is not usable: {availability.reason}")
        if not plugin.probe([resource]):
            raise CapabilityError(
                f"backend '{backend_name}' cannot run on {device}; choose another device or backend"
            )
        config = ModelConfig(model_id=name, path=path, task=task, options=options)
        store = self._store if self._store is not None else ArtifactStore()
        artifacts = build_all(plugin, [resource], config, store)
        session = self._loop.run(plugin.create_session([resource], config, artifacts), self._timeout_s)
        return LoadedModel(name, path, task, backend_name, device, session, dict(options))

    def _model(self, model: str | None) -> LoadedModel:
        key = model or self._default
        if key is None:
            raise ConfigError("no model is loaded; call load_model(path) first")
        if key not in self._models:
            raise ConfigError(f"model '{key}' is not loaded; loaded: {', '.join(self._models) or 'none'}")
        return self._models[key]

    # -- running ----------------------------------------------------------------------------------
    def generate(
        self, prompt: str, max_tokens: int = 128, *, model: str | None = None, **sampling: Any
    ) -> str:
        """Complete ``prompt``; greedy unless ``temperature`` is given. Returns the text."""
        params = GenerationParams(max_tokens=max_tokens, **sampling)
        return self._loop.run(self._model(model).session.generate(prompt, params), self._timeout_s).text

    def chat(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int = 128,
        *,
        model: str | None = None,
        **sampling: Any,
    ) -> str:
        """Answer a chat with the model's own template; greedy by default. Returns the reply text."""
        params = GenerationParams(max_tokens=max_tokens, **sampling)
        return self._loop.run(self._model(model).session.chat(list(messages), params), self._timeout_s).text

    def embed(self, texts: str | Sequence[str], *, model: str | None = None) -> list[list[float]]:
        """Embedding vectors, one per text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self._loop.run(self._model(model).session.embed(batch), self._timeout_s)

    def switch(self, device: str) -> None:
        """Move every loaded model to ``device`` (reloaded there, same backend choice rules)."""
        target = self._resolve(device, model_size=None) if device != "auto" else None
        moved: dict[str, LoadedModel] = {}
        for name, loaded in self._models.items():
            new_device = target or self._resolve(
                "auto", estimate_params(loaded.path, model_format(loaded.path))
            )
            # open on the new device before closing the old session, so a failed move loses nothing
            moved[name] = self._open(name, loaded.path, loaded.task, None, new_device, loaded.options)
        for loaded in self._models.values():
            self._loop.run(loaded.session.close(), self._timeout_s)
        self._models = moved
        self.device = target or (next(iter(moved.values())).device if moved else None)

    @property
    def models(self) -> dict[str, LoadedModel]:
        return dict(self._models)

    def close(self) -> None:
        for loaded in self._models.values():
            self._loop.run(loaded.session.close(), self._timeout_s)
        self._models.clear()
        self._loop.stop()

    def __enter__(self) -> DeviceRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runtime(device: str = "auto", **kwargs: Any) -> DeviceRuntime:
    """A ``DeviceRuntime`` on ``device`` ("auto", "cpu", "cuda:0", "npu:0", ...)."""
    return DeviceRuntime(device, **kwargs)
