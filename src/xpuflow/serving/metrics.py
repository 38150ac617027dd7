"""Prometheus metrics of one gateway, in its own registry (so a process, or a test, can hold many apps).

The request path records through ``GatewayMetrics.observe_*`` into plain dicts and lists (a request
costs a few dict lookups and increments, no locks), turned into Prometheus families when ``/metrics`` is
scraped. Worker and device state (health, free memory, batch sizes) is read from ``engine.status()`` when
``/metrics`` is scraped, so it costs the hot path nothing::

    metrics = GatewayMetrics(engine.status)
    metrics.observe_request("chat", "tier_high", "cuda:0", 200, duration_s=0.21, queue_s=0.01)
    body, content_type = metrics.render()

Names follow Prometheus conventions: base units (seconds, bytes), ``_total`` counters, ``_bytes``.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from xpuflow.types import RoutingDecision

__all__ = ["BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS_S", "GatewayMetrics", "reason_label"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

_REASON_RE = re.compile(r"[^a-z0-9_-]+")
_MAX_REASON_CHARS = 40


def reason_label(decision: RoutingDecision) -> str:
    """A low-cardinality name for why a route was chosen: ``details["rule"]`` when the router sets it,
    else the first word of ``reason`` (routers write "rule: explanation"), so the label set stays small."""
    rule = decision.details.get("rule")
    if isinstance(rule, str) and rule:
        return _label(rule)
    reason = decision.reason
    if reason.startswith("tier ") and ": " in reason:
        reason = reason.split(": ", 1)[1]  # the dispatcher's "tier X: <tier reason>; worker ..."
    return _label(re.split(r"[:;,(\s]", reason.strip(), maxsplit=1)[0])


@lru_cache(maxsize=1024)
def _label(rule: str) -> str:
    label = _REASON_RE.sub("_", rule.strip().lower()).strip("_")
    return label[:_MAX_REASON_CHARS] or "unknown"


class _EngineCollector(Collector):
    """Gauges and batch-size histograms read from ``engine.status()`` at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []  # no fixed series: workers come and go with reloads

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._status()
        except Exception:  # a broken status must not take /metrics down with it
            log.warning("engine.status() failed during a /metrics scrape", exc_info=True)
            return
        workers = [w for w in status.get("workers") or () if isinstance(w, Mapping)]
        healthy = GaugeMetricFamily(
            "xpuflow_worker_healthy",
            "1 when the worker takes requests, 0 when unhealthy",
            labels=["worker", "device"],
        )
        draining = GaugeMetricFamily(
            "xpuflow_worker_draining",
            "1 while the worker is drained by an operator",
            labels=["worker", "device"],
        )
        queued = GaugeMetricFamily(
            "xpuflow_worker_queue_depth", "Requests queued on the worker", labels=["worker"]
        )
        in_flight = GaugeMetricFamily(
            "xpuflow_worker_in_flight", "Requests running on the worker's device", labels=["worker"]
        )
        batches = HistogramMetricFamily(
            "xpuflow_batch_size", "Requests per batch run on a device", labels=["model", "worker"]
        )
        memory_free = GaugeMetricFamily(
            "xpuflow_device_memory_free_bytes", "Free device memory (VRAM on GPUs)", labels=["device"]
        )
        memory_total = GaugeMetricFamily(
            "xpuflow_device_memory_total_bytes", "Total device memory", labels=["device"]
        )
        devices: dict[str, Mapping[str, Any]] = {}
        for w in workers:
            worker, device = str(w.get("worker_id", "")), str(w.get("device", ""))
            healthy.add_metric([worker, device], 1.0 if w.get("healthy", True) else 0.0)
            draining.add_metric([worker, device], 1.0 if w.get("draining") else 0.0)
            queued.add_metric([worker], float(w.get("queue_depth") or 0))
            in_flight.add_metric([worker], float(w.get("in_flight") or 0))
            sizes = _batch_sizes(w.get("batch_sizes"))
            if sizes:
                model = str(w.get("model") or w.get("deployment") or "")
                buckets, size_sum = _cumulative(sizes)
                batches.add_metric([model, worker], buckets, sum_value=size_sum)
            if device not in devices or _memory(devices[device], "free_memory_bytes") is None:
                devices[device] = w
        for d in status.get("devices") or ():
            if isinstance(d, Mapping) and d.get("id"):
                devices[str(d["id"])] = d
        for device, reading in devices.items():
            free, total = _memory(reading, "free_memory_bytes"), _memory(reading, "total_memory_bytes")
            if free is not None:
                memory_free.add_metric([device], free)
            if total is not None:
                memory_total.add_metric([device], total)
        yield from (healthy, draining, queued, in_flight, batches, memory_free, memory_total)
        yield from _qos_families(status.get("qos"))
        yield from _residency_families(status.get("residency"))


