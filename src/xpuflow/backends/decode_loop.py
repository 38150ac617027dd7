"""Iteration-level (continuous) batching for Hugging Face causal language models.

Static batching runs a batch's generation to its end before the next batch starts: a request that
arrives one step after a batch began waits for all of it, and rows that finish early sit idle. A
``DecodeLoop`` instead owns one running batch on its own thread and changes it between decoding steps:
new requests are prefilled (sharing the prompt-prefix cache) and merged into the running keys and values,
finished rows leave at once, and every other row keeps decoding. This is the scheduling of Orca, vLLM and
TGI, over transformers' ``DynamicCache``::

    loop = DecodeLoop(model, tokenizer, device="cpu", max_rows=16, eos_ids={2}, prepare=session._inputs)
    row = loop.submit(prompt_ids_text, GenerationParams(max_tokens=32))   # from any thread
    completion = row.future.result()
    loop.close()

The running batch is laid out like a left-padded batch: each row's keys and values end at the same
column, masked columns in front of a row are padding. Merging pads the shorter side on the left; when
rows leave, columns that are padding for every remaining row are cut off. The prompts admitted at one
step hold at most ``max_prefill_tokens`` tokens (always at least one prompt), so a burst of long prompts
is prefilled over several steps and the running rows keep decoding between them. Every row carries its own
position counter, so padding never shifts a position. Greedy rows give the tokens the row would get
alone (up to floating-point reassociation in batched matrix products, as any batched generation).

``prepare(texts, add_special_tokens)`` is the session's input builder: it returns model inputs laid out
``prefix + pads + rest`` with the prefix's cached keys and values (``past_key_values``) when one is
shared, and each prompt's length in tokens.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xpuflow.backends.base import Completion, GenerationParams, StreamChunk
from xpuflow.backends.token_stream import StreamText, cut_at_stop
from xpuflow.backends.transformers.kv_cache_arg import cache_kwarg, output_cache
from xpuflow.errors import ConfigError, SessionError

__all__ = ["DecodeLoop", "LoopRow", "supports_continuous_batching"]

log = logging.getLogger(__name__)

Prepare = Callable[[list[str], bool], tuple[dict[str, Any], list[int]]]


def supports_continuous_batching(model: Any) -> str | None:
    """None when ``model`` can run in a ``DecodeLoop``; else why not (a sentence for an error message)."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return "transformers is not installed"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    layer_types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    if window and any("sliding" in str(t) for t in layer_types):
        return "it has sliding-window attention layers"
    if not hasattr(DynamicCache, "batch_select_indices"):
        return "this transformers release lacks DynamicCache.batch_select_indices"
    return None


@dataclass(eq=False)
class LoopRow:
    """One request in the loop. ``future`` gets the ``Completion``; a streaming row also gets each
    ``StreamChunk`` through ``on_chunk`` (called on the loop's thread). Set ``cancel`` to drop it."""

    text: str
    add_special_tokens: bool
    params: GenerationParams
    max_new: int = 0
    on_chunk: Callable[[StreamChunk], None] | None = None
    future: concurrent.futures.Future[Completion] = field(default_factory=concurrent.futures.Future)
    cancel: threading.Event = field(default_factory=threading.Event)
    # filled in by the loop
    prompt_tokens: int = 0
    position: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int = 0
    generator: Any = None
    text_out: StreamText | None = None  # a streaming row's text so far, stop strings held back
    streamed: str = ""
    finish: str | None = None


