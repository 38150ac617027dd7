"""Prometheus metrics of one gateway, in its own registry (so a process, or a test, can hold many apps).

The request path records through ``GatewayMetrics.observe_*``, which keep their labelled children in
plain dicts so a request costs a few dict lookups and increments, not a ``labels()`` call per metric.
Worker and device state (health, free memory, batch sizes) is read from ``engine.status()`` when
``/metrics`` is scraped, so it costs the hot path nothing::

    metrics = GatewayMetrics(engine.status)
    metrics.observe_request("chat", "tier_high", "cuda:0", 200, duration_s=0.21, queue_s=0.01)
    body, content_type = metrics.render()

Names follow Prometheus conventions: base units (seconds, bytes), ``_total`` counters, ``_bytes``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
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
    if not isinstance(rule, str) or not rule:
        reason = decision.reason
        if reason.startswith("tier ") and ": " in reason:
            reason = reason.split(": ", 1)[1]  # the dispatcher's "tier X: <tier reason>; worker ..."
        rule = re.split(r"[:;,(\s]", reason.strip(), maxsplit=1)[0]
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
            hist = w.get("batch_size_histogram")
            if isinstance(hist, Mapping) and hist:
                model = str(w.get("model") or w.get("deployment") or "")
                buckets, total = _cumulative(hist)
                batches.add_metric([model, worker], buckets, sum_value=total)
            devices.setdefault(device, w)
        for d in status.get("devices") or ():
            if isinstance(d, Mapping) and d.get("id"):
                devices[str(d["id"])] = d
        for device, reading in devices.items():
            if isinstance(reading.get("free_memory_bytes"), (int, float)):
                memory_free.add_metric([device], float(reading["free_memory_bytes"]))
            if isinstance(reading.get("memory_bytes"), (int, float)):
                memory_total.add_metric([device], float(reading["memory_bytes"]))
        yield from (healthy, draining, queued, in_flight, batches, memory_free, memory_total)


def _cumulative(hist: Mapping[Any, Any]) -> tuple[list[tuple[str, float]], float]:
    sizes = sorted((int(k), int(v)) for k, v in hist.items())
    buckets: list[tuple[str, float]] = []
    for bound in BATCH_SIZE_BUCKETS:
        buckets.append((str(float(bound)), float(sum(c for s, c in sizes if s <= bound))))
    buckets.append(("+Inf", float(sum(c for _, c in sizes))))
    return buckets, float(sum(s * c for s, c in sizes))


class GatewayMetrics:
    """The gateway's metrics. ``status`` (usually ``engine.status``) feeds the scrape-time gauges."""

    def __init__(self, status: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "xpuflow_requests",
            "Requests answered, by HTTP status",
            ["model", "tier", "device", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "xpuflow_request_duration_seconds",
            "Time from request received to last byte sent",
            ["model", "tier", "device"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "xpuflow_time_to_first_token_seconds",
            "Time from request received to the first streamed token",
            ["model", "tier", "device"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue = Histogram(
            "xpuflow_queue_time_seconds",
            "Time a request waited in a worker queue",
            ["model", "tier", "device"],
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter("xpuflow_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.route_decisions = Counter(
            "xpuflow_route_decisions",
            "Routing decisions, by tier and rule",
            ["model", "tier", "reason"],
            registry=r,
        )
        self.in_flight = Gauge("xpuflow_requests_in_flight", "Requests being answered now", registry=r)
        if status is not None:
            r.register(_EngineCollector(status))
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

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
        self._child(self.requests, model, tier, device, str(status)).inc()
        self._child(self.duration, model, tier, device).observe(duration_s)
        if queue_s is not None:
            self._child(self.queue, model, tier, device).observe(queue_s)
        if ttft_s is not None:
            self._child(self.ttft, model, tier, device).observe(ttft_s)
        if prompt_tokens:
            self._child(self.tokens, model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._child(self.tokens, model, "completion").inc(completion_tokens)

    def observe_decision(self, model: str, decision: RoutingDecision) -> None:
        self._child(self.route_decisions, model, decision.tier or "", reason_label(decision)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