def _qos_families(contexts: Any) -> Iterator[Metric]:
    """Per-context budgets, usage and admission outcomes from ``status()["qos"]``; junk rows are skipped."""
    if not isinstance(contexts, (list, tuple)) or not contexts:
        return
    labels = ["context", "device", "qos"]
    used = GaugeMetricFamily(
        "xpuflow_qos_context_used_bytes", "Memory the QoS context's running requests hold", labels=labels
    )
    limit = GaugeMetricFamily(
        "xpuflow_qos_context_max_bytes", "The QoS context's memory budget", labels=labels
    )
    outcomes = CounterMetricFamily(
        "xpuflow_qos_admissions",
        "QoS admissions by outcome: admitted, rejected (429) or shed for a higher class",
        labels=["context", "outcome"],
    )
    for row in contexts:
        if not isinstance(row, Mapping) or not row.get("name"):
            continue
        key = [str(row["name"]), str(row.get("device", "")), str(row.get("qos", ""))]
        for family, field in ((used, "used_bytes"), (limit, "max_bytes")):
            value = _memory(row, field)
            if value is not None:
                family.add_metric(key, value)
        for outcome in ("admitted", "rejected", "shed"):
            count = _memory(row, outcome)
            outcomes.add_metric([key[0], outcome], count or 0.0)
    yield from (used, limit, outcomes)


def _residency_families(devices: Any) -> Iterator[Metric]:
    """Model residency from ``status()["residency"]``: per device the budget, what resident models hold
    and what the measurement cannot explain; per model whether it is loaded, its loads and evictions."""
    if not isinstance(devices, (list, tuple)) or not devices:
        return
    budget = GaugeMetricFamily(
        "xpuflow_residency_budget_bytes",
        "Memory that loaded models may hold on the device",
        labels=["device"],
    )
    held = GaugeMetricFamily(
        "xpuflow_residency_resident_bytes", "Memory the device's loaded models hold", labels=["device"]
    )
    unaccounted = GaugeMetricFamily(
        "xpuflow_residency_unaccounted_bytes",
        "Memory measured in use on the device that no loaded model explains (not given back on unload)",
        labels=["device"],
    )
    resident = GaugeMetricFamily(
        "xpuflow_model_resident", "1 while the worker's model is loaded", labels=["worker", "device"]
    )
    loads = CounterMetricFamily("xpuflow_model_loads", "Loads of the worker's model", labels=["worker"])
    evictions = CounterMetricFamily(
        "xpuflow_model_unloads",
        "Unloads of the worker's model (evicted, idle or by an operator)",
        labels=["worker"],
    )
    for row in devices:
        if not isinstance(row, Mapping) or not row.get("device"):
            continue
        device = str(row["device"])
        for family, field in (
            (budget, "budget_bytes"),
            (held, "resident_bytes"),
            (unaccounted, "unaccounted_bytes"),
        ):
            value = _memory(row, field)
            if value is not None:
                family.add_metric([device], value)
        for model in row.get("models") or ():
            if not isinstance(model, Mapping) or not model.get("name"):
                continue
            name = str(model["name"])
            resident.add_metric([name, device], 1.0 if model.get("resident") else 0.0)
            loads.add_metric([name], _memory(model, "loads") or 0.0)
            evictions.add_metric([name], _memory(model, "evictions") or 0.0)
    yield from (budget, held, unaccounted, resident, loads, evictions)


