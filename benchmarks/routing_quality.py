"""Routing quality of the complexity scorer on RouteLLM's GSM8K and MMLU data, with baselines, and its cost.

Quality is measured out of fold: 5-fold cross-validation (stratified by benchmark and outcome), each
fold's scorer fitted by ``complexity_fit`` on the other four folds only (vocabulary, standardisation,
subject means, weights, calibration), and the out-of-fold scores pooled per benchmark. For each
benchmark and router it reports APGR (RouteLLM's definition, ``xpuflow.policy.routing_metrics``) with a
95% bootstrap interval, AUROC against ``strong_needed``, and CPT(50%). Baselines in the same run:
random scores (the mean over 200 draws, interval over those draws and resamples) and prompt length.
The shipped default parameters were fitted on all of this data, so their figure is in-sample and is
listed for reference only.

Cost: per-call time of ``ComplexityScorer.score`` on a 1 KB prompt and a 1 MB prompt (p50/p99 over
single calls), against a naive baseline measured in the same run: counting words with a regex.

    python benchmarks/routing_quality.py [--data PATH] [--bootstrap 1000] [--seed 0]
    python benchmarks/routing_quality.py --refit-default     # also rewrite the shipped parameters

Writes benchmarks/results/routing_quality.json.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from xpuflow.policy.complexity import DEFAULT_PARAMS_FILE, ComplexityScorer
from xpuflow.policy.complexity_fit import DEFAULT_CONFIGS, cross_validate, fit
from xpuflow.policy.routing_metrics import apgr, auroc, bootstrap_ci, cpt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "routing" / "routellm_calibration.csv"
DEFAULT_PARAMS = ROOT / "src" / "xpuflow" / "data" / DEFAULT_PARAMS_FILE
BENCHMARKS = ("gsm8k", "mmlu")
TARGET_APGR = 0.65
# RouteLLM's published figures on the full sets (see the data README), for context only.
PUBLISHED = {
    "gsm8k": {"routellm_best_apgr": 0.62, "length_apgr": 0.60},
    "mmlu": {"routellm_best_apgr": 0.60, "length_apgr": 0.58},
}
RANDOM_DRAWS = 200
REPEAT_SEEDS = (0, 1, 2, 3, 4)


def load(path: Path) -> dict[str, Any]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {
        "prompt": [r["prompt"] for r in rows],
        "benchmark": np.array([r["benchmark"] for r in rows]),
        "category": [r["category"] for r in rows],
        "weak": np.array([float(r["weak_score"]) for r in rows]),
        "strong": np.array([float(r["strong_score"]) for r in rows]),
        "needed": np.array([int(r["strong_needed"]) for r in rows]),
    }


def metrics(
    scores: np.ndarray,
    weak: np.ndarray,
    strong: np.ndarray,
    needed: np.ndarray,
    rng: np.random.Generator,
    n: int,
) -> dict[str, Any]:
    lo, hi = bootstrap_ci(apgr, (scores, weak, strong), rng=rng, num_resamples=n)
    return {
        "apgr": apgr(scores, weak, strong),
        "apgr_ci95": [lo, hi],
        "auroc_strong_needed": auroc(scores, needed),
        "cpt50": cpt(scores, weak, strong, 0.5),
    }


def random_metrics(
    weak: np.ndarray, strong: np.ndarray, needed: np.ndarray, rng: np.random.Generator
) -> dict[str, Any]:
    values, aucs, cpts = [], [], []
    for _ in range(RANDOM_DRAWS):
        s = rng.random(len(weak))
        values.append(apgr(s, weak, strong))
        aucs.append(auroc(s, needed))
        cpts.append(cpt(s, weak, strong, 0.5))
    lo, hi = np.quantile(values, [0.025, 0.975])
    return {
        "apgr": float(np.mean(values)),
        "apgr_ci95": [float(lo), float(hi)],
        "auroc_strong_needed": float(np.mean(aucs)),
        "cpt50": float(np.mean(cpts)),
        "draws": RANDOM_DRAWS,
    }


def per_fold_apgr(scores: np.ndarray, folds: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> list[float]:
    return [apgr(scores[folds == k], weak[folds == k], strong[folds == k]) for k in np.unique(folds)]


def timing(scorer: ComplexityScorer, prompt: str, calls: int) -> dict[str, float]:
    naive = re.compile(r"\w+")
    for _ in range(min(calls, 200)):
        scorer.score(prompt)
    clock = time.perf_counter_ns
    # two separate loops: interleaving would let the baseline evict the scorer's tables from the caches
    ours: list[int] = []
    for _ in range(calls):
        t0 = clock()
        scorer.score(prompt)
        ours.append(clock() - t0)
    base: list[int] = []
    for _ in range(calls):
        t0 = clock()
        len(naive.findall(prompt))
        base.append(clock() - t0)
    ours.sort()
    base.sort()

    def pct(xs: list[int], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0

    return {
        "prompt_chars": len(prompt),
        "calls": calls,
        "score_p50_us": pct(ours, 0.5),
        "score_p99_us": pct(ours, 0.99),
        "regex_word_count_p50_us": pct(base, 0.5),
        "ratio_p50_vs_regex_word_count": pct(ours, 0.5) / max(pct(base, 0.5), 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--refit-default", action="store_true", help="refit on all data and rewrite the shipped file"
    )
    args = parser.parse_args()

    data = load(args.data)
    gains = data["strong"] - data["weak"]
    t0 = time.perf_counter()
    cv = cross_validate(
        data["prompt"],
        gains,
        groups=data["category"],
        strata=data["benchmark"].tolist(),
        num_folds=args.folds,
        seed=args.seed,
    )
    cv_s = time.perf_counter() - t0
    # the fold split alone moves GSM8K's APGR by about +-0.01: report the spread over several splits
    repeated = {bench: [] for bench in BENCHMARKS}
    for seed in REPEAT_SEEDS:
        again = cv if seed == args.seed else None
        if again is None:
            again = cross_validate(
                data["prompt"],
                gains,
                groups=data["category"],
                strata=data["benchmark"].tolist(),
                num_folds=args.folds,
                seed=seed,
            )
        for bench in BENCHMARKS:
            m = data["benchmark"] == bench
            repeated[bench].append(apgr(again.logits[m], data["weak"][m], data["strong"][m]))

    if args.refit_default:
        params = fit(
            data["prompt"],
            gains,
            groups=data["category"],
            metadata={
                "trained_on": "RouteLLM GSM8K + MMLU calibration set (weak Mixtral-8x7B, strong GPT-4-1106)",
                "label": "strong_score - weak_score",
            },
        )
        params.save(DEFAULT_PARAMS)
        print(f"wrote {DEFAULT_PARAMS} ({DEFAULT_PARAMS.stat().st_size} bytes)")
    shipped = ComplexityScorer()
    in_sample = np.array([shipped.logit(p) for p in data["prompt"]])
    lengths = np.array([len(p) for p in data["prompt"]], dtype=np.float64)

    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {}
    rows: list[tuple[str, ...]] = []
    for bench in BENCHMARKS:
        m = data["benchmark"] == bench
        w, s, y = data["weak"][m], data["strong"][m], data["needed"][m]
        routers = {
            "xpuflow_cv": metrics(cv.logits[m], w, s, y, rng, args.bootstrap),
            "random": random_metrics(w, s, y, rng),
            "prompt_length": metrics(lengths[m], w, s, y, rng, args.bootstrap),
            "xpuflow_shipped_in_sample": metrics(in_sample[m], w, s, y, rng, args.bootstrap),
        }
        routers["xpuflow_cv"]["apgr_per_fold"] = per_fold_apgr(cv.logits[m], cv.folds[m], w, s)
        routers["xpuflow_cv"]["repeated_cv"] = {
            "seeds": list(REPEAT_SEEDS),
            "apgr": repeated[bench],
            "apgr_mean": float(np.mean(repeated[bench])),
        }
        results[bench] = {
            "rows": int(m.sum()),
            "weak_accuracy": float(w.mean()),
            "strong_accuracy": float(s.mean()),
            "strong_needed_rate": float(y.mean()),
            "routers": routers,
            "published": PUBLISHED[bench],
            "meets_target": routers["xpuflow_cv"]["apgr"] >= TARGET_APGR,
        }
        for name, r in routers.items():
            lo, hi = r["apgr_ci95"]
            rows.append(
                (
                    bench,
                    name,
                    f"{r['apgr']:.3f}",
                    f"[{lo:.3f}, {hi:.3f}]",
                    f"{r['auroc_strong_needed']:.3f}",
                    f"{r['cpt50']:.1%}",
                )
            )

    mixed = " ".join(
        data["prompt"][i] for i in np.random.default_rng(1).permutation(len(data["prompt"]))[:400]
    )
    one_mb = ("A train leaves at 3 pm. " * 50_000)[: 1 << 20]
    cost = {
        "300b": timing(shipped, mixed[:300], 20_000),
        "1kb": timing(shipped, mixed[:1024], 20_000),
        "5kb": timing(shipped, mixed[:5120], 5_000),
        "1mb": timing(shipped, one_mb, 200),
    }

    print_table(
        f"Routing quality, out-of-fold {args.folds}-fold CV (target APGR >= {TARGET_APGR})",
        rows,
        ("benchmark", "router", "APGR", "95% CI", "AUROC", "CPT(50%)"),
    )
    print()
    print_table(
        "Scoring cost per call (us)",
        [
            (
                k,
                str(v["prompt_chars"]),
                f"{v['score_p50_us']:.1f}",
                f"{v['score_p99_us']:.1f}",
                f"{v['regex_word_count_p50_us']:.1f}",
                f"{v['ratio_p50_vs_regex_word_count']:.2f}",
            )
            for k, v in cost.items()
        ],
        ("prompt", "chars", "p50", "p99", "regex words p50", "ratio"),
    )
    path = write_results(
        "routing_quality",
        {
            "method": (
                f"{args.folds}-fold CV stratified by benchmark and outcome (seed {args.seed}); "
                "each fold fitted on the other folds only; APGR per RouteLLM (10 quantile bins, "
                f"trapezoid); bootstrap {args.bootstrap} resamples of the pooled out-of-fold scores; "
                f"repeated_cv: the same with seeds {list(REPEAT_SEEDS)}"
            ),
            "fit_configs": {k: asdict(v) for k, v in DEFAULT_CONFIGS.items()},
            "cross_validation_s": cv_s,
            "target_apgr": TARGET_APGR,
            "benchmarks": results,
            "cost": cost,
            "note": (
                "xpuflow_shipped_in_sample: the shipped parameters were fitted on all rows; "
                "not a held-out figure"
            ),
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
