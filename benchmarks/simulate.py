"""Benchmark of ``xpuflow simulate``: simulator speed and xpuflow's scorer against the baselines.

    python benchmarks/simulate.py            # writes benchmarks/results/simulate.json (+ simulate.png)

Method:

- ``sim_requests_per_s``: the first 10 minutes of the Azure conversation trace, rate scaled to 60% of a
  64-worker heterogeneous fleet's capacity (16 fast, 16 mid, 32 slow devices), simulated once per
  policy in this process (one core); simulated requests per wall-clock second.
- ``xpuflow_vs_best_baseline_goodput``: the same slice at 80% of the capacity of an 8-worker
  heterogeneous fleet (2 fast, 2 mid, 4 slow), 3 seeds per policy; goodput = requests/s served within
  TTFT 2 s and end-to-end 60 s; xpuflow's mean goodput over the best baseline's.
- ``validation_*``: the comparison with the real gateway (``xpuflow serve`` over sleeping fake workers)
  is not part of this run yet: the fields are null with the reason (see docs/simulate.md).

The trace is read from ``../shared/data/traces`` beside the checkout (or a folder given as argv[1]).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, machine, print_table, write_results

from xpuflow.simulate import (
    BASELINES,
    PolicyName,
    Simulation,
    capacity_per_s,
    default_trace_dirs,
    load_fleet,
    load_trace,
    parse_slo,
    summarize,
    write_plot,
)

DEVICES = {
    "fast": "name: fast\nmax_batch_size: 8\noverhead_s: 0.002\n"
    "prefill_tokens_per_s: {1: 8000, 8: 12000}\ndecode_tokens_per_s: {1: 80, 8: 480}\n",
    "mid": "name: mid\nmax_batch_size: 8\noverhead_s: 0.004\n"
    "prefill_tokens_per_s: {1: 4000}\ndecode_tokens_per_s: {1: 40, 8: 200}\n",
    "slow": "name: slow\nmax_batch_size: 4\noverhead_s: 0.01\n"
    "prefill_tokens_per_s: {1: 1500}\ndecode_tokens_per_s: {1: 15, 4: 45}\n",
}
SLO = "ttft_p99=2s,e2e_p99=60s"


def fleet_file(folder: Path, fast: int, mid: int, slow: int) -> Path:
    for name, text in DEVICES.items():
        (folder / f"{name}.yaml").write_text(text)
    deps = "".join(
        f"  - {{name: {name}, backend: fake, replicas: {n}, max_seq_len: 65536, "
        f"options: {{device_model: {name}.yaml}}}}\n"
        for name, n in (("fast", fast), ("mid", mid), ("slow", slow))
    )
    path = folder / f"fleet_{fast}_{mid}_{slow}.yaml"
    path.write_text(
        f"deployments:\n{deps}models:\n"
        "  - {name: chat, tiers: [{name: main, deployments: [fast, mid, slow]}]}\n"
    )
    return path


def main() -> None:
    dirs = [Path(sys.argv[1])] if len(sys.argv) > 1 else default_trace_dirs()
    requests = load_trace("azure-conv", dirs, duration_s=600)
    rate = len(requests) / requests[-1].arrival_s
    slo = parse_slo(SLO)
    data: dict[str, Any] = {
        "machine": machine(),
        "trace": "azure-conv first 600 s",
        "requests": len(requests),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = load_fleet(fleet_file(folder, 16, 16, 32))
        scale = 0.6 * capacity_per_s(big, requests) / rate
        speed: dict[str, float] = {}
        for policy in PolicyName:
            began = time.perf_counter()
            result = Simulation(big, requests, policy=policy, seed=0, scale=scale).run()
            speed[policy.value] = len(requests) / (time.perf_counter() - began)
            assert result.outcomes.count("ok") > 0
        small = load_fleet(fleet_file(folder, 2, 2, 4))
        capacity = capacity_per_s(small, requests)
        scale80 = 0.8 * capacity / rate
        goodput: dict[str, list[float]] = {}
        summaries: dict[str, Any] = {}
        plot_results = []
        for policy in [PolicyName.XPUFLOW, *BASELINES]:
            for seed in (0, 1, 2):
                result = Simulation(small, requests, policy=policy, seed=seed, scale=scale80).run()
                summary = summarize(result, slo)
                goodput.setdefault(policy.value, []).append(summary["goodput_per_s"])
                if seed == 0:
                    summaries[policy.value] = summary
                    plot_results.append(result)
        write_plot(RESULTS_DIR / "simulate.png", plot_results)
    mean = {p: statistics.mean(v) for p, v in goodput.items()}
    best_baseline = max((p for p in mean if p != "xpuflow"), key=lambda p: mean[p])
    ratio = mean["xpuflow"] / mean[best_baseline] if mean[best_baseline] > 0 else None
    data.update(
        {
            "method": __doc__,
            "slo": SLO,
            "sim_requests_per_s": speed,
            "sim_requests_per_s_xpuflow": speed["xpuflow"],
            "sim_requests_per_s_best": max(speed.values()),
            "speed_fleet": {"fast": 16, "mid": 16, "slow": 32, "load": "60% of capacity"},
            "goodput_fleet": {"fast": 2, "mid": 2, "slow": 4, "capacity_per_s": capacity, "scale": scale80},
            "goodput_per_s": goodput,
            "best_baseline": best_baseline,
            "xpuflow_vs_best_baseline_goodput": ratio,
            "summaries": summaries,
            "validation_p50_error": None,
            "validation_p99_error": None,
            "validation_note": "not measured in this run: the gateway comparison is not implemented yet",
        }
    )
    rows = [
        (
            p,
            f"{speed[p]:,.0f}",
            f"{mean[p]:.3f}",
            f"{summaries[p]['slo_attainment']:.1%}",
            f"{summaries[p]['e2e_s']['p50']:.1f}",
            f"{summaries[p]['e2e_s']['p99']:.1f}",
        )
        for p in mean
    ]
    print_table(
        "xpuflow simulate",
        rows,
        ("policy", "sim req/s (64 workers)", "goodput/s @80%", "SLO att.", "e2e p50 s", "e2e p99 s"),
    )
    print(f"xpuflow / best baseline ({best_baseline}) goodput: {ratio}")
    write_results("simulate", data)


if __name__ == "__main__":
    main()
