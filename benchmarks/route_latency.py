"""Routing latency for 1 KB prompts (complexity score, then the whole rule chain) and the VRAM poller's cost.

Targets (issue "Query routing"): route p50 <= 30 us and p99 <= 150 us, where a route is the score plus
every rule (override, complexity, VRAM headroom, latency SLA, default). Prompts are the RouteLLM
calibration prompts (../shared/data/routing/) each padded with the following prompts, then cut to
1024 bytes. The router runs as in production: its VRAM monitor thread polls every 15 ms meanwhile.

Each path runs in its own pass over the distinct prompts (passes rotate from round to round), so no
call finds its prompt warm from the call before. The scorer's pure-Python path (``accelerated=False``,
no C word lookups) is measured in the same run.

Also measured: the chain alone (a constant score: the full chain for a hard prompt, the short one for an
easy prompt), ``route_decision`` (the explained path), a baseline (``str.lower`` on the same prompt, so
the numbers can be compared across machines as ratios), and the VRAM monitor's CPU cost at 15 ms polling
with the fake source, the fake NVML behind the real NVML code path, and the real NVML where it exists.

    python benchmarks/route_latency.py [--prompts 2000] [--rounds 5] [--monitor-seconds 3]

Writes benchmarks/results/route_latency.json.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from xpuflow.routing import AdaptiveRouter, RoutingConfig
from xpuflow.telemetry import NvmlSource, VRAMMonitor
from xpuflow.testing import FakeGpu, FakeNvml
from xpuflow.testing.fake_vram import FakeVramSource

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "routing" / "routellm_calibration.csv"
PROMPT_BYTES = 1024
TARGET_P50_US = 30.0
TARGET_P99_US = 150.0
GIB = 1 << 30


def one_kb_prompts(path: Path, count: int) -> list[str]:
    """``count`` prompts of exactly 1024 UTF-8 bytes: each row padded with the rows after it."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row["prompt"] for row in csv.DictReader(handle)]
    prompts = []
    for start in range(min(count, len(rows))):
        text, step = rows[start], 1
        while len(text.encode("utf-8")) < PROMPT_BYTES:
            text += "\n\n" + rows[(start + step) % len(rows)]
            step += 1
        prompts.append(text.encode("utf-8")[:PROMPT_BYTES].decode("utf-8", "ignore"))
    return prompts


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    n = len(ordered)
    return {
        "p50_us": ordered[n // 2] / 1000.0,
        "p90_us": ordered[min(n - 1, int(n * 0.90))] / 1000.0,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] / 1000.0,
        "max_us": ordered[-1] / 1000.0,
    }


def time_calls(fn: Callable[[str], object], prompts: Sequence[str], rounds: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(rounds):
        for prompt in prompts:
            start = clock()
            fn(prompt)
            samples.append(clock() - start)
    return samples


class ConstantScorer:
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, prompt: str) -> float:
        return self.value


def load_scorer() -> tuple[Any | None, str]:
    try:
        from xpuflow.policy.complexity import ComplexityScorer

        return ComplexityScorer(), "xpuflow.policy.complexity.ComplexityScorer (shipped defaults)"
    except Exception as exc:  # reported in the results instead of a made-up number
        return None, f"unavailable ({type(exc).__name__}: {exc})"


def make_router(scorer: Any, monitor: VRAMMonitor) -> AdaptiveRouter:
    return AdaptiveRouter(RoutingConfig(), scorer=scorer, monitor=monitor)


def idle_wakeup_cost(interval_s: float, seconds: float) -> dict[str, Any]:
    """The baseline: CPU time of a thread that only wakes every ``interval_s`` and does nothing."""
    result: dict[str, Any] = {}

    def body() -> None:
        stop = threading.Event()
        wakes, start_cpu, deadline = 0, time.thread_time(), time.monotonic() + seconds
        while time.monotonic() < deadline:
            stop.wait(interval_s)
            wakes += 1
        cpu_s = time.thread_time() - start_cpu
        result.update(
            source="idle thread (baseline)",
            available=True,
            polls=wakes,
            cpu_fraction=cpu_s / seconds,
            cpu_pct_of_one_core=100.0 * cpu_s / seconds,
            cpu_per_poll_us=cpu_s / wakes * 1e6,
        )

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return result