class DecodeLoop:
    """Continuous batching over one model; see the module docstring. Thread-safe ``submit``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        max_rows: int,
        eos_ids: Iterable[int],
        prepare: Prepare,
        max_seq_len: int,
        model_id: str = "",
        max_prefill_tokens: int = 2048,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.model = model
        self._cache_kwarg = cache_kwarg(model)
        self.tokenizer = tokenizer
        self.device = device
        self.max_rows = max_rows
        self.eos_ids = frozenset(eos_ids)
        self.prepare = prepare
        self.max_seq_len = max_seq_len
        self.model_id = model_id
        self._pending: queue.Queue[LoopRow | None] = queue.Queue()
        self._deferred: deque[LoopRow] = deque()  # admitted next, before anything newer
        self._rows: list[LoopRow] = []
        self._cache: Any = None
        self._mask: Any = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0
        self.max_rows_seen = 0

    # -- outside the loop --------------------------------------------------------------------------

    def submit(self, row: LoopRow) -> LoopRow:
        """Queue ``row``; the loop admits it at its next step. Raises SessionError after ``close``."""
        with self._lock:
            if self._closed:
                raise SessionError(f"the decode loop of model '{self.model_id}' is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"decode-loop-{self.model_id}", daemon=True
                )
                self._thread.start()
        self._pending.put(row)
        return row

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        """Stop the loop: rows still running or queued fail with SessionError. Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._pending.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        while True:
            fresh = self._take_pending(block=not self._rows)
            if fresh is None:
                break
            try:
                with torch.inference_mode():
                    if fresh:
                        self._admit(fresh)
                    if self._rows:
                        self._step()
            except Exception as exc:  # a failed step fails its rows; the loop serves the next ones
                log.exception("decode loop of model '%s' failed a step", self.model_id)
                error = SessionError(
                    f"transformers failed generation for model '{self.model_id}': {type(exc).__name__}: {exc}"
                )
                for row in [*self._rows, *fresh]:
                    if not row.future.done() and row not in self._deferred:
                        row.future.set_exception(error)
                self._rows, self._cache, self._mask = [], None, None
        stopped = SessionError(f"the decode loop of model '{self.model_id}' stopped; retry the request")
        for row in [*self._rows, *self._deferred]:
            if not row.future.done():
                row.future.set_exception(stopped)
        while True:
            try:
                left = self._pending.get_nowait()
            except queue.Empty:
                break
            if left is not None and not left.future.done():
                left.future.set_exception(stopped)
        self._rows, self._cache, self._mask = [], None, None

    def _take_pending(self, *, block: bool) -> list[LoopRow] | None:
        """Rows to admit now (up to the free places); None when the loop must end."""
        room = self.max_rows - len(self._rows)
        taken: list[LoopRow] = []
        if room <= 0:
            return [] if not self._closed else None
        while self._deferred and len(taken) < room:
            taken.append(self._deferred.popleft())
        if not taken:
            try:
                first = self._pending.get(block=block)
            except queue.Empty:
                return []
            if first is None:
                return None
            taken.append(first)
        while len(taken) < room:
            try:
                more = self._pending.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._pending.put(None)  # seen again after these rows are served or failed
                break
            taken.append(more)
        return [row for row in taken if not self._dropped(row)]

    def _dropped(self, row: LoopRow) -> bool:
        if row.cancel.is_set() or row.future.cancelled():
            if not row.future.done():
                row.future.cancel()
            return True
        return False

    def _admit(self, rows: list[LoopRow]) -> None:
        """Prefill ``rows`` together, sample their first tokens, and merge them into the running batch."""
        import torch

        groups: dict[bool, list[LoopRow]] = {}
        for row in rows:
            groups.setdefault(row.add_special_tokens, []).append(row)
        budget = self.max_prefill_tokens
        admitted = 0
        for special, candidates in groups.items():
            group: list[LoopRow] = []
            for row in candidates:
                length = len(self.tokenizer(row.text, add_special_tokens=special)["input_ids"])
                if 0 < length < self.max_seq_len and admitted and length > budget:
                    # chunk the prefill: the running rows wait one prefill, not all of them at once
                    self._deferred.append(row)
                    continue
                if length >= self.max_seq_len or length == 0:
                    why = (
                        "a prompt encodes to no tokens; send some text"
                        if length == 0
                        else f"the prompt has {length} tokens but model '{self.model_id}' holds "
                        f"{self.max_seq_len}; shorten the prompt or raise the deployment's max_seq_len"
                    )
                    row.future.set_exception(ConfigError(why, field="prompt"))
                else:
                    group.append(row)
                    budget -= length
                    admitted += 1
            if not group:
                continue
            inputs, lengths = self.prepare([r.text for r in group], special)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            cache = inputs.get(self._cache_kwarg)
            start = cache.get_seq_length() if cache is not None else 0
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=ids[:, start:],
                attention_mask=mask,
                position_ids=positions[:, start:],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
            logits = out.logits[:, -1, :]
            for i, (row, length) in enumerate(zip(group, lengths, strict=True)):
                row.max_new = min(row.params.max_tokens, self.max_seq_len - length)
                row.prompt_tokens = length
                row.position = length
                if row.params.temperature > 0:
                    row.generator = torch.Generator(device=self.device)
                    if row.params.seed is not None:
                        row.generator.manual_seed(int(row.params.seed))
                    else:
                        row.generator.seed()
                if row.on_chunk is not None:
                    row.text_out = StreamText(self.tokenizer, row.params.stop)
                self._accept(row, self._sample(row, logits[i]))
            keep = [i for i, row in enumerate(group) if row.finish is None]
            for row in group:
                if row.finish is not None:
                    self._deliver(row)
            if not keep:
                continue
            new_cache = output_cache(out)
            if len(keep) < len(group):
                new_cache.batch_select_indices(torch.tensor(keep, device=mask.device))
                mask = mask[keep]
            self._merge([group[i] for i in keep], new_cache, mask)

    def _merge(self, rows: Sequence[LoopRow], cache: Any, mask: Any) -> None:
        import torch

        if not self._rows:
            self._rows, self._cache, self._mask = list(rows), cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)], dim=0)
                old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)], dim=0)
            self._mask = torch.cat([_pad_mask(self._mask, width), _pad_mask(mask, width)], dim=0)
            self._rows.extend(rows)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _step(self) -> None:
        """Feed every row its last sampled token, sample the next, and let finished rows go."""
        import torch

        rows = list(self._rows)
        dropped = [i for i, r in enumerate(rows) if self._dropped(r)]
        if dropped:
            self._remove(set(dropped))
            rows = self._rows
            if not rows:
                return
        device = self._mask.device
        tokens = torch.tensor([[r.next_token] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        ones = torch.ones((len(rows), 1), dtype=self._mask.dtype, device=device)
        mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        )
        self._cache, self._mask = output_cache(out), mask
        self.steps += 1
        logits = out.logits[:, -1, :]
        done: set[int] = set()
        for i, row in enumerate(rows):
            row.position += 1
            self._accept(row, self._sample(row, logits[i]))
            if row.finish is not None:
                done.add(i)
        if done:
            self._remove(done)  # out of the batch before anyone hears of it
            for i in sorted(done):
                self._deliver(rows[i])

    def _remove(self, indices: set[int]) -> None:
        import torch

        keep = [i for i in range(len(self._rows)) if i not in indices]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        self._cache.batch_select_indices(torch.tensor(keep, device=self._mask.device))
        self._mask = self._mask[keep]
        # columns that are padding for every remaining row: cut them off
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
            self._mask = self._mask[:, first:]

    def _sample(self, row: LoopRow, logits: Any) -> int:
        import torch

        params = row.params
        if params.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(ordered, dim=-1)
            cut = cumulative - ordered > params.top_p  # keep the smallest head whose mass reaches top_p
            ordered = ordered.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _accept(self, row: LoopRow, token: int) -> None:
        """Record one sampled token: end the row at end-of-sequence, its stop strings or its length."""
        if token in self.eos_ids:
            row.finish = "stop"
            return
        row.generated.append(token)
        row.next_token = token
        if row.text_out is not None:
            piece = row.text_out.push(token)
            if piece:
                row.streamed += piece
                self._emit(row, StreamChunk(piece))
            if row.text_out.stopped:
                row.finish = "stop"
                return
        elif row.params.stop:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            if cut_at_stop(text, row.params.stop)[1]:
                row.finish = "stop"
                return
        if len(row.generated) >= row.max_new:
            row.finish = "length"

    def _emit(self, row: LoopRow, chunk: StreamChunk) -> None:
        """Hand a chunk to the row's consumer. A consumer that cannot take it (its event loop closed)
        loses its row at the next step; it must never fail the rows it shares the batch with."""
        assert row.on_chunk is not None
        try:
            row.on_chunk(chunk)
        except Exception as exc:
            log.warning(
                "decode loop of model '%s': a stream consumer failed (%s); dropping it", self.model_id, exc
            )
            row.cancel.set()

    def _deliver(self, row: LoopRow) -> None:
        finish = row.finish or "stop"
        if row.text_out is not None:
            tail = row.text_out.finish()
            if tail:
                row.streamed += tail
                self._emit(row, StreamChunk(tail))
            text = row.streamed
        else:
            text, _ = cut_at_stop(
                self.tokenizer.decode(row.generated, skip_special_tokens=True), row.params.stop
            )
        completion = Completion(text, row.prompt_tokens, len(row.generated), finish, self.model_id)
        if row.on_chunk is not None:
            self._emit(
                row,
                StreamChunk(
                    "", finish, prompt_tokens=row.prompt_tokens, completion_tokens=len(row.generated)
                ),
            )
        if not row.future.done():
            row.future.set_result(completion)


def _pad_left(tensor: Any, width: int) -> Any:
    """``[batch, heads, time, dim]`` padded with zeros in front to ``width`` time steps."""
    import torch

    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    shape = (*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


def _pad_mask(mask: Any, width: int) -> Any:
    import torch

    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
