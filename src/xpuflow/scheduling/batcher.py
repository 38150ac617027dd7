"""The micro-batcher: when to send the next batch to the device, and how big.

A state machine with explicit inputs and outputs and an injected clock (time is passed in as
``now_s``). The worker tells it about arrivals, dispatches and completions, and asks ``decide``::

    batcher = make_batcher(BatchPolicy.ADAPTIVE, BatcherConfig(max_batch_size=16))
    batcher.on_arrival(now_s)
    decision = batcher.decide(now_s, queued=3, oldest_enqueued_s=t0)
    # Decision(action=DISPATCH, size=3, ...) or Decision(action=WAIT, until_s=..., ...)
    batcher.on_dispatch(now_s, 3)
    ...
    batcher.on_complete(now_s, 3, service_s=0.41, units=32)

Inputs: the number of queued requests that may share the next batch, when the oldest of them was
queued, how many requests are outstanding (queued or running), the measured service time per batch
size (``ServiceTimeTable``, an EMA per size), the arrival rate (``ArrivalRate``, from the median gap of
the last arrivals) and how many batches are running. Output: ``IDLE`` (nothing queued), ``BUSY`` (the
device runs ``max_concurrent_batches`` already; requests accumulate and the next batch takes up to
``max_batch_size`` of them: continuous batching), ``DISPATCH n`` or ``WAIT until t``.

The adaptive policy, when the device is free and ``n`` requests (fewer than the cap) are queued:
dispatch now, unless waiting ``w`` for the ``k = rate * w`` requests expected meanwhile raises the
device's throughput, counting the time it idles while waiting. With ``S(b)`` the predicted service
time of a batch of ``b``, it waits for the ``k`` with the best

    (n + k) / (w + S(n + k))    against    n / S(n)    (requests per device-second)

if that is at least ``MIN_GAIN`` (1%) better, and looks again at every arrival and after at most two
expected inter-arrival gaps. For a linear ``S(b) = fixed + per_request * b`` this is simply
``w < (k / n) * fixed``: waiting pays while the idle time is less than the share of a batch's fixed
cost that the newcomers save. Three bounds keep it honest:

- ``k`` never exceeds the cap, nor the recent peak of outstanding requests minus those outstanding
  now: clients that wait for their answers come back, so after a batch of 16 answers 15 more are
  worth a moment's wait, while a lone client has nobody to wait for and never waits;
- the batcher never adds more than ``min(max_wait_s, max_wait_fraction * S(n))`` of its own delay
  to a request (counted from when both the device was free and the request was queued);
- with no measured service time, no arrival rate, or arrivals all at one instant, it dispatches; with
  one batch size measured it assumes no batching gain, so it waits only for a gain it has measured.

Why throughput and not the latency of the requests at hand: with clients that wait for their
answers (chat users, agents, benchmarks) latency is clients / throughput, so throughput is latency;
and a batch split in two costs the device a second fixed cost that every later request waits for.
The budget caps what a wait can cost the requests at hand. At low load the next arrival is further
away than the budget, so latency stays the unbatched latency; with many clients the window opens
just as far as batches fill; under overload the device is never idle and batches form while it is
busy. Greedy dispatch (no waiting) falls into a trap with clients that send again after each answer:
whoever comes back first leaves alone, the rest wait a whole batch, and batches of 1 and n-1
alternate for ever; the wait above merges them. Service times are kept per work unit (``units``:
e.g. ``max_tokens`` of a generation), so requests of different lengths share one table.

Policies, chosen by ``BatchPolicy``: ``ADAPTIVE`` (above), ``GREEDY`` (send what is queued as soon as
the device is free: continuous batching without waiting), ``FIXED_WINDOW`` (Triton-style: wait up to
``max_wait_s`` after the oldest request for a full batch).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

#: Smallest relative throughput gain worth a wait: below it, noise in the measurements decides.
MIN_GAIN = 0.01

__all__ = [
    "Action",
    "ArrivalRate",
    "BatchPolicy",
    "Batcher",
    "BatcherConfig",
    "Decision",
    "ServiceTimeTable",
    "make_batcher",
]


class BatchPolicy(str, Enum):
    ADAPTIVE = "adaptive"
    GREEDY = "greedy"
    FIXED_WINDOW = "fixed_window"


class Action(str, Enum):
    IDLE = "idle"  # nothing queued: wait for an arrival
    BUSY = "busy"  # every batch slot is running: wait for a completion
    WAIT = "wait"  # wait for more requests until ``until_s`` (or an arrival)
    DISPATCH = "dispatch"  # send ``size`` requests now


@dataclass(frozen=True)
class Decision:
    action: Action
    size: int = 0
    until_s: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class BatcherConfig:
    """Settings of the micro-batcher.

    ``max_batch_size``: requests per batch at most. ``max_wait_s`` and ``max_wait_fraction``: the
    adaptive wait never adds more than ``min(max_wait_s, max_wait_fraction * S(n))`` to a request,
    with ``S(n)`` the predicted service time of the batch it would join now (``FIXED_WINDOW`` waits
    ``max_wait_s``). ``max_concurrent_batches``: batches running at once (1 for a local device; more
    for a remote server that batches itself). ``rate_window``: arrivals the rate estimate spans.
    ``peak_history``: batch completions over which the peak number of outstanding requests is kept
    (it bounds how many arrivals a wait may expect). ``ema_alpha``: weight of a new service-time
    measurement.
    """

    max_batch_size: int = 8
    max_wait_s: float = 0.05
    max_wait_fraction: float = 0.1
    max_concurrent_batches: int = 1
    rate_window: int = 32
    peak_history: int = 3
    ema_alpha: float = 0.3

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_s < 0 or self.max_wait_fraction < 0:
            raise ValueError("max_wait_s and max_wait_fraction must be >= 0")
        if self.max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {self.max_concurrent_batches}")
        if self.rate_window < 2:
            raise ValueError(f"rate_window must be >= 2, got {self.rate_window}")
        if self.peak_history < 1:
            raise ValueError(f"peak_history must be >= 1, got {self.peak_history}")
        if not 0 < self.ema_alpha <= 1:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")


class ServiceTimeTable:
    """Measured service seconds per work unit, as an EMA per batch size, and the line through them.

    ``predict`` uses the weighted least-squares line ``S(b) = fixed + per_request * b`` over the
    measured sizes (weights: samples, capped at 8), with both terms kept >= 0: one line, not the
    points, because single measurements on a shared machine are noisy and the decision compares
    sizes next to each other. With one size measured it assumes no batching gain at all
    (``fixed = 0``), so the batcher waits only for a benefit it has measured.
    """

    def __init__(self, ema_alpha: float = 0.3) -> None:
        self.ema_alpha = ema_alpha
        self._per_unit_s: dict[int, float] = {}
        self._samples: dict[int, int] = {}
        self._line: tuple[float, float] | None = None

    def observe(self, batch_size: int, service_s: float, units: float = 1.0) -> None:
        if batch_size < 1 or service_s < 0 or units <= 0:
            return
        value = service_s / units
        old = self._per_unit_s.get(batch_size)
        self._per_unit_s[batch_size] = value if old is None else old + self.ema_alpha * (value - old)
        self._samples[batch_size] = self._samples.get(batch_size, 0) + 1
        self._line = self._fit()

    def _fit(self) -> tuple[float, float]:
        sizes = sorted(self._per_unit_s)
        ys = [self._per_unit_s[b] for b in sizes]
        if len(sizes) == 1:
            return 0.0, ys[0] / sizes[0]
        ws = [float(min(self._samples[b], 8)) for b in sizes]
        total = sum(ws)
        mean_x = sum(w * x for w, x in zip(ws, sizes, strict=True)) / total
        mean_y = sum(w * y for w, y in zip(ws, ys, strict=True)) / total
        sxx = sum(w * (x - mean_x) ** 2 for w, x in zip(ws, sizes, strict=True))
        sxy = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(ws, sizes, ys, strict=True))
        slope = sxy / sxx
        fixed = mean_y - slope * mean_x
        if slope < 0:  # bigger batches measured faster: noise; call it flat
            return mean_y, 0.0
        if fixed < 0:  # no fixed cost to share: the line through the origin
            sxy0 = sum(w * x * y for w, x, y in zip(ws, sizes, ys, strict=True))
            sxx0 = sum(w * x * x for w, x in zip(ws, sizes, strict=True))
            return 0.0, sxy0 / sxx0
        return fixed, slope

    @property
    def line(self) -> tuple[float, float] | None:
        """(fixed, per_request) seconds per work unit, or None before any measurement."""
        return self._line

    def predict(self, batch_size: int, units: float = 1.0) -> float | None:
        """Predicted seconds for a batch of ``batch_size`` requests of ``units`` each; None before any
        measurement."""
        if self._line is None or batch_size < 1:
            return None
        fixed, per_request = self._line
        return (fixed + per_request * batch_size) * units

    def to_dict(self) -> dict[str, Any]:
        fixed, per_request = self._line or (0.0, 0.0)
        return {
            "line_per_unit_ms": {"fixed": fixed * 1000.0, "per_request": per_request * 1000.0},
            "measured": {
                str(b): {"per_unit_ms": self._per_unit_s[b] * 1000.0, "samples": self._samples[b]}
                for b in sorted(self._per_unit_s)
            },
        }


class ArrivalRate:
    """Arrivals per second, from the median gap between the last ``window`` arrivals.

    The median, not the mean: clients that wait for their answers arrive in bursts (many arrivals a
    moment apart, then a pause as long as a batch), and within a burst the next arrival is a gap of
    the burst away, not the average gap. For Poisson arrivals ``ln 2 / median gap`` estimates the rate
    without bias. The estimate is capped by ``1 / silence``, the time since the last arrival (or since
    ``active_since_s``, when later; the batcher passes the last completion, because answers are what
    such clients send again after), so a burst that has ended stops promising arrivals. The cap only
    lowers the estimate: it errs towards dispatching, never towards waiting.
    """

    def __init__(self, window: int = 32) -> None:
        self._times: deque[float] = deque(maxlen=window)
        # the gaps between consecutive times, in arrival order and sorted, kept as times come and go
        self._gaps: deque[float] = deque()
        self._sorted_gaps: list[float] = []

    def observe(self, now_s: float) -> None:
        times = self._times
        if times and times.maxlen != 1:
            if len(times) == times.maxlen:  # the oldest time leaves, and the gap after it
                gaps = self._sorted_gaps
                del gaps[bisect.bisect_left(gaps, self._gaps.popleft())]
            gap = now_s - times[-1]
            self._gaps.append(gap)
            bisect.insort(self._sorted_gaps, gap)
        times.append(now_s)

    def rate_per_s(self, now_s: float, active_since_s: float = -math.inf) -> float:
        times = self._times
        if len(times) < 2:
            return 0.0
        gaps = self._sorted_gaps  # sorted(b - a for a, b in pairs of consecutive times)
        median = (
            gaps[len(gaps) // 2] if len(gaps) % 2 else (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
        )
        rate = math.inf if median <= 0 else math.log(2) / median
        silence = now_s - max(times[-1], active_since_s)
        return min(rate, 1.0 / silence) if silence > 0 else rate


class Batcher:
    """The batching state machine; see the module docstring for the policies."""

    def __init__(
        self, config: BatcherConfig | None = None, policy: BatchPolicy = BatchPolicy.ADAPTIVE
    ) -> None:
        self.config = config or BatcherConfig()
        self.policy = BatchPolicy(policy)
        self.service_times = ServiceTimeTable(self.config.ema_alpha)
        self.arrivals = ArrivalRate(self.config.rate_window)
        self.running_batches = 0
        self._device_free_since_s = -math.inf
        self._last_completion_s = -math.inf
        self._peaks: deque[int] = deque(maxlen=self.config.peak_history)
        self._cycle_peak = 0

    # -- inputs -------------------------------------------------------------------------------------

    def on_arrival(self, now_s: float) -> None:
        self.arrivals.observe(now_s)

    def on_dispatch(self, now_s: float, size: int) -> None:
        self.running_batches += 1

    def on_complete(self, now_s: float, size: int, service_s: float | None, units: float = 1.0) -> None:
        """A batch finished; ``service_s`` None when it failed (failures teach nothing about speed)."""
        self.running_batches = max(0, self.running_batches - 1)
        self._last_completion_s = now_s
        self._peaks.append(self._cycle_peak)
        self._cycle_peak = 0
        if self.running_batches < self.config.max_concurrent_batches:
            self._device_free_since_s = now_s
        if service_s is not None:
            self.service_times.observe(size, service_s, units)

    # -- output -------------------------------------------------------------------------------------

    def decide(
        self,
        now_s: float,
        queued: int,
        oldest_enqueued_s: float | None,
        *,
        cap: int | None = None,
        units: float = 1.0,
        draining: bool = False,
        outstanding: int | None = None,
    ) -> Decision:
        """What to do with the next group of ``queued`` compatible requests.

        ``cap`` lowers the batch limit for this group (e.g. 1 for a streamed request); ``units`` is the
        work per request of the group; ``draining`` sends everything without waiting; ``outstanding``
        is every request queued or running on the worker now (default: ``queued``).
        """
        now_outstanding = queued if outstanding is None else outstanding
        self._cycle_peak = max(self._cycle_peak, now_outstanding)
        if queued <= 0:
            return Decision(Action.IDLE, reason="queue empty")
        if self.running_batches >= self.config.max_concurrent_batches:
            return Decision(Action.BUSY, reason="device busy; requests accumulate for the next batch")
        limit = self.config.max_batch_size if cap is None else max(1, min(cap, self.config.max_batch_size))
        if queued >= limit:
            return Decision(Action.DISPATCH, limit, reason="full batch")
        if draining:
            return Decision(Action.DISPATCH, queued, reason="draining")
        if self.policy is BatchPolicy.GREEDY:
            return Decision(Action.DISPATCH, queued, reason="greedy")
        oldest = now_s if oldest_enqueued_s is None else oldest_enqueued_s
        if self.policy is BatchPolicy.FIXED_WINDOW:
            deadline = oldest + self.config.max_wait_s
            if now_s >= deadline:
                return Decision(Action.DISPATCH, queued, reason="wait window over")
            return Decision(Action.WAIT, until_s=deadline, reason="fixed window")
        return self._adaptive(now_s, queued, oldest, limit, units, now_outstanding)

    def expected_arrivals(self, outstanding: int) -> int | None:
        """How many more requests may come soon: the recent peak of outstanding requests minus those
        outstanding now (clients that wait for their answers come back; a lone client has nobody to
        wait for). None before the first completion."""
        if not self._peaks:
            return None
        return max(*self._peaks, self._cycle_peak) - outstanding

    def _adaptive(
        self, now_s: float, n: int, oldest_s: float, limit: int, units: float, outstanding: int
    ) -> Decision:
        s_now = self.service_times.predict(n, units)
        if s_now is None:
            return Decision(Action.DISPATCH, n, reason="no service time measured yet")
        rate = self.arrivals.rate_per_s(now_s, self._last_completion_s)
        if rate <= 0:
            return Decision(Action.DISPATCH, n, reason="no arrival rate yet")
        if math.isinf(rate):  # every recent arrival at one instant: a burst that has fully arrived
            return Decision(Action.DISPATCH, n, reason="burst complete")
        room = limit - n
        expected = self.expected_arrivals(outstanding)
        if expected is not None:
            room = min(room, expected)
        if room <= 0:
            return Decision(Action.DISPATCH, n, reason="no more arrivals expected")
        # Only the batcher's own delay counts against the budget: time spent waiting for a busy
        # device is not made worse by forming the batch then.
        started = max(oldest_s, self._device_free_since_s)
        budget = min(self.config.max_wait_s, self.config.max_wait_fraction * s_now)
        remaining = started + budget - now_s
        if remaining <= 0:
            return Decision(Action.DISPATCH, n, reason="wait budget spent")
        # Throughput of the batch sent now against waiting ``w`` for ``k`` more (the device idles
        # meanwhile): requests per device-second. The best k wins if it beats now by MIN_GAIN.
        now_rate = n / s_now
        best_rate, best_wait, best_k = now_rate * (1.0 + MIN_GAIN), 0.0, 0
        for k in range(1, room + 1):
            wait = k / rate
            if wait > remaining:
                break
            s_later = self.service_times.predict(n + k, units)
            assert s_later is not None
            later_rate = (n + k) / (wait + s_later)
            if later_rate > best_rate:
                best_rate, best_wait, best_k = later_rate, wait, k
        # Look again after at most two expected inter-arrival gaps: if the arrivals do not come, the
        # rate estimate falls and the next decision dispatches.
        until_s = now_s + min(best_wait, 2.0 / rate, remaining)
        if best_k == 0 or until_s <= now_s:
            return Decision(Action.DISPATCH, n, reason="waiting is not predicted to raise throughput")
        return Decision(
            Action.WAIT,
            until_s=until_s,
            reason=f"expect {best_k} more within {best_wait * 1000:.1f} ms "
            f"(+{(best_rate / now_rate - 1.0) * 100:.0f}% throughput)",
        )

    def wait_gain(self, n: int, k: int, wait_s: float, units: float = 1.0) -> float:
        """Relative throughput gained by waiting ``wait_s`` (device idle) for ``k`` more requests
        before sending ``n`` queued ones: ``((n+k) / (wait + S(n+k))) / (n / S(n)) - 1``; negative when
        waiting loses throughput."""
        s_n = self.service_times.predict(n, units)
        s_nk = self.service_times.predict(n + k, units)
        if s_n is None or s_nk is None or s_n <= 0:
            return -math.inf
        return ((n + k) / (wait_s + s_nk)) / (n / s_n) - 1.0

    def to_dict(self, now_s: float) -> dict[str, Any]:
        return {
            "policy": self.policy.value,
            "max_batch_size": self.config.max_batch_size,
            "running_batches": self.running_batches,
            "arrival_rate_per_s": self.arrivals.rate_per_s(now_s, self._last_completion_s),
            "recent_peak_outstanding": max(self._peaks, default=0),
            "service_times": self.service_times.to_dict(),
        }


def make_batcher(
    policy: BatchPolicy | str = BatchPolicy.ADAPTIVE, config: BatcherConfig | None = None
) -> Batcher:
    """The batcher for ``policy`` (``adaptive``, ``greedy`` or ``fixed_window``)."""
    return Batcher(config, BatchPolicy(policy))
