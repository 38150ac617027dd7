"""Argv templates of the model servers xpuflow can start and supervise (``managed:`` deployments).

A template is an argv list (never a shell string) with placeholders, the HTTP path that answers 200 once
the server is ready, and the backend that then talks to it::

    template = TEMPLATES["llamacpp"]
    argv = render_argv(template.argv, {"model": "/m.gguf", "port": "8081", ...})

Placeholders: ``{model}`` (the deployment's model: an absolute path when it names a file or folder here,
else as written, such as a Hugging Face id), ``{model_name}`` (the name requests use: ``options.model``
or the deployment's name), ``{host}``, ``{port}`` (the HTTP port, a free one unless ``managed.port`` is
set) and ``{grpc_port}`` (a second free port, for servers that also open gRPC). ``{python}`` is the
interpreter xpuflow runs on, so servers that are Python packages start from the same environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xpuflow.errors import ConfigError

__all__ = ["PLACEHOLDERS", "TEMPLATES", "EngineTemplate", "placeholders_in", "render_argv"]

PLACEHOLDERS = ("python", "model", "model_name", "host", "port", "grpc_port")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class EngineTemplate:
    """One model server: its argv, readiness path, and the backend requests go through."""

    name: str
    argv: tuple[str, ...]
    ready_path: str
    backend: str  # "remote_openai" or "kserve_v2"
    description: str


TEMPLATES: dict[str, EngineTemplate] = {
    t.name: t
    for t in (
        EngineTemplate(
            "llamacpp",
            (
                "{python}", "-m", "llama_cpp.server", "--model", "{model}", "--model_alias", "{model_name}",
                "--host", "{host}", "--port", "{port}",
            ),
            "/v1/models",
            "remote_openai",
            "llama.cpp's OpenAI-compatible server from llama-cpp-python[server] (GGUF models)",
        ),
        EngineTemplate(
            "vllm",
            (
                "vllm", "serve", "{model}", "--served-model-name", "{model_name}", "--host", "{host}",
                "--port", "{port}",
            ),
            "/health",
            "remote_openai",
            "vLLM's OpenAI-compatible server",
        ),
        EngineTemplate(
            "sglang",
            (
                "{python}", "-m", "sglang.launch_server", "--model-path", "{model}", "--served-model-name",
                "{model_name}", "--host", "{host}", "--port", "{port}",
            ),
            "/health",
            "remote_openai",
            "SGLang's OpenAI-compatible server",
        ),
        EngineTemplate(
            "tgi",
            ("text-generation-launcher", "--model-id", "{model}", "--hostname", "{host}", "--port", "{port}"),
            "/health",
            "remote_openai",
            "Hugging Face Text Generation Inference (its OpenAI-compatible Messages API)",
        ),
        EngineTemplate(
            "ovms",
            (
                "ovms", "--model_name", "{model_name}", "--model_path", "{model}",
                "--rest_bind_address", "{host}", "--rest_port", "{port}", "--port", "{grpc_port}",
            ),
            "/v2/health/ready",
            "kserve_v2",
            "OpenVINO Model Server (Open Inference Protocol over REST; gRPC on {grpc_port})",
        ),
    )
}  # fmt: skip


def placeholders_in(argv: Sequence[str]) -> set[str]:
    return {name for part in argv for name in _PLACEHOLDER.findall(part)}


def render_argv(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """``argv`` with every ``{name}`` replaced; ConfigError naming an unknown placeholder. Each element
    stays one argument whatever it holds (no shell, no splitting)."""
    unknown = sorted(placeholders_in(argv) - set(PLACEHOLDERS))
    if unknown:
        raise ConfigError(
            f"managed.argv has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; valid: "
            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}",
            field="managed.argv",
        )
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in argv]