def _memory(reading: Mapping[str, Any], key: str) -> float | None:
    value = reading.get(key)
    if value is None and key == "total_memory_bytes":
        value = reading.get("memory_bytes")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _batch_sizes(value: Any) -> dict[int, int]:
    """``{size: batches}`` from a mapping ``{"4": 31}`` or a list of recent sizes; junk is skipped."""
    counts: dict[int, int] = {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = [(size, 1) for size in value]
    else:
        return counts
    for size, count in items:
        try:
            s, c = int(float(size)), int(count)
        except (TypeError, ValueError, OverflowError):
            continue
        if s > 0 and c > 0:
            counts[s] = counts.get(s, 0) + c
    return counts


def _cumulative(counts: Mapping[int, int]) -> tuple[list[tuple[str, float]], float]:
    sizes = sorted(counts.items())
    buckets: list[tuple[str, float]] = []
    for bound in BATCH_SIZE_BUCKETS:
        buckets.append((str(float(bound)), float(sum(c for s, c in sizes if s <= bound))))
    buckets.append(("+Inf", float(sum(c for _, c in sizes))))
    return buckets, float(sum(s * c for s, c in sizes))


class _Histogram:
    """A histogram without locks: the gateway records from its one event loop thread."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # "le": a value on a bound counts in it
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class _Series:
    """What is recorded for one (model, tier, device)."""

    __slots__ = ("duration", "queue", "statuses", "ttft")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.duration = _Histogram(LATENCY_BUCKETS_S)
        self.ttft = _Histogram(LATENCY_BUCKETS_S)
        self.queue = _Histogram(QUEUE_BUCKETS_S)


class _RequestCollector(Collector):
    """Exports what ``GatewayMetrics`` recorded, as Prometheus families, at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        labels = ["model", "tier", "device"]
        requests = CounterMetricFamily(
            "xpuflow_requests", "Requests answered, by HTTP status", labels=[*labels, "status"]
        )
        families = {
            "duration": HistogramMetricFamily(
                "xpuflow_request_duration_seconds",
                "Time from request received to last byte sent",
                labels=labels,
            ),
            "ttft": HistogramMetricFamily(
                "xpuflow_time_to_first_token_seconds",
                "Time from request received to the first streamed token",
                labels=labels,
            ),
            "queue": HistogramMetricFamily(
                "xpuflow_queue_time_seconds", "Time a request waited in a worker queue", labels=labels
            ),
        }
        for key, series in list(m._series.items()):
            for status, count in sorted(series.statuses.items()):
                requests.add_metric([*key, str(status)], float(count))
            for name, family in families.items():
                hist: _Histogram = getattr(series, name)
                if any(hist.counts):
                    family.add_metric(list(key), hist.buckets(), sum_value=hist.total)
        tokens = CounterMetricFamily("xpuflow_tokens", "Tokens processed", labels=["model", "kind"])
        for (model, kind), count in sorted(m._tokens.items()):
            tokens.add_metric([model, kind], float(count))
        decisions = CounterMetricFamily(
            "xpuflow_route_decisions",
            "Routing decisions, by tier and rule",
            labels=["model", "tier", "reason"],
        )
        for key, count in sorted(m._decisions.items()):
            decisions.add_metric(list(key), float(count))
        in_flight = GaugeMetricFamily("xpuflow_requests_in_flight", "Requests being answered now")
        in_flight.add_metric([], float(m.in_flight))
        keys = CounterMetricFamily(
            "xpuflow_requests_by_key", "Requests by the name of the API key they carried", labels=["key"]
        )
        for name, count in sorted(m._keys.items()):
            keys.add_metric([name], float(count))
        yield from (requests, *families.values(), tokens, decisions, in_flight, keys)


class GatewayMetrics:
    """The gateway's metrics. ``status`` (usually ``engine.status``) feeds the scrape-time gauges.

    Recording is plain dict and list arithmetic, without locks: call it from the event loop thread
    that serves the requests (``render()`` too, as the ``/metrics`` handler does)."""

    def __init__(self, status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RequestCollector(self))
        if status is not None:
            self.registry.register(_EngineCollector(status))
        self.in_flight = 0
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._decisions: dict[tuple[str, str, str], int] = {}
        self._keys: dict[str, int] = {}  # API key name (never the secret) -> requests

    def observe_key(self, name: str) -> None:
        """A request authenticated with the key named ``name``."""
        self._keys[name] = self._keys.get(name, 0) + 1

    def observe_request(
        self,
        model: str,
        tier: str,
        device: str,
        status: int,
        duration_s: float,
        *,
        queue_s: float | None = None,
        ttft_s: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """One answered request (any status). Tier and device are "" when routing never happened."""
        key = (model, tier, device)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.statuses[status] = series.statuses.get(status, 0) + 1
        series.duration.observe(duration_s)
        if queue_s is not None:
            series.queue.observe(queue_s)
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
        tokens = self._tokens
        if prompt_tokens:
            tokens[model, "prompt"] = tokens.get((model, "prompt"), 0) + prompt_tokens
        if completion_tokens:
            tokens[model, "completion"] = tokens.get((model, "completion"), 0) + completion_tokens

    def observe_decision(self, model: str, decision: RoutingDecision) -> None:
        key = (model, decision.tier or "", reason_label(decision))
        self._decisions[key] = self._decisions.get(key, 0) + 1

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
