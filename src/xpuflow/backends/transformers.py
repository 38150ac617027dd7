"""The ``transformers`` backend: Hugging Face models on torch, on the CPU, CUDA/ROCm GPUs, Apple MPS
and Intel XPU.

A model is a Hugging Face folder (with ``config.json``) or a GGUF file. A GGUF file is dequantised once
by the ``gguf-dequant`` build step, through transformers' GGUF loader, and saved as a plain fp32
safetensors folder with its tokenizer and chat template in the artifact store; every later load reads
that folder, in a fraction of the time::

    config = ModelConfig("smollm2", path=smollm2_gguf_path(), task="chat")
    artifacts = build_all(TransformersPlugin(), [cpu], config, ArtifactStore())
    session = await TransformersPlugin().create_session([cpu], config, artifacts)
    reply = await session.chat([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=16))

Generation batches natively: ``generate_batch``/``chat_batch`` run one ``model.generate`` for the
whole batch with left padding (a decoder continues from the last position of every row, so the pads
go in front), then cut each row at its first end-of-sequence token. Decoding is greedy at temperature 0.
Streaming runs ``generate`` with a token streamer on a helper thread and decodes incrementally; a
client that goes away stops the generation at the next token. With ``task: embedding`` the folder is an
encoder and ``embed`` returns mean-pooled (or CLS), unit-length vectors.

Precision: fp32, bf16 and fp16. fp16 on a CPU is refused (torch's CPU half-precision kernels are slow
and partial): use bf16 or fp32 there. Options are listed in ``TRANSFORMERS_OPTIONS``.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from xpuflow.backends.base import (
    Availability,
    BatchMode,
    ChatMessage,
    Completion,
    GenerationParams,
    ModelConfig,
    ModelTask,
    Session,
    StreamChunk,
)
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.onnx_export import check_pooling, encoder_max_length, package_version
from xpuflow.backends.prefix_cache import PrefixCache, common_prefix_length, middle_padded
from xpuflow.backends.token_stream import (
    IncrementalDecoder,
    StopFilter,
    TokenStreamer,
    cancel_criteria,
    cut_at_stop,
)
from xpuflow.build.profile import BuildArtifact, BuildProfile
from xpuflow.errors import BackendUnavailable, BuildError, ConfigError, SessionError, XpuflowError
from xpuflow.types import Capability, OptimizedFor, Resource, ResourceType

__all__ = ["TRANSFORMERS_OPTIONS", "TransformersPlugin", "TransformersSession", "torch_device"]

T = TypeVar("T")

#: option name -> what it does; anything else in ``ModelConfig.options`` is a ConfigError.
TRANSFORMERS_OPTIONS: dict[str, str] = {
    "num_threads": "torch CPU threads (torch.set_num_threads; process-wide; default: torch's own)",
    "attn_implementation": "attention kernel: eager, sdpa, ... (default: transformers' choice)",
    "pooling": "embeddings: mean or cls (default mean)",
    "normalize": "embeddings: scale to unit length, as OpenAI does (default true)",
    "prefix_cache": "generation: reuse the keys and values of shared prompt prefixes (default true)",
    "prefix_cache_entries": "generation: how many prefixes the prefix cache keeps (default 8)",
}

DEQUANT_PROFILE = "gguf-dequant"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install 'xpuflow[transformers]'"


@dataclass(frozen=True)
class _Source:
    kind: str  # "hf" or "gguf"
    path: Path


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_device(resource: Resource) -> str | None:
    """The torch device string for a resource ("cpu", "cuda:1", "mps", "xpu:0"), or None when torch
    has no device for it. ROCm builds of torch address AMD GPUs as "cuda"."""
    if resource.type is ResourceType.CPU:
        return "cpu"
    kind, _, index = resource.id.partition(":")
    number = index if index.isdigit() else str(resource.attributes.get("index", 0))
    if kind in ("cuda", "rocm") and resource.type is ResourceType.GPU:
        return f"cuda:{number}"
    if kind == "mps":
        return "mps"
    if kind == "xpu":
        return f"xpu:{number}"
    return None


def _primary_device(resources: Sequence[Resource]) -> str:
    if not resources:
        return "cpu"
    device = torch_device(resources[0])
    if device is None:
        raise ConfigError(
            f"the transformers backend cannot run on {resources[0].id} ({resources[0].type.value}); torch "
            "drives cpu, cuda/rocm, mps and xpu devices",
            field="device",
        )
    return device


def _resolve_source(config: ModelConfig) -> _Source:
    what = "a Hugging Face model folder (with config.json) or a .gguf file"
    path = config.path
    if path is None:
        raise ConfigError(f"the transformers backend needs a model path: {what}", field="model")
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist; pass {what}", field="model")
    if config.task is ModelTask.TENSOR:
        raise ConfigError(
            "the transformers backend serves chat, completion and embedding tasks", field="task"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model; pass {what}",
                field="model",
            )
        return _Source("hf", path)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ConfigError(
            f"model file {path} is not a GGUF file (it starts with {magic!r}); pass {what}", field="model"
        )
    if config.task is ModelTask.EMBEDDING:
        raise ConfigError(
            "GGUF files are served for chat and completion here; for embeddings pass a Hugging Face encoder "
            "folder, or use the llamacpp backend with options embedding: true",
            field="task",
        )
    return _Source("gguf", path)


def _check_config(config: ModelConfig, resources: Sequence[Resource]) -> _Source:
    source = _resolve_source(config)
    unknown = sorted(set(config.options) - set(TRANSFORMERS_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown transformers option(s) {', '.join(unknown)}; valid: {', '.join(TRANSFORMERS_OPTIONS)}",
            field=f"options.{unknown[0]}",
        )
    if config.precision not in _DTYPES:
        raise ConfigError(
            f"the transformers backend runs precision fp32, bf16 or fp16, not '{config.precision}'; "
            "for int8 or int4 weights use the llamacpp backend with a quantised GGUF",
            field="precision",
        )
    if config.precision == "fp16" and _primary_device(resources) == "cpu":
        raise ConfigError(
            "precision fp16 is not supported on the CPU (torch's CPU half-precision kernels are slow and "
            "partial); use bf16 or fp32 on cpu",
            field="precision",
        )
    threads = config.option("num_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(
            f"options.num_threads must be a positive integer, got {threads!r}", field="options.num_threads"
        )
    check_pooling(config.options, "mean")
    if not isinstance(config.option("prefix_cache", True), bool):
        raise ConfigError(
            f"options.prefix_cache must be true or false, got {config.option('prefix_cache')!r}",
            field="options.prefix_cache",
        )
    entries = config.option("prefix_cache_entries", 8)
    if not isinstance(entries, int) or isinstance(entries, bool) or entries < 1:
        raise ConfigError(
            f"options.prefix_cache_entries must be a positive integer, got {entries!r}",
            field="options.prefix_cache_entries",
        )
    return source


def _model_folder(source: _Source, artifacts: Mapping[str, BuildArtifact], model_id: str) -> Path:
    if source.kind == "hf":
        return source.path
    artifact = artifacts.get(DEQUANT_PROFILE)
    if artifact is None:
        raise BuildError(
            f"model '{model_id}' is a GGUF file and needs its '{DEQUANT_PROFILE}' artifact; build it first "
            "(build_all, or `xpuflow build`) and pass the artifacts to create_session"
        )
    return artifact.path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _has_chat_template(folder: Path) -> bool:
    return (folder / "chat_template.jinja").is_file() or bool(
        _read_json(folder / "tokenizer_config.json").get("chat_template")
    )


def _dtype_kwargs(torch: Any, precision: str) -> dict[str, Any]:
    """``dtype=`` for from_pretrained; transformers before 4.56 called it ``torch_dtype``."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    name = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {name: getattr(torch, _DTYPES[precision])}


