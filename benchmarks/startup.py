"""Start-up costs: `import xpuflow`, `xpuflow --help`, `xpuflow info --json`, and one `advise()` call.

Targets (issue "Foundation"): import <= 150 ms, --help <= 300 ms, info --json <= 1.5 s without torch,
advise() <= 20 us per call. Whole-process times include the interpreter's own start-up, which is
measured in the same run (`python -c pass`) and reported as the baseline; ratios are against it.

    python benchmarks/startup.py [--runs 15]

Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, summary, time_process, write_results

PY = sys.executable
# `sys.modules["torch"] = None` makes importlib report torch as absent, exactly as on a machine
# without torch, without needing a second environment.
HIDE_TORCH = "import sys; sys.modules['torch'] = None; "
RUN_CLI = "from xpuflow.cli.main import main; sys.argv = ['xpuflow'] + {args!r}; main()"


def cli(args: list[str], hide_torch: bool) -> list[str]:
    prefix = HIDE_TORCH if hide_torch else "import sys; "
    return [PY, "-c", prefix + RUN_CLI.format(args=args)]


def advise_us(number: int) -> list[float]:
    """Per-call time of advise() on this machine's CPU plus two GPUs as NVML would report them
    (an 80 GiB and a 24 GiB card), so the call weighs three devices whatever the host has."""
    import xpuflow
    from xpuflow.types import Resource, ResourceType

    gib = 1 << 30
    inventory = xpuflow.Inventory.of(
        [
            *xpuflow.detect().resources,
            Resource(
                "cuda:0",
                ResourceType.GPU,
                "NVIDIA H100",
                {
                    "memory_bytes": 80 * gib,
                    "free_memory_bytes": 78 * gib,
                    "compute_capability": "9.0",
                    "vendor": "nvidia",
                },
            ),
            Resource(
                "cuda:1",
                ResourceType.GPU,
                "NVIDIA L4",
                {
                    "memory_bytes": 24 * gib,
                    "free_memory_bytes": 22 * gib,
                    "compute_capability": "8.9",
                    "vendor": "nvidia",
                },
            ),
        ]
    )
    xpuflow.advise(7e9, batch_size=8, precision="bf16", strategy="latency", inventory=inventory)
    timer = timeit.Timer(
        lambda: xpuflow.advise(7e9, batch_size=8, precision="bf16", strategy="latency", inventory=inventory)
    )
    return [t / number * 1e6 for t in timer.repeat(repeat=7, number=number)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "0"}

    baseline = time_process([PY, "-c", "pass"], args.runs, env)
    imports = time_process([PY, "-c", "import xpuflow"], args.runs, env)
    help_ = time_process(cli(["--help"], hide_torch=False), args.runs, env)
    info_no_torch = time_process(cli(["info", "--json"], hide_torch=True), args.runs, env)
    info_torch = time_process(cli(["info", "--json"], hide_torch=False), max(3, args.runs // 3), env)
    advise = advise_us(number=2000)

    base = statistics.median(baseline)
    results = {
        "import_ms": statistics.median(imports),
        "help_ms": statistics.median(help_),
        "info_ms": statistics.median(info_no_torch),
        "info_with_torch_ms": statistics.median(info_torch),
        "advise_us": statistics.median(advise),
        "baseline_python_ms": base,
        "targets": {"import_ms": 150, "help_ms": 300, "info_ms": 1500, "advise_us": 20},
        "ratios_to_baseline": {
            "import": statistics.median(imports) / base,
            "help": statistics.median(help_) / base,
            "info": statistics.median(info_no_torch) / base,
        },
        "raw": {
            "baseline_python_ms": summary(baseline) | {"samples": baseline},
            "import_ms": summary(imports) | {"samples": imports},
            "help_ms": summary(help_) | {"samples": help_},
            "info_ms": summary(info_no_torch) | {"samples": info_no_torch},
            "info_with_torch_ms": summary(info_torch) | {"samples": info_torch},
            "advise_us": summary(advise) | {"samples": advise},
        },
        "method": "whole-process wall time, median of --runs after one warm-up; import includes interpreter "
        "start-up (see baseline_python_ms); info_ms hides torch; advise_us is in-process timeit "
        "with the detected inventory passed in",
    }
    rows = []
    for key, unit in (("import_ms", "ms"), ("help_ms", "ms"), ("info_ms", "ms"), ("advise_us", "us")):
        target = results["targets"][key]
        rows.append(
            (
                key,
                f"{results[key]:.1f} {unit}",
                f"<= {target} {unit}",
                "ok" if results[key] <= target else "MISS",
            )
        )
    rows.append(("info_with_torch_ms", f"{results['info_with_torch_ms']:.1f} ms", "-", "-"))
    rows.append(("baseline_python_ms", f"{base:.1f} ms", "-", "-"))
    print_table("xpuflow start-up", rows, ("figure", "median", "target", ""))
    print("wrote", write_results("startup", results))


if __name__ == "__main__":
    main()
