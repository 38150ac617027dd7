"""The ``llamacpp`` backend: GGUF models through llama-cpp-python, on the CPU or offloaded to a GPU.

GGUF files run as they are, so there is nothing to build. A session loads one ``llama_cpp.Llama`` on
its own thread (``BlockingRunner``) and serves chat (with the chat template stored in the GGUF),
text completion, token streaming and, when loaded with ``embedding: true``, embeddings::

    config = ModelConfig(model_id="smollm2", path=smollm2_gguf_path(), options={"n_threads": 2})
    session = await LlamaCppPlugin().create_session([cpu], config, artifacts={})
    async with session:
        reply = await session.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=16))

llama-cpp-python's ``Llama`` decodes one sequence at a time, so generation batches run one after
another (``BatchMode.SEQUENTIAL``, capability ``max_batch_size`` 1); only ``embed`` packs several
inputs into one decode. Options are listed in ``LLAMACPP_OPTIONS`` and in docs/backends.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from xpuflow.artifacts.profile import BuildArtifact, BuildProfile
from xpuflow.backends.base import (
    Availability,
    BatchMode,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelConfig,
    Session,
    StreamChunk,
)
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.encoders.onnx_export import package_version
from xpuflow.backends.remote.openai_wire import completion_from_response, stream_chunk
from xpuflow.errors import BackendUnavailable, BuildError, ConfigError, SessionError, XpuflowError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = [
    "GGUF_TYPES",
    "LLAMACPP_OPTIONS",
    "LlamaCppPlugin",
    "LlamaCppSession",
    "llama_kwargs",
    "requantize",
]

T = TypeVar("T")

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
LLAMACPP_OPTIONS: dict[str, str] = {
    "n_ctx": "context length in tokens (default: the model config's max_seq_len)",
    "n_threads": "CPU threads for decoding (default: the CPU's physical cores)",
    "n_batch": "prompt tokens decoded per step; also the longest input embed accepts (default 512)",
    "n_gpu_layers": "layers offloaded to the GPU (default: all (-1) on a GPU resource, else 0)",
    "embedding": "load the model for embeddings too (default false)",
    "pooling": "embedding pooling: mean, cls or last (default: the GGUF's own, else mean)",
    "normalize": "scale embeddings to unit length, as OpenAI does (default true)",
    "seed": "random seed for sampling at temperature > 0 (default: random)",
    "gguf_type": "rewrite the GGUF's weights as f32, f16, bf16 or q8_0 in a build step (default: as is)",
}

#: ``options.gguf_type`` -> llama.cpp's LLAMA_FTYPE_* value.
GGUF_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
REQUANT_PROFILE = "gguf-requant"

_POOLING_TYPES = {"mean": 1, "cls": 2, "last": 3}  # llama.cpp's LLAMA_POOLING_TYPE_* values
_POOLING_NONE = 0
_GGUF_MAGIC = b"GGUF"
_REQUANT_FILE = "model.gguf"
_INSTALL_HINT = "pip install 'xpuflow[llamacpp]'"
_NO_NATIVE_BATCHING = (
    "llama-cpp-python's Llama decodes one sequence at a time; generation batches run sequentially"
)

# llama.cpp backends as named in llama_print_system_info() -> GPU vendors they drive.
_GPU_BACKEND_VENDORS: dict[str, frozenset[str]] = {
    "CUDA": frozenset({"nvidia"}),
    "HIP": frozenset({"amd"}),
    "ROCM": frozenset({"amd"}),
    "METAL": frozenset({"apple"}),
    "SYCL": frozenset({"intel"}),
}


def _gpu_vendors() -> frozenset[str] | None:
    """Vendors whose GPUs this llama.cpp build can offload to: empty without GPU offload, None when
    offload works through a backend we cannot attribute to a vendor (Vulkan, OpenCL): any GPU then."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return frozenset()
    info = llama_cpp.llama_print_system_info()
    text = (info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)).upper()
    vendors = [v for name, v in _GPU_BACKEND_VENDORS.items() if name in text]
    return frozenset().union(*vendors) if vendors else None