def _dequantize_gguf(gguf: Path, out_dir: Path) -> dict[str, Any]:
    """Load a GGUF through transformers, dequantised to fp32, and save it as a Hugging Face folder."""
    if not _installed("gguf"):
        raise BackendUnavailable(
            f"loading GGUF files in transformers needs the gguf package; {_INSTALL_HINT}"
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "gguf_file": gguf.name,
        "local_files_only": True,
        **_dtype_kwargs(torch, "fp32"),
    }
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None and "dequantize" in inspect.signature(gguf_config).parameters:
        # Newer transformers can keep GGUF blocks packed; we want plain weights that save and reload.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if not getattr(quantizer.quantization_config, "dequantize", False):
            raise BuildError(
                f"transformers {transformers.__version__} kept the weights of {gguf.name} packed, so "
                "they cannot be saved as a dense model; use the llamacpp backend for this file"
            )
        quantizer.remove_quantization_config(model)  # the weights are dense already
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "source": "gguf",
        "gguf_file": gguf.name,
        "architecture": str(getattr(model.config, "model_type", "unknown")),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": "float32",
        "chat_template": _has_chat_template(out_dir),
    }


class TransformersSession(Session):
    """One model loaded in torch. Every torch call runs on the session's single model thread."""

    batch_mode = BatchMode.NATIVE

    def __init__(
        self,
        model_id: str,
        resources: Sequence[Resource],
        *,
        model: Any,
        tokenizer: Any,
        runner: BlockingRunner,
        device: str,
        embedding: bool,
        max_seq_len: int,
        max_batch_size: int,
        pooling: str = "mean",
        normalize: bool = True,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        super().__init__(model_id, resources)
        self.prefix_cache = prefix_cache
        self._template_seeded = False
        self.device = device
        self.embedding = embedding
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.pooling = pooling
        self.normalize = normalize
        self._model = model
        self._tokenizer = tokenizer
        self._runner = runner
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        self._eos_ids = frozenset(eos_ids)

    # -- plumbing -----------------------------------------------------------------------------------

    def _check(self, generative: bool) -> None:
        if self.closed:
            raise SessionError(
                f"transformers session for model '{self.model_id}' is closed; create a new one"
            )
        if generative and self.embedding:
            raise self._unsupported("generation (it was deployed with task: embedding)")
        if not generative and not self.embedding:
            raise self._unsupported("embeddings (deploy an encoder with task: embedding)")

    async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._runner.call(fn, *args)
        except XpuflowError:
            raise
        except Exception as exc:
            raise self._map_error(exc, what) from exc

    def _map_error(self, exc: BaseException, what: str) -> XpuflowError:
        if "out of memory" in str(exc).lower():
            return SessionError(
                f"{self.device} ran out of memory during {what} for model '{self.model_id}'; lower "
                "max_batch_size or max_tokens, or use precision bf16"
            )
        if type(exc).__module__.startswith("jinja2"):
            return ConfigError(
                f"the chat template of model '{self.model_id}' rejected the messages: {exc}", field="messages"
            )
        return SessionError(
            f"transformers failed {what} for model '{self.model_id}': {type(exc).__name__}: {exc}"
        )

    def _render(self, messages: Sequence[ChatMessage]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise ConfigError(
                f"model '{self.model_id}' has no chat template; send a text completion instead",
                field="messages",
            )
        conversation = [dict(m) for m in messages]
        if not conversation or not all(isinstance(m.get("role"), str) for m in conversation):
            raise ConfigError(
                "messages must be a non-empty list of {role, content} objects", field="messages"
            )
        rendered = self._tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        return str(rendered)

    def _inputs(self, texts: list[str], add_special_tokens: bool) -> tuple[dict[str, Any], list[int]]:
        """Model inputs for a batch of prompts and each prompt's length in tokens.

        Rows are left-padded; with the prefix cache on, the prefix the rows share is taken from the
        cache (computed once) and each row laid out as ``prefix + pads + rest`` (see
        ``prefix_cache.middle_padded``), so that only the rest is computed.
        """
        import torch

        rows = [list(r) for r in self._tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
        if any(not r for r in rows):
            raise ConfigError("a prompt encodes to no tokens; send some text", field="prompt")
        pad = self._tokenizer.pad_token_id
        prefix: tuple[int, ...] = ()
        kv: Any = None
        if self.prefix_cache is not None:
            if not add_special_tokens:
                self._seed_template()
            prefix, kv = self.prefix_cache.plan(rows)
            if prefix and kv is None:
                with torch.inference_mode():
                    head = torch.tensor([list(prefix)], device=self.device)
                    kv = self._model(input_ids=head, use_cache=True).past_key_values
                self.prefix_cache.put(prefix, kv)
        ids, mask = middle_padded(rows, len(prefix), pad)
        inputs: dict[str, Any] = {
            "input_ids": torch.tensor(ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }
        if prefix:
            cache = copy.deepcopy(kv)  # generation extends the cache in place
            if len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))
            inputs["past_key_values"] = cache
        return inputs, [len(r) for r in rows]

    def _seed_template(self) -> None:
        """Teach the prefix cache the chat template's opening (system prompt, start of the user turn)."""
        if self._template_seeded or self.prefix_cache is None:
            return
        self._template_seeded = True
        try:
            rows = [
                self._tokenizer(self._render([{"role": "user", "content": text}]), add_special_tokens=False)[
                    "input_ids"
                ]
                for text in ("Hi", "What?")
            ]
        except Exception:  # a template that rejects these: the cache still learns from batches
            return
        self.prefix_cache.add_seed(rows[0][: common_prefix_length(rows)])

    def _max_new_tokens(self, longest_prompt: int, params: GenerationParams) -> int:
        room = self.max_seq_len - longest_prompt
        if room < 1:
            raise ConfigError(
                f"the prompt has {longest_prompt} tokens but model '{self.model_id}' holds "
                f"{self.max_seq_len}; shorten the prompt or raise the deployment's max_seq_len",
                field="prompt",
            )
        return min(params.max_tokens, room)

    def _generate_kwargs(self, encoded: Any, params: GenerationParams, max_new_tokens: int) -> dict[str, Any]:
        import torch
        import transformers

        generation_config: Any = transformers.GenerationConfig  # untyped in some releases
        sampling = params.temperature > 0
        config = generation_config(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=self._tokenizer.pad_token_id,
            bos_token_id=self._tokenizer.bos_token_id,
        )
        if sampling:
            config.temperature = params.temperature
            config.top_p = params.top_p
            config.top_k = 0  # OpenAI sampling has no top-k cut
            if params.seed is not None:
                torch.manual_seed(params.seed)
        kwargs: dict[str, Any] = {**encoded, "generation_config": config}
        return kwargs

    # -- generation ---------------------------------------------------------------------------------

    def _generate_blocking(
        self, texts: list[str], params: GenerationParams, add_special_tokens: bool
    ) -> list[Completion]:
        import torch

        results: list[Completion] = []
        for start in range(0, len(texts), self.max_batch_size):
            chunk = texts[start : start + self.max_batch_size]
            encoded, prompt_lengths = self._inputs(chunk, add_special_tokens)
            max_new = self._max_new_tokens(max(prompt_lengths), params)
            kwargs = self._generate_kwargs(encoded, params, max_new)
            if params.stop:
                kwargs["generation_config"].stop_strings = list(params.stop)
                kwargs["tokenizer"] = self._tokenizer
            with torch.inference_mode():
                output = self._model.generate(**kwargs)
            width = encoded["input_ids"].shape[1]  # left padding: every row's prompt ends here
            for row, prompt_tokens in enumerate(prompt_lengths):
                results.append(self._completion(output[row, width:].tolist(), prompt_tokens, max_new, params))
        return results

    def _completion(
        self, new_ids: list[int], prompt_tokens: int, max_new: int, params: GenerationParams
    ) -> Completion:
        """One row of a batch: its new tokens up to the first end-of-sequence token, decoded."""
        end = next((i for i, t in enumerate(new_ids) if t in self._eos_ids), None)
        tokens = new_ids if end is None else new_ids[:end]
        pad = self._tokenizer.pad_token_id
        if end is None and pad is not None:
            # A row a stop string ended early is filled with pads up to the batch's longest row.
            while tokens and tokens[-1] == pad:
                tokens = tokens[:-1]
        text, stopped = cut_at_stop(self._tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        # Rows that neither ended nor stopped run to max_new; shorter ones were stopped by a stop string.
        finish = "stop" if stopped or end is not None or len(tokens) < max_new else "length"
        return Completion(text, prompt_tokens, len(tokens), finish, self.model_id)

    def _stream_blocking(
        self, text: str, params: GenerationParams, add_special_tokens: bool
    ) -> Iterator[StreamChunk]:
        import torch
        from transformers import StoppingCriteriaList

        encoded, prompt_lengths = self._inputs([text], add_special_tokens)
        max_new = self._max_new_tokens(prompt_lengths[0], params)
        kwargs = self._generate_kwargs(encoded, params, max_new)
        cancel = threading.Event()
        streamer = TokenStreamer()
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([cancel_criteria(cancel)]))
        failures: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self._model.generate(**kwargs)
            except BaseException as exc:  # re-raised on the consumer's side below
                failures.append(exc)
            finally:
                streamer.end()

        worker = threading.Thread(target=run, name=f"transformers-stream-{self.model_id}", daemon=True)
        worker.start()
        decoder, stops = IncrementalDecoder(self._tokenizer), StopFilter(params.stop)
        count, finish, stopped = 0, None, False
        try:
            while finish is None and (ids := streamer.queue.get()) is not None:
                for token in ids:
                    if token in self._eos_ids:
                        finish = "stop"
                        break
                    count += 1
                    piece, stopped = stops.feed(decoder.push(token))
                    if piece:
                        yield StreamChunk(piece)
                    if stopped:
                        finish = "stop"
                        break
        finally:
            cancel.set()  # stops generate() at its next step when the client went away
            worker.join()
        if failures:
            raise failures[0]
        if not stopped:
            tail, stopped = stops.feed(decoder.flush())
            tail += "" if stopped else stops.flush()
            if tail:
                yield StreamChunk(tail)
        yield StreamChunk(
            "",
            finish or ("stop" if stopped or count < max_new else "length"),
            prompt_tokens=prompt_lengths[0],
            completion_tokens=count,
        )

    async def _stream(
        self, what: str, make_text: Callable[[], str], params: GenerationParams, special: bool
    ) -> AsyncIterator[StreamChunk]:
        self._check(generative=True)

        def produce() -> Iterator[StreamChunk]:
            return self._stream_blocking(make_text(), params, special)

        try:
            async for chunk in self._runner.iterate(produce):
                yield chunk
        except XpuflowError:
            raise
        except Exception as exc:
            raise self._map_error(exc, what) from exc

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        return (await self.generate_batch([prompt], params))[0]

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        """One ``generate`` per ``max_batch_size`` prompts, left-padded; results in the prompts' order."""
        self._check(generative=True)
        if not prompts:
            return []
        return await self._call("text completion", self._generate_blocking, list(prompts), params, True)

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        return (await self.chat_batch([messages], params))[0]

    async def chat_batch(
        self, conversations: Sequence[Sequence[ChatMessage]], params: GenerationParams
    ) -> list[Completion]:
        """Each conversation rendered with the chat template (generation prompt added), then generated
        as one batch."""
        self._check(generative=True)
        if not conversations:
            return []

        def run() -> list[Completion]:
            return self._generate_blocking([self._render(c) for c in conversations], params, False)

        return await self._call("chat", run)

    def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        return self._stream("streamed text completion", lambda: prompt, params, True)

    def stream_chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        return self._stream("streamed chat", lambda: self._render(messages), params, False)

    # -- embeddings ---------------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order: pooled over real tokens, unit length unless normalize is off."""
        self._check(generative=False)
        items = list(texts)
        bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
        if bad is not None:
            raise ConfigError(f"input {bad} is a {type(items[bad]).__name__}, not text", field="input")
        if not items:
            return []
        return await self._call("embeddings", self._embed_blocking, items)

    def _embed_blocking(self, texts: list[str]) -> list[list[float]]:
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        vectors: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            encoded = self._tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_seq_len,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self._model(**encoded).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                pooled = pooled.float()
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
            for row, vector in zip(rows, pooled.cpu().tolist(), strict=True):
                vectors[row] = vector
        return vectors

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._runner.call(self._release)
        finally:
            self._runner.close()

    def _release(self) -> None:
        self._model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class TransformersPlugin:
    """Hugging Face models (and dequantised GGUF files) on torch devices."""

    name = "transformers"

    def availability(self) -> Availability:
        missing = [m for m in ("torch", "transformers") if not _installed(m)]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed; {_INSTALL_HINT}")
        version = package_version("transformers")
        gguf = "GGUF loading available" if _installed("gguf") else "no GGUF loading (pip install gguf)"
        return Availability(
            True, f"transformers {version} on torch {package_version('torch')}; {gguf}", version
        )

    def probe(self, resources: Sequence[Resource]) -> list[Resource]:
        """CPUs, and the CUDA/ROCm, MPS and XPU devices this torch build sees. Never raises."""
        if not (_installed("torch") and _installed("transformers")):
            return []
        found = [r for r in resources if r.type is ResourceType.CPU]
        others = [r for r in resources if r.type is not ResourceType.CPU and torch_device(r) is not None]
        if not others:
            return found
        try:
            import torch
        except Exception:
            return found
        for resource in others:
            try:
                if _torch_sees(torch, str(torch_device(resource))):
                    found.append(resource)
            except Exception:  # a driver that fails its query: the device is not usable
                continue
        return [r for r in resources if r in found]

    def required_build_profiles(
        self, resources: Sequence[Resource], config: ModelConfig
    ) -> list[BuildProfile]:
        """``gguf-dequant`` for a GGUF file (device-independent, so it targets the host); nothing else."""
        source = _check_config(config, resources)
        if source.kind != "gguf":
            return []
        versions = "; ".join(f"{n} {package_version(n)}" for n in ("transformers", "torch", "gguf"))
        return [
            BuildProfile(
                name=DEQUANT_PROFILE,
                target=ResourceType.CPU,
                compiler="transformers",
                compiler_version=versions,
                flags=("dtype=float32", "format=safetensors"),
                backend=self.name,
                description="GGUF dequantised to a Hugging Face safetensors folder with its tokenizer",
            )
        ]

    def build(self, profile: BuildProfile, config: ModelConfig, out_dir: Path) -> Mapping[str, Any]:
        if profile.name != DEQUANT_PROFILE:
            raise BuildError(f"the transformers backend has no build profile '{profile.name}'")
        source = _resolve_source(config)
        if source.kind != "gguf":
            raise BuildError(f"'{DEQUANT_PROFILE}' builds GGUF files only; {source.path} is a folder")
        return _dequantize_gguf(source.path, out_dir)

    def get_capability(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> Capability:
        source = _check_config(config, resources)
        device = _primary_device(resources)
        folder = source.path if source.kind == "hf" else getattr(artifacts.get(DEQUANT_PROFILE), "path", None)
        positions = _read_json(folder / "config.json").get("max_position_embeddings") if folder else None
        max_seq_len = min(config.max_seq_len, positions) if isinstance(positions, int) else config.max_seq_len
        generative = config.task is not ModelTask.EMBEDDING
        unsupported: dict[str, str] = {}
        chat = generative
        if generative:
            unsupported["embeddings"] = "deployed for generation; deploy an encoder with task: embedding"
            if folder is not None and not _has_chat_template(folder):
                chat = False
                unsupported["chat"] = "the tokenizer has no chat template; send text completions"
        else:
            for feature in ("chat", "completion", "streaming"):
                unsupported[feature] = "deployed with task: embedding"
        return Capability(
            max_batch_size=config.max_batch_size,
            max_seq_len=max_seq_len,
            supports_kv_cache=generative,
            supports_streaming=generative,
            supports_embeddings=not generative,
            supports_chat=chat,
            dtypes=(config.precision,),
            optimized_for=OptimizedFor.LATENCY if device == "cpu" else OptimizedFor.THROUGHPUT,
            unsupported=unsupported,
            details={"device": device, "source": source.kind},
        )

    async def create_session(
        self, resources: Sequence[Resource], config: ModelConfig, artifacts: Mapping[str, BuildArtifact]
    ) -> TransformersSession:
        """Load tokenizer and model on a new model thread. Raises ConfigError for bad config, BuildError
        when a GGUF model's artifact is missing, BackendUnavailable without torch/transformers, and
        SessionError when the model cannot be loaded."""
        source = _check_config(config, resources)
        folder = _model_folder(source, artifacts, config.model_id)
        device = _primary_device(resources)
        try:
            import torch
            from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise BackendUnavailable(f"torch and transformers are needed ({exc}); {_INSTALL_HINT}") from exc
        embedding = config.task is ModelTask.EMBEDDING
        threads = config.option("num_threads")
        attention = config.option("attn_implementation")

        def load() -> tuple[Any, Any]:
            if threads is not None:
                torch.set_num_threads(int(threads))
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            kwargs: dict[str, Any] = {"local_files_only": True, **_dtype_kwargs(torch, config.precision)}
            if attention is not None:
                kwargs["attn_implementation"] = str(attention)
            model_class: Any = AutoModel if embedding else AutoModelForCausalLM
            model = model_class.from_pretrained(folder, **kwargs).to(device).eval()
            if not embedding:
                tokenizer.padding_side = "left"  # a decoder continues every row from its last position
                if tokenizer.pad_token is None:
                    if tokenizer.eos_token is None:
                        raise ConfigError(f"the tokenizer in {folder} has neither a pad nor an eos token")
                    tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer

        runner = BlockingRunner(f"transformers-{config.model_id}")
        try:
            model, tokenizer = await runner.call(load)
        except Exception as exc:
            runner.close()
            if isinstance(exc, XpuflowError):
                raise
            raise SessionError(
                f"transformers could not load {folder} for model '{config.model_id}' on {device}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        positions = getattr(model.config, "max_position_embeddings", None)
        if embedding:
            max_seq_len = encoder_max_length(folder, config.max_seq_len, tokenizer.model_max_length)
        else:
            max_seq_len = (
                min(config.max_seq_len, positions) if isinstance(positions, int) else config.max_seq_len
            )
        return TransformersSession(
            config.model_id,
            resources,
            model=model,
            tokenizer=tokenizer,
            runner=runner,
            device=device,
            embedding=embedding,
            max_seq_len=max_seq_len,
            max_batch_size=config.max_batch_size,
            pooling=check_pooling(config.options, "mean"),
            normalize=bool(config.option("normalize", True)),
            prefix_cache=None
            if embedding or not config.option("prefix_cache", True)
            else PrefixCache(capacity=int(config.option("prefix_cache_entries", 8))),
        )


def _torch_sees(torch: Any, device: str) -> bool:
    kind, _, index = device.partition(":")
    if kind == "cuda":
        return bool(torch.cuda.is_available()) and int(index or 0) < torch.cuda.device_count()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu is not None and bool(xpu.is_available()) and int(index or 0) < xpu.device_count()
    return False
