"""The ``transformers`` backend's session: one Hugging Face model loaded in torch, serving generation
(batched, streamed, from cached prompt prefixes) or embeddings. ``TransformersPlugin.create_session``
(in ``backends/transformers/plugin.py``) builds it; see that module for the backend as a whole.

Generation batches natively: ``generate_batch``/``chat_batch`` run one ``model.generate`` for the
whole batch, each row laid out as ``cached prefix + pads + rest`` (plain left padding when no prefix is
shared: a decoder continues from the last position of every row, so the pads go before the row's own
tokens), then cut each row at its first end-of-sequence token. Streaming runs ``generate`` with a token
streamer on a helper thread and decodes incrementally; a client that goes away stops the generation at
the next token; the last chunk carries the token counts.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

from xpuflow.backends.base import (
    BatchMode,
    ChatMessage,
    Completion,
    GenerationParams,
    Session,
    StreamChunk,
)
from xpuflow.backends.blocking import BlockingRunner
from xpuflow.backends.decode_loop import DecodeLoop, LoopRow
from xpuflow.backends.prefix_cache import PrefixCache, common_prefix_length, middle_padded
from xpuflow.backends.token_stream import (
    StreamText,
    TokenStreamer,
    cancel_criteria,
    cut_at_stop,
)
from xpuflow.backends.transformers.kv_cache_arg import cache_kwarg, output_cache
from xpuflow.errors import ConfigError, SessionError, XpuflowError
from xpuflow.types import Resource

__all__ = ["TransformersSession"]

T = TypeVar("T")
log = logging.getLogger(__name__)


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
        continuous: bool = False,
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
        self.cache_kwarg = cache_kwarg(model)  # "cache" on newer transformers, "past_key_values" before
        self._tokenizer = tokenizer
        self._runner = runner
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        self._eos_ids = frozenset(eos_ids)
        # Continuous batching: every generation goes through one decode loop on its own thread,
        # which admits requests into the running batch between steps (see decode_loop.py).
        self._loop: DecodeLoop | None = None
        if continuous and not embedding:
            self._loop = DecodeLoop(
                model,
                tokenizer,
                device=device,
                max_rows=max_batch_size,
                eos_ids=self._eos_ids,
                prepare=self._inputs,
                max_seq_len=max_seq_len,
                model_id=model_id,
            )
            self.batch_mode = BatchMode.CONTINUOUS

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
                try:
                    with torch.inference_mode():
                        head = torch.tensor([list(prefix)], device=self.device)
                        kv = output_cache(self._model(input_ids=head, use_cache=True))
                    if kv is None or not hasattr(kv, "batch_repeat_interleave"):
                        raise TypeError(f"the model returned no extendable cache ({type(kv).__name__})")
                except Exception as exc:
                    if "out of memory" in str(exc):
                        raise
                    self._disable_prefix_cache(exc)
                    prefix, kv = (), None
                else:
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
            inputs[self.cache_kwarg] = cache
        return inputs, [len(r) for r in rows]

    def _disable_prefix_cache(self, exc: BaseException) -> None:
        log.warning(
            "model '%s': generation from a cached prefix failed (%s: %s); prefix caching is off for "
            "this session (set options.prefix_cache: false to silence this)",
            self.model_id,
            type(exc).__name__,
            exc,
        )
        self.prefix_cache = None

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
            for attempt in (1, 2):
                encoded, prompt_lengths = self._inputs(chunk, add_special_tokens)
                max_new = self._max_new_tokens(max(prompt_lengths), params)
                kwargs = self._generate_kwargs(encoded, params, max_new)
                if params.stop:
                    kwargs["generation_config"].stop_strings = list(params.stop)
                    kwargs["tokenizer"] = self._tokenizer
                try:
                    with torch.inference_mode():
                        output = self._model.generate(**kwargs)
                    break
                except Exception as exc:
                    if attempt == 2 or self.cache_kwarg not in encoded or "out of memory" in str(exc):
                        raise
                    # a model whose cache cannot start from a stored prefix: serve without the cache
                    self._disable_prefix_cache(exc)
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
        out = StreamText(self._tokenizer, params.stop)
        count, finish = 0, None
        try:
            while finish is None and (ids := streamer.queue.get()) is not None:
                for token in ids:
                    if token in self._eos_ids:
                        finish = "stop"
                        break
                    count += 1
                    piece = out.push(token)
                    if piece:
                        yield StreamChunk(piece)
                    if out.stopped:
                        finish = "stop"
                        break
        finally:
            cancel.set()  # stops generate() at its next step when the client went away
            worker.join()
        if failures:
            raise failures[0]
        tail = out.finish()
        if tail:
            yield StreamChunk(tail)
        yield StreamChunk(
            "",
            finish or ("stop" if out.stopped or count < max_new else "length"),
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

    # -- continuous batching ------------------------------------------------------------------------

    async def _loop_call(self, text: str, special: bool, params: GenerationParams) -> Completion:
        assert self._loop is not None
        row = self._loop.submit(LoopRow(text, special, params))
        try:
            return await asyncio.wrap_future(row.future)
        except asyncio.CancelledError:
            row.cancel.set()  # leaves the running batch at its next step
            raise

    async def _loop_stream(
        self, make_text: Callable[[], str], special: bool, params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        assert self._loop is not None
        self._check(generative=True)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[StreamChunk | None] = asyncio.Queue()

        def on_chunk(chunk: StreamChunk) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        row = LoopRow(make_text(), special, params, on_chunk=on_chunk)
        row.future.add_done_callback(lambda _: loop.call_soon_threadsafe(chunks.put_nowait, None))
        self._loop.submit(row)
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
                if chunk.finish_reason is not None:
                    return
            if not row.future.cancelled() and row.future.exception() is not None:
                raise row.future.exception()  # type: ignore[misc]
        finally:
            row.cancel.set()  # a client that went away frees its row at the next step

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, prompt: str, params: GenerationParams) -> Completion:
        if self._loop is not None:
            self._check(generative=True)
            return await self._loop_call(prompt, True, params)
        return (await self.generate_batch([prompt], params))[0]

    async def generate_batch(self, prompts: Sequence[str], params: GenerationParams) -> list[Completion]:
        """One ``generate`` per ``max_batch_size`` prompts, left-padded; results in the prompts' order."""
        self._check(generative=True)
        if not prompts:
            return []
        if self._loop is not None:
            return list(await asyncio.gather(*(self._loop_call(p, True, params) for p in prompts)))
        return await self._call("text completion", self._generate_blocking, list(prompts), params, True)

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        if self._loop is not None:
            self._check(generative=True)
            return await self._loop_call(self._render(messages), False, params)
        return (await self.chat_batch([messages], params))[0]

    async def chat_batch(
        self, conversations: Sequence[Sequence[ChatMessage]], params: GenerationParams
    ) -> list[Completion]:
        """Each conversation rendered with the chat template (generation prompt added), then generated
        as one batch."""
        self._check(generative=True)
        if not conversations:
            return []
        if self._loop is not None:
            texts = [self._render(c) for c in conversations]
            return list(await asyncio.gather(*(self._loop_call(t, False, params) for t in texts)))

        def run() -> list[Completion]:
            return self._generate_blocking([self._render(c) for c in conversations], params, False)

        return await self._call("chat", run)

    def stream_generate(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamChunk]:
        if self._loop is not None:
            return self._loop_stream(lambda: prompt, True, params)
        return self._stream("streamed text completion", lambda: prompt, params, True)

    def stream_chat(
        self, messages: Sequence[ChatMessage], params: GenerationParams
    ) -> AsyncIterator[StreamChunk]:
        if self._loop is not None:
            return self._loop_stream(lambda: self._render(messages), False, params)
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
        if self._loop is not None:
            await asyncio.to_thread(self._loop.close)
        try:
            await self._runner.call(self._release)
        finally:
            self._runner.close()

    def _release(self) -> None:
        self._model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