def monitor_cost(name: str, monitor: VRAMMonitor, seconds: float) -> dict[str, Any]:
    if not monitor.available:
        return {"source": name, "available": False, "reason": monitor.error}
    with monitor:
        time.sleep(seconds)
    stats = monitor.stats().to_dict()
    stats.update({"source": name, "available": True, "cpu_pct_of_one_core": 100.0 * stats["cpu_fraction"]})
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--prompts", type=int, default=2000, help="distinct 1 KB prompts")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the prompts")
    parser.add_argument("--monitor-seconds", type=float, default=3.0, help="run time of each poller test")
    parser.add_argument("--data", type=Path, default=DATA, help="the RouteLLM calibration CSV")
    args = parser.parse_args()

    prompts = one_kb_prompts(args.data, args.prompts)
    scorer, scorer_note = load_scorer()
    vram = FakeVramSource({"cuda:0": 24 * GIB, "cuda:1": 80 * GIB})
    results: dict[str, Any] = {
        "prompt_bytes": PROMPT_BYTES,
        "prompts": len(prompts),
        "rounds": args.rounds,
        "scorer": scorer_note,
        "targets": {"route_p50_us": TARGET_P50_US, "route_p99_us": TARGET_P99_US},
    }
    rows: list[tuple[str, ...]] = []

    with VRAMMonitor(vram, poll_interval_ms=15) as monitor:
        baseline = percentiles(time_calls(str.lower, prompts, args.rounds))
        results["baseline_lower_p50_us"] = baseline["p50_us"]
        rows.append(("baseline: str.lower(prompt)", f"{baseline['p50_us']:.2f}", f"{baseline['p99_us']:.2f}"))

        for label, value in (("chain_hard", 0.9), ("chain_easy", 0.1)):
            chain = make_router(ConstantScorer(value), monitor)
            time_calls(chain.route, prompts[:500], 2)  # warm-up
            gc.collect()
            stats = percentiles(time_calls(chain.route, prompts, args.rounds))
            results[f"{label}_p50_us"], results[f"{label}_p99_us"] = stats["p50_us"], stats["p99_us"]
            what = "full chain (hard)" if value > 0.5 else "short chain (easy)"
            rows.append(
                (f"route, constant score: {what}", f"{stats['p50_us']:.2f}", f"{stats['p99_us']:.2f}")
            )

        if scorer is not None:
            from xpuflow.policy.complexity import ComplexityScorer

            pure = ComplexityScorer(accelerated=False)
            routers = {"c": make_router(scorer, monitor), "pure": make_router(pure, monitor)}
            scorers = {"c": scorer, "pure": pure}
            for router in routers.values():
                time_calls(router.route, prompts[:500], 2)
            gc.collect()
            # Separate passes over the distinct prompts, so that no call finds its prompt warm from
            # the call before; the order of the passes rotates from round to round.
            passes = [(kind, path) for kind in ("c", "pure") for path in ("score", "route")]
            samples: dict[tuple[str, str], list[int]] = {key: [] for key in passes}
            for r in range(args.rounds):
                for kind, path in passes[r % len(passes) :] + passes[: r % len(passes)]:
                    fn = scorers[kind].score if path == "score" else routers[kind].route
                    samples[(kind, path)] += time_calls(fn, prompts, 1)
            tiers: dict[str, int] = {}
            for prompt in prompts:
                tier = routers["c"].route(prompt)
                tiers[tier] = tiers.get(tier, 0) + 1
            score_stats, route_stats = (
                percentiles(samples[("c", "score")]),
                percentiles(samples[("c", "route")]),
            )
            pure_score, pure_route = (
                percentiles(samples[("pure", "score")]),
                percentiles(samples[("pure", "route")]),
            )
            decision_stats = percentiles(time_calls(routers["c"].route_decision, prompts, 1))
            results.update(
                {
                    "scorer_accelerated": scorer.accelerated,
                    "score_p50_us": score_stats["p50_us"],
                    "score_p99_us": score_stats["p99_us"],
                    "route_p50_us": route_stats["p50_us"],
                    "route_p90_us": route_stats["p90_us"],
                    "route_p99_us": route_stats["p99_us"],
                    "route_max_us": route_stats["max_us"],
                    "route_decision_p50_us": decision_stats["p50_us"],
                    "route_decision_p99_us": decision_stats["p99_us"],
                    "route_vs_baseline_p50": route_stats["p50_us"] / baseline["p50_us"],
                    # the same scorer without its C word lookups, measured in the same run
                    "pure_python_score_p50_us": pure_score["p50_us"],
                    "pure_python_score_p99_us": pure_score["p99_us"],
                    "pure_python_route_p50_us": pure_route["p50_us"],
                    "pure_python_route_p99_us": pure_route["p99_us"],
                    "route_pure_python_vs_c_p50": pure_route["p50_us"] / route_stats["p50_us"],
                    "tier_share": {tier: count / len(prompts) for tier, count in sorted(tiers.items())},
                    "meets_targets": route_stats["p50_us"] <= TARGET_P50_US
                    and route_stats["p99_us"] <= TARGET_P99_US,
                }
            )
            label = "C word lookups" if scorer.accelerated else "pure Python: the C extension is not built"
            rows += [
                (f"score ({label})", f"{score_stats['p50_us']:.2f}", f"{score_stats['p99_us']:.2f}"),
                ("route = score + chain", f"{route_stats['p50_us']:.2f}", f"{route_stats['p99_us']:.2f}"),
                (
                    "route_decision (explained)",
                    f"{decision_stats['p50_us']:.2f}",
                    f"{decision_stats['p99_us']:.2f}",
                ),
                ("score, pure Python", f"{pure_score['p50_us']:.2f}", f"{pure_score['p99_us']:.2f}"),
                ("route, pure Python", f"{pure_route['p50_us']:.2f}", f"{pure_route['p99_us']:.2f}"),
            ]
        else:
            results.update(dict.fromkeys(("score_p50_us", "score_p99_us", "route_p50_us", "route_p99_us")))
            results["meets_targets"] = None

    nvml_fake = FakeNvml(
        [FakeGpu("NVIDIA H100 80GB HBM3", 80 * GIB), FakeGpu("NVIDIA L4", 24 * GIB, cc=(8, 9))]
    )
    monitors = [
        idle_wakeup_cost(0.015, args.monitor_seconds),
        monitor_cost(
            "fake", VRAMMonitor(FakeVramSource({"cuda:0": GIB, "cuda:1": GIB})), args.monitor_seconds
        ),
        monitor_cost("fake_nvml", VRAMMonitor(NvmlSource(nvml_fake)), args.monitor_seconds),
        monitor_cost("nvml", VRAMMonitor.auto(source="nvml"), args.monitor_seconds),
    ]
    results["vram_monitor_15ms"] = monitors

    print_table(
        f"Routing latency, {PROMPT_BYTES}-byte prompts ({scorer_note})", rows, ("path", "p50 us", "p99 us")
    )
    print()
    print_table(
        "VRAM monitor at 15 ms",
        [
            (
                m["source"],
                str(m.get("polls", "-")),
                f"{m['cpu_pct_of_one_core']:.3f}" if m["available"] else "-",
                f"{m['cpu_per_poll_us']:.1f}" if m["available"] else str(m["reason"]),
            )
            for m in monitors
        ],
        ("source", "polls", "CPU % of a core", "CPU us per poll"),
    )
    if results.get("meets_targets") is not None:
        verdict = "meets" if results["meets_targets"] else "MISSES"
        print(f"\nroute {verdict} the targets (p50 <= {TARGET_P50_US:g} us, p99 <= {TARGET_P99_US:g} us)")
    path = write_results("route_latency", results)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
