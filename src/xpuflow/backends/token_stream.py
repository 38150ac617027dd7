"""Streaming text out of a token generator: incremental detokenising, stop strings held back until
they can be ruled out, and the streamer/stopping hooks ``transformers.generate`` calls.

Example::

    stops = StopFilter(["\n\n"])
    decoder = IncrementalDecoder(tokenizer)
    for token_id in token_ids:
        text, stopped = stops.feed(decoder.push(token_id))
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "IncrementalDecoder",
    "StopFilter",
    "StreamText",
    "TokenStreamer",
    "cancel_criteria",
    "cut_at_stop",
]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopFilter:
    """Streams text while holding back any tail that could begin a stop string, so a stop string split
    across tokens is never half-sent."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to send now, and whether a stop string ended the generation."""
        self._pending += text
        cut, hit = cut_at_stop(self._pending, self._stops)
        if hit:
            self._pending = ""
            return cut, True
        keep = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:length]):
                    keep = length
                    break
        ready = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(ready) :]
        return ready, False

    def flush(self) -> str:
        ready, self._pending = self._pending, ""
        return ready


class IncrementalDecoder:
    """Turns a growing token list into text deltas. Decoding a window that starts a few tokens back
    keeps word-boundary spaces right, and a delta ending in U+FFFD (a UTF-8 character cut between
    tokens) waits for the next token."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _delta(self) -> tuple[str, str]:
        prefix = self._tokenizer.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        full = self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=True)
        return prefix, full

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix, full = self._delta()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix, full = self._delta()
        self._prefix = self._read = len(self._ids)
        return full[len(prefix) :]


class StreamText:
    """Token ids in, text safe to send out: an ``IncrementalDecoder`` feeding a ``StopFilter``.
    ``stopped`` turns true when a stop string ended the text; ``finish()`` gives the held-back tail."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopFilter(stops)
        self.stopped = False

    def push(self, token_id: int) -> str:
        piece, self.stopped = self._stops.feed(self._decoder.push(token_id))
        return piece

    def finish(self) -> str:
        """The rest of the text once no token follows (nothing after a stop string)."""
        if self.stopped:
            return ""
        tail, self.stopped = self._stops.feed(self._decoder.flush())
        return tail if self.stopped else tail + self._stops.flush()


class TokenStreamer:
    """transformers' streamer protocol (``put``/``end``): queues each step's new token ids."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.queue.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)


def cancel_criteria(event: threading.Event) -> Any:
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return Cancelled()