def _runs_on(resource: Resource, vendors: frozenset[str] | None) -> bool:
    if resource.type is ResourceType.CPU:
        return True
    if resource.type not in (ResourceType.GPU, ResourceType.IGPU):
        return False
    return vendors is None or resource.vendor.lower() in vendors


def _check_gguf(path: Path | None) -> Path:
    if path is None:
        raise ConfigError("the llamacpp backend needs a model path to a .gguf file", field="model")
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist; pass the path of a .gguf file", field="model")
    if not path.is_file():
        raise ConfigError(f"model path {path} is not a file; pass the path of a .gguf file", field="model")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ConfigError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); convert it "
            "with llama.cpp's convert_hf_to_gguf.py or use the transformers backend",
            field="model",
        )
    return path


def _check_options(config: ModelConfig) -> None:
    options = config.options
    unknown = sorted(set(options) - set(LLAMACPP_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown llamacpp option(s) {', '.join(unknown)}; valid: {', '.join(LLAMACPP_OPTIONS)}",
            field=f"options.{unknown[0]}",
        )
    pooling = options.get("pooling")
    if pooling is not None and pooling not in _POOLING_TYPES:
        raise ConfigError(
            f"options.pooling must be one of {', '.join(_POOLING_TYPES)}, got {pooling!r}",
            field="options.pooling",
        )
    for name in ("n_ctx", "n_threads", "n_batch"):
        config.int_option(name)
    gguf_type = options.get("gguf_type")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ConfigError(
            f"options.gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}; leave it out to "
            "run the GGUF as it is",
            field="options.gguf_type",
        )


def requantize(source: Path, target: Path, gguf_type: str, *, threads: int = 0) -> None:
    """Write ``source``'s weights as ``gguf_type`` to ``target`` with llama.cpp's own quantizer.

    Going *up* in precision (Q4_1 -> f16) adds no information, but it changes the arithmetic: llama.cpp
    multiplies 4-bit weights against activations it first rounds to 8 bits (Q8_1), while f16/f32 weights
    meet f32 activations. For very small models that rounding is enough to flip greedy decoding into a
    loop; the wider file decodes like the dequantised weights do in transformers.
    """
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type]
    params.allow_requantize = True  # the source is quantized already
    params.nthread = threads
    # llama.cpp logs every tensor it converts (~300 lines for a small model) through llama-cpp-python's
    # log callback, which prints unless its logger is set to errors only: keep a first start readable
    quiet = logging.getLogger("llama-cpp-python")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        quiet.setLevel(level)
    if rc != 0 or not target.is_file():
        raise BuildError(
            f"llama.cpp could not rewrite {source} as {gguf_type} (llama_model_quantize returned {rc}); "
            "check the file with llama.cpp, or leave options.gguf_type out to run it as it is"
        )


def _default_threads(resources: Sequence[Resource]) -> int:
    for resource in resources:
        cores = resource.attributes.get("physical_cores")
        if resource.type is ResourceType.CPU and isinstance(cores, int) and cores > 0:
            return cores
    import psutil

    # Physical cores: hyper-threads add little to llama.cpp's matmuls and hurt latency when they contend.
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def llama_kwargs(
    resources: Sequence[Resource],
    config: ModelConfig,
    *,
    gpu_offload: bool,
    model_path: Path | None = None,
) -> dict[str, Any]:
    """The ``llama_cpp.Llama`` keyword arguments for ``config`` on ``resources`` (validates options).
    ``model_path`` replaces ``config.path`` when a build step rewrote the file."""
    options = config.options
    _check_options(config)
    on_gpu = gpu_offload and any(r.type in (ResourceType.GPU, ResourceType.IGPU) for r in resources)
    kwargs: dict[str, Any] = {
        "model_path": str(model_path or config.path),
        "n_ctx": int(options.get("n_ctx") or config.max_seq_len),
        "n_threads": int(options.get("n_threads") or _default_threads(resources)),
        "n_gpu_layers": int(options.get("n_gpu_layers", -1 if on_gpu else 0)),
        "embedding": bool(options.get("embedding", False)),
        "verbose": False,
    }
    if "n_batch" in options:
        kwargs["n_batch"] = int(options["n_batch"])
    if "seed" in options:
        kwargs["seed"] = int(options["seed"])
    if options.get("pooling") is not None:
        kwargs["pooling_type"] = _POOLING_TYPES[options["pooling"]]
    return kwargs


