"""A worker's live metrics: what the scorer, the dashboard and ``/metrics`` read.

The worker records events; readers take plain numbers or ``to_dict()``. Time comes from an injected
clock, so tests drive it::

    metrics = WorkerMetrics(clock=FakeClock(), window_s=10.0)
    metrics.record_batch_start(4)
    metrics.record_batch_end(4, service_s=0.2, ok=True)
    metrics.record_request(latency_s=0.25, queue_wait_s=0.05, tokens=32)
    metrics.tokens_per_s()   # tokens finished in the last window_s, per second

Latency EMAs weight a new sample by ``ema_alpha``; tokens/s and utilisation cover a sliding window of
``window_s`` (or the time since the metrics started, when that is shorter).

The EMAs steer the router's scorer, so they must not be held hostage by unrepresentative samples.
Work that started before the first success is cold (it paid for connection set-up, lazy loading,
compilation; one such sample made a worker look 200x slower than its peers and starved it): the
first success and every sample of work started before it are left out of the EMAs (percentiles keep
them). ``forget_latency(since_s)`` drops the EMAs when they no longer describe the device (it was
down or hung and is back): samples of work started before ``since_s`` (requests stuck through the
outage) are left out, and the device is cold again until its next success.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from xpuflow.clock import Clock, SystemClock
from xpuflow.scheduling.request import Priority

__all__ = ["WorkerMetrics"]

_RECENT = 1024  # latencies kept for percentiles


def _ema(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class WorkerMetrics:
    """Counters, gauges and EMAs of one worker. Single event loop; not thread-safe."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        ema_alpha: float = 0.2,
        window_s: float = 10.0,
    ) -> None:
        if not 0 < ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._clock = clock or SystemClock()
        self.ema_alpha = ema_alpha
        self.window_s = window_s
        self.started_at_s = self._clock.monotonic()
        self.queue_depth: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self.in_flight = 0  # requests running on the device
        self.running_batches = 0
        self.ema_latency_ms: float | None = None  # queued -> answered, per request
        self.ema_queue_wait_ms: float | None = None
        self.ema_service_ms: float | None = None  # per batch
        self.latency_sampled_at_s: float | None = None  # when the newest EMA sample came in
        self._warm_since_s: float | None = None  # the first success (None: still cold)
        self._stale_before_s = float("-inf")
        self.batch_sizes: Counter[int] = Counter()
        # the histogram's totals, kept as it grows (integers: the mean is the same division)
        self._batches = 0
        self._batched_requests = 0
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.cancelled = 0
        self.expired = 0
        self.tokens_total = 0
        self._tokens: deque[tuple[float, int]] = deque()
        self._busy: deque[tuple[float, float]] = deque()  # finished busy intervals in the window
        # running sums over the deques, so reading a snapshot is O(1) at thousands of requests/s
        self._busy_sum_s = 0.0
        self._tokens_sum = 0
        self._busy_since_s: float | None = None
        self._recent_latency_s: deque[float] = deque(maxlen=_RECENT)

    # -- recording ----------------------------------------------------------------------------------

    def set_queue_depth(self, depths: dict[Priority, int]) -> None:
        self.queue_depth = {p: int(depths.get(p, 0)) for p in Priority}

    def record_rejected(self) -> None:
        self.rejected += 1

    def record_dropped(self, reason: str) -> None:
        """A queued request left without running: ``cancelled`` or ``expired`` (else counted failed)."""
        if reason == "cancelled":
            self.cancelled += 1
        elif reason == "expired":
            self.expired += 1
        else:
            self.failed += 1

    def record_batch_start(self, size: int, *, shares_with: int = 0) -> None:
        """A batch of ``size`` requests starts. ``shares_with``: requests already running that this
        batch joins in one device batch (a continuous session), counted in the batch-size histogram."""
        if self.running_batches == 0:
            self._busy_since_s = self._clock.monotonic()
        self.running_batches += 1
        self.in_flight += size
        self.batch_sizes[size + shares_with] += 1
        self._batches += 1
        self._batched_requests += size + shares_with

    def forget_latency(self, since_s: float | None = None) -> None:
        """Drop the latency EMAs; ignore samples of work started before ``since_s`` (default now)."""
        self.ema_latency_ms = self.ema_queue_wait_ms = self.ema_service_ms = None
        self.latency_sampled_at_s = None
        self._stale_before_s = self._clock.monotonic() if since_s is None else since_s
        self._warm_since_s = None

    def _counts(self, started_at_s: float | None) -> bool:
        """Whether a success's sample goes into the EMAs (see the module docstring)."""
        now = self._clock.monotonic()
        if started_at_s is not None and started_at_s < self._stale_before_s:
            return False
        if self._warm_since_s is None:
            self._warm_since_s = now
            return False
        if started_at_s is not None and started_at_s < self._warm_since_s:
            return False
        self.latency_sampled_at_s = now
        return True

    def record_batch_end(
        self, size: int, service_s: float, ok: bool, *, started_at_s: float | None = None
    ) -> None:
        """A batch ends. ``started_at_s`` (when it started) lets samples from before
        ``forget_latency`` be told apart."""
        self.running_batches = max(0, self.running_batches - 1)
        self.in_flight = max(0, self.in_flight - size)
        if ok and self._counts(started_at_s):
            self.ema_service_ms = _ema(self.ema_service_ms, service_s * 1000.0, self.ema_alpha)
        if self.running_batches == 0 and self._busy_since_s is not None:
            self._busy_until(self._clock.monotonic())
            self._prune(self._clock.monotonic())

    def record_request(
        self, latency_s: float, queue_wait_s: float, tokens: int = 0, *, started_at_s: float | None = None
    ) -> None:
        """One request answered with a result; ``started_at_s`` as in ``record_batch_end``."""
        self.completed += 1
        if self._counts(started_at_s):
            self.ema_latency_ms = _ema(self.ema_latency_ms, latency_s * 1000.0, self.ema_alpha)
            self.ema_queue_wait_ms = _ema(self.ema_queue_wait_ms, queue_wait_s * 1000.0, self.ema_alpha)
        self._recent_latency_s.append(latency_s)
        self.record_tokens(tokens)

    def record_alone(self, started_at_s: float, ended_at_s: float, tokens: int = 0) -> None:
        """A request that ran as a batch of its own (``record_batch_start(1)`` at ``started_at_s``) and
        was answered at ``ended_at_s`` with no queue wait: what ``record_request`` and then
        ``record_batch_end(1, ended_at_s - started_at_s, True)`` record, in one call and one reading of
        the clock (a worker's fast path ends every request so)."""
        latency_s = ended_at_s - started_at_s
        self.completed += 1
        running = self.running_batches - 1
        self.running_batches = running if running > 0 else 0
        in_flight = self.in_flight - 1
        self.in_flight = in_flight if in_flight > 0 else 0
        cold = self._warm_since_s is None
        counts = self._counts(started_at_s)
        alpha = self.ema_alpha
        latency_ms = latency_s * 1000.0
        if counts:
            self.ema_latency_ms = _ema(self.ema_latency_ms, latency_ms, alpha)
            self.ema_queue_wait_ms = _ema(self.ema_queue_wait_ms, 0.0, alpha)
        # record_batch_end asks again, with the same answer unless this first success has just warmed
        # the metrics up at the instant the request started
        if counts or (cold and self._counts(started_at_s)):
            self.ema_service_ms = _ema(self.ema_service_ms, latency_ms, alpha)
        self._recent_latency_s.append(latency_s)
        if tokens:
            self._add_tokens(ended_at_s, tokens)
        self._prune(ended_at_s)
        if self.running_batches == 0 and self._busy_since_s is not None:
            self._busy_until(ended_at_s)
            self._prune(ended_at_s)

    def record_tokens(self, tokens: int) -> None:
        """Tokens produced now: a stream reports them as they go, so ``tokens_per_s`` moves while a
        long generation runs instead of jumping when it ends."""
        now = self._clock.monotonic()
        if tokens:
            self._add_tokens(now, tokens)
        self._prune(now)

    def _add_tokens(self, at_s: float, tokens: int) -> None:
        self.tokens_total += tokens
        self._tokens.append((at_s, tokens))
        self._tokens_sum += tokens

    def _busy_until(self, end_s: float) -> None:
        """The busy interval open since ``_busy_since_s`` ends at ``end_s`` (no batch runs any more)."""
        assert self._busy_since_s is not None
        self._busy.append((self._busy_since_s, end_s))
        self._busy_sum_s += end_s - self._busy_since_s
        self._busy_since_s = None

    def record_failure(self, count: int = 1) -> None:
        """Requests answered with an error by the session."""
        self.failed += count

    # -- reading ------------------------------------------------------------------------------------

    def _prune(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        while self._tokens and self._tokens[0][0] < horizon:
            self._tokens_sum -= self._tokens.popleft()[1]
        while self._busy and self._busy[0][1] < horizon:
            begin, end = self._busy.popleft()
            self._busy_sum_s -= end - begin

    def _span_s(self, now_s: float) -> float:
        return max(1e-9, min(self.window_s, now_s - self.started_at_s))

    def tokens_per_s(self) -> float:
        now = self._clock.monotonic()
        self._prune(now)
        return self._tokens_sum / self._span_s(now)

    def utilization(self) -> float:
        """Share of the window during which at least one batch ran, in [0, 1]."""
        now = self._clock.monotonic()
        busy_intervals = self._busy
        if busy_intervals and busy_intervals[0][1] < now - self.window_s:
            self._prune(now)
        # ``_span_s`` and the max()/min() of the formula as conditionals (the same values): every
        # snapshot of every worker reads this
        lived = now - self.started_at_s
        span = lived if lived < self.window_s else self.window_s
        if not span > 1e-9:
            span = 1e-9
        start = now - span
        busy = self._busy_sum_s
        if busy_intervals:  # only the oldest interval can reach back before the window
            begin, end = busy_intervals[0]
            cut = (start if start < end else end) - begin
            if cut > 0.0:
                busy -= cut
        if not busy > 0.0:
            busy = 0.0
        since = self._busy_since_s
        if since is not None:
            busy += now - (start if start > since else since)
        share = busy / span
        return share if share < 1.0 else 1.0

    def busy_state(self) -> tuple[float, float, float, float | None, float | None, float | None]:
        """What ``utilization`` reads, for a reader that evaluates it at later times by itself
        (``policy.snapshot_table``): ``(started_at_s, window_s, busy_sum_s, begin, end, busy_since_s)``,
        ``begin``/``end`` the oldest finished busy interval in the window (None: none). It holds until
        the next batch starts or ends, or until ``end`` leaves the window (then read it again)."""
        begin, end = self._busy[0] if self._busy else (None, None)
        return (self.started_at_s, self.window_s, self._busy_sum_s, begin, end, self._busy_since_s)

    @property
    def queued(self) -> int:
        return sum(self.queue_depth.values())

    def mean_batch_size(self) -> float | None:
        """Requests per batch over every batch so far (None before the first)."""
        batches = self._batches
        return self._batched_requests / batches if batches else None

    def latency_percentiles_ms(self) -> dict[str, float | None]:
        ordered = sorted(self._recent_latency_s)
        return {
            f"p{int(q * 100)}": (None if (v := _percentile(ordered, q)) is None else v * 1000.0)
            for q in (0.5, 0.9, 0.99)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue_depth": {p.name.lower(): n for p, n in self.queue_depth.items()},
            "queued": self.queued,
            "in_flight": self.in_flight,
            "running_batches": self.running_batches,
            "ema_latency_ms": self.ema_latency_ms,
            "ema_queue_wait_ms": self.ema_queue_wait_ms,
            "ema_service_ms": self.ema_service_ms,
            "latency_sampled_at_s": self.latency_sampled_at_s,
            "latency_ms": self.latency_percentiles_ms(),
            "tokens_per_s": self.tokens_per_s(),
            "tokens_total": self.tokens_total,
            "utilization": self.utilization(),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_batch_size": self.mean_batch_size(),
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "expired": self.expired,
            "window_s": self.window_s,
        }