def _sampling(params: GenerationParams, model: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stop": list(params.stop),
        "seed": params.seed,
    }
    if params.temperature == 0:
        kwargs["top_k"] = 1  # llama.cpp already samples greedily at temperature 0; say so explicitly
    return kwargs


class _TokenCounter:
    """A llama.cpp logits processor that only watches: it is called once per sampled token with every
    token so far, so its first call sees the prompt's length and its calls count the sampled tokens."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        return scores

    def processors(self) -> Any:
        from llama_cpp import LogitsProcessorList

        return LogitsProcessorList([self])

    def completion_tokens(self, finish: str) -> int:
        """Tokens generated, as llama.cpp's non-streamed usage counts them (an end-of-sequence token is
        sampled but not part of the completion)."""
        if finish == "length" or self.sampled == 0:
            return self.sampled
        return self.sampled - 1  # the last sampled token was the end (or a stop string's last token)


class LlamaCppSession(Session):
    """One loaded GGUF model. Every llama.cpp call runs on the session's single model thread."""

    batch_mode = BatchMode.SEQUENTIAL
    max_batch_size = 1

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        llama: Any,
        runner: BlockingRunner,
        *,
        embedding: bool,
        normalize: bool = True,
    ) -> None:
        super().__init__(model_id, resources)
        self._llama = llama
        self._runner = runner
        self.embedding = embedding
        self.normalize = normalize

    def _check_open(self) -> None:
        if self.closed:
            raise SessionError(f"llamacpp session for model '{self.model_id}' is closed; create a new one")

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self._check_open()
        try:
            return await self._runner.call(fn, *args, **kwargs)
        except XpuflowError:
            raise
        except Exception as exc:
            raise _map_error(exc, what, self.model_id) from exc

    async def _stream(
        self, what: str, make_iter: Callable[[Any], Iterator[Any]]
    ) -> AsyncIterator[StreamChunk]:
        """Chunks as llama.cpp makes them; the last one carries the token counts, which llama.cpp's
        stream does not report: a logits processor sees the prompt's length and each sampled token."""
        self._check_open()
        counter = _TokenCounter()
        finish: str | None = None
        try:
            async for event in self._runner.iterate(lambda: make_iter(counter.processors())):
                chunk = stream_chunk(event)
                if chunk is None:
                    continue
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    if chunk.text:
                        yield StreamChunk(chunk.text)
                elif chunk.text:
                    yield chunk
        except XpuflowError:
            raise
        except Exception as exc:
            raise _map_error(exc, what, self.model_id) from exc
        yield StreamChunk(
            "",
            finish or "stop",
            prompt_tokens=counter.prompt_tokens,
            completion_tokens=counter.completion_tokens(finish or "stop"),
        )

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        _check_prompt(prompt)
        response = await self._call(
            "text completion", self._llama.create_completion, prompt, **_sampling(params, self.model_id)
        )
        return completion_from_response(response, default_model=self.model_id)

    def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        _check_prompt(prompt)
        sampling = _sampling(params, self.model_id)
        return self._stream(
            "streamed text completion",
            lambda processors: self._llama.create_completion(
                prompt, stream=True, logits_processor=processors, **sampling
            ),
        )

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        response = await self._call(
            "chat",
            self._llama.create_chat_completion,
            [dict(m) for m in messages],
            **_sampling(params, self.model_id),
        )
        return completion_from_response(response, default_model=self.model_id)

    def stream_chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        sampling, conversation = _sampling(params, self.model_id), [dict(m) for m in messages]
        return self._stream(
            "streamed chat",
            lambda processors: self._llama.create_chat_completion(
                conversation, stream=True, logits_processor=processors, **sampling
            ),
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order. Models with a pooling type (their own or ``options pooling``)
        pack the texts into as few decodes as ``n_batch`` allows."""
        if not self.embedding:
            raise SessionError(
                f"llamacpp model '{self.model_id}' was loaded without embeddings; set options "
                "embedding: true in its deployment"
            )
        if not texts:
            return []
        return await self._call("embeddings", self._embed_blocking, list(texts))

    def _embed_blocking(self, texts: list[str]) -> list[list[float]]:
        import numpy as np

        self._check_embedding_inputs(texts)
        if self._llama.pooling_type() == _POOLING_NONE:
            # A generative GGUF declares no pooling: llama.cpp returns one vector per token, and we average
            # them. One text per decode, because llama-cpp-python misplaces the per-token outputs of the
            # second and later sequences of a packed batch (set options pooling: mean to pack them).
            vectors = [self._mean_token_vector(text) for text in texts]
        else:
            raw = self._llama.embed(texts, normalize=False, truncate=False)
            vectors = [np.asarray(v, dtype=np.float64) for v in raw]
        if self.normalize:
            vectors = [v / n if (n := float(np.linalg.norm(v))) > 0 else v for v in vectors]
        return [[float(x) for x in v] for v in vectors]

    def _mean_token_vector(self, text: str) -> Any:
        import numpy as np

        tokens = np.asarray(self._llama.embed(text, normalize=False, truncate=False), dtype=np.float64)
        return tokens.reshape(-1, tokens.shape[-1]).mean(axis=0)

    def _check_embedding_inputs(self, texts: list[str]) -> None:
        # Checked before llama.cpp sees them: a text of zero tokens fails the decode and leaves
        # llama-cpp-python's batch in a state that crashes the process when the model is freed.
        n_batch = int(self._llama.n_batch)
        for index, text in enumerate(texts):
            count = len(self._llama.tokenize(text.encode("utf-8")))
            if count == 0:
                raise ConfigError(
                    f"embedding input {index} is empty; send text with at least one token", field="input"
                )
            if count > n_batch:
                raise ConfigError(
                    f"embedding input {index} has {count} tokens, more than n_batch {n_batch} of model "
                    f"'{self.model_id}'; shorten it or raise options n_batch",
                    field="input",
                )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._runner.call(self._llama.close)
        finally:
            self._runner.close()


def _check_prompt(prompt: str) -> None:
    if not prompt:
        raise ConfigError("the prompt is empty; llama.cpp needs at least one prompt token", field="prompt")


def _map_error(exc: Exception, what: str, model_id: str) -> XpuflowError:
    message = str(exc)
    if "exceed context window" in message:
        return ConfigError(
            f"{message} of model '{model_id}'; shorten the prompt, lower max_tokens or raise options n_ctx"
        )
    if type(exc).__module__.startswith("jinja2"):
        return ConfigError(
            f"the chat template of model '{model_id}' rejected the messages: {message}", field="messages"
        )
    return SessionError(f"llama.cpp failed {what} for model '{model_id}': {type(exc).__name__}: {message}")


class LlamaCppPlugin:
    """GGUF models on the CPU, and on GPUs when llama-cpp-python was built with GPU offload."""

    name = "llamacpp"

    def availability(self) -> Availability:
        try:
            import llama_cpp
        except Exception as exc:  # ImportError, or OSError from a broken shared library
            return Availability(False, f"llama-cpp-python is not usable ({exc}); {_INSTALL_HINT}")
        version = str(getattr(llama_cpp, "__version__", "unknown"))
        try:
            vendors = _gpu_vendors()
        except Exception as exc:
            return Availability(True, f"llama-cpp-python {version} (GPU support unknown: {exc})", version)
        if vendors == frozenset():
            where = "CPU only (built without GPU offload)"
        else:
            where = f"CPU and GPU offload ({', '.join(sorted(vendors)) if vendors else 'any vendor'})"
        return Availability(True, f"llama-cpp-python {version}: {where}", version)

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """CPUs always; GPUs only when this build offloads to their vendor. Never raises."""
        try:
            vendors = _gpu_vendors()
        except Exception:
            return []
        return [r for r in resources if _runs_on(r, vendors)]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """Nothing for a GGUF that runs as it is; ``gguf-requant`` when ``options.gguf_type`` is set."""
        _check_options(config)
        gguf_type = config.option("gguf_type")
        if gguf_type is None:
            return []
        _check_gguf(config.path)
        return [
            BuildProfile(
                name=REQUANT_PROFILE,
                target=ResourceType.CPU,  # a GGUF is device-independent
                compiler="llama.cpp",
                compiler_version=f"llama-cpp-python {package_version('llama-cpp-python')}",
                flags=(f"type={gguf_type}",),
                backend=self.name,
                description=f"the GGUF's weights rewritten as {gguf_type} by llama.cpp's quantizer",
            )
        ]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        if profile.name != REQUANT_PROFILE:
            raise BuildError(f"the llamacpp backend has no build profile '{profile.name}'")
        gguf_type = str(config.option("gguf_type"))
        source = _check_gguf(config.path)
        requantize(source, out_dir / _REQUANT_FILE, gguf_type)
        return {"source": source.name, "gguf_type": gguf_type}

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        embedding = bool(config.option("embedding", False))
        unsupported = {
            "native_batching": _NO_NATIVE_BATCHING,
            "tensor": "llama.cpp runs language models only",
        }
        if not embedding:
            unsupported["embeddings"] = "the model is loaded without embeddings; set options embedding: true"
        return Capability(
            max_batch_size=1,
            max_seq_len=int(config.option("n_ctx") or config.max_seq_len),
            supports_kv_cache=True,
            supports_streaming=True,
            supports_embeddings=embedding,
            supports_chat=True,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.LATENCY,
            unsupported=unsupported,
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> LlamaCppSession:
        """Load the GGUF on a new model thread. Raises ConfigError for a bad path, file or option,
        BackendUnavailable without llama-cpp-python, and SessionError when llama.cpp cannot load it."""
        _check_gguf(config.path)
        try:
            import llama_cpp
        except Exception as exc:
            raise BackendUnavailable(f"llama-cpp-python is not usable ({exc}); {_INSTALL_HINT}") from exc
        built = artifacts.get(REQUANT_PROFILE)
        model_path = built.path / _REQUANT_FILE if built is not None else None
        if config.option("gguf_type") is not None and model_path is None:
            raise ConfigError(
                f"model '{config.model_id}' sets options.gguf_type but no '{REQUANT_PROFILE}' artifact was "
                "built; create the session through the orchestrator or build_all()",
                field="options.gguf_type",
            )
        kwargs = llama_kwargs(
            resources,
            config,
            gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
            model_path=model_path,
        )
        runner = BlockingRunner(f"llamacpp-{config.model_id}")
        try:
            llama = await runner.call(llama_cpp.Llama, **kwargs)
        except Exception as exc:
            runner.close()
            raise SessionError(
                f"llama.cpp could not load {config.path} for model '{config.model_id}': {exc}; "
                "check that the file is a complete GGUF of an architecture this llama-cpp-python supports"
            ) from exc
        return LlamaCppSession(
            config.model_id,
            resources,
            llama,
            runner,
            embedding=kwargs["embedding"],
            normalize=bool(config.option("normalize", True)),
        )
