"""Quality metrics for a two-tier router: PGR, APGR, CPT and AUROC (pure numpy, no I/O).

A router gives every prompt a score (higher = send it to the strong tier). Given, for each prompt, whether
the weak and the strong model answered it well (``weak_scores``, ``strong_scores``, usually 0/1), these
functions say how much of the quality gap between the two models the router recovers for a given share of
strong calls. The definitions follow RouteLLM (Ong et al., 2024, ``routellm/evals``):

- thresholds are the score quantiles at 0, 1/k, ..., 1 (``k = num_points``, 10 by default); at threshold
  ``t`` every prompt with ``score >= t`` goes to the strong model (at the top quantile, ``score > t``,
  so the curve ends with no strong calls). Tied scores always go to the same model, so a router that
  cannot tell prompts apart gets no credit for an arbitrary tie-break;
- ``quality(share)`` is the mean of ``strong_scores`` over prompts sent strong and ``weak_scores`` over
  the rest; ``PGR = (quality - weak quality) / (strong quality - weak quality)``;
- ``APGR`` is the trapezoid area under quality against the realised strong share (in [0, 1]), normalised
  the same way: for evenly spaced shares it is the mean PGR over 0%, 10%, ..., 100% with the two end
  points at half weight. Random routing scores about 0.5, a perfect router up to about 0.8-0.9.
- ``CPT(p)`` is the smallest share of strong calls at which the (linearly interpolated) curve first
  recovers ``p`` of the quality gap.

Example::

    curve = pgr_curve(scores, weak, strong)          # [(0.0, 0.0), (0.1, 0.21), ..., (1.0, 1.0)]
    value = apgr(scores, weak, strong)               # 0.64
    lo, hi = bootstrap_ci(apgr, (scores, weak, strong), rng=np.random.default_rng(0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "apgr",
    "auroc",
    "bootstrap_ci",
    "cpt",
    "pgr_curve",
    "quality_curve",
]

FloatArray = NDArray[np.float64]


def _as_arrays(scores: ArrayLike, weak_scores: ArrayLike, strong_scores: ArrayLike) -> tuple[FloatArray, ...]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.asarray(weak_scores, dtype=np.float64).ravel()
    g = np.asarray(strong_scores, dtype=np.float64).ravel()
    if not (len(s) == len(w) == len(g)):
        raise ValueError(
            f"scores, weak_scores and strong_scores differ in length: {len(s)}, {len(w)}, {len(g)}"
        )
    if len(s) == 0:
        raise ValueError("no prompts to evaluate: pass at least one score")
    return s, w, g


def quality_curve(
    scores: ArrayLike, weak_scores: ArrayLike, strong_scores: ArrayLike, num_points: int = 10
) -> list[tuple[float, float]]:
    """``(strong share, mean quality)`` at the score quantiles RouteLLM uses, sorted by share.

    ``num_points`` quantile bins give ``num_points + 1`` thresholds; the shares run from 0 to 1 (exactly
    1 at the lowest threshold, exactly 0 above the highest).
    """
    s, w, g = _as_arrays(scores, weak_scores, strong_scores)
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    thresholds = np.quantile(s, np.linspace(0.0, 1.0, num_points + 1))
    points: list[tuple[float, float]] = []
    for i, threshold in enumerate(thresholds):
        strong = s > threshold if i == len(thresholds) - 1 else s >= threshold
        quality = float(np.where(strong, g, w).mean())
        points.append((float(strong.mean()), quality))
    points.sort()
    return points


def pgr_curve(
    scores: ArrayLike, weak_scores: ArrayLike, strong_scores: ArrayLike, num_points: int = 10
) -> list[tuple[float, float]]:
    """``(strong share, PGR)`` points; PGR is 0 at the weak model's quality and 1 at the strong one's.

    Raises ``ValueError`` when both models have the same mean quality (the gap is undefined).
    """
    _, w, g = _as_arrays(scores, weak_scores, strong_scores)
    weak_q, strong_q = float(w.mean()), float(g.mean())
    if strong_q == weak_q:
        raise ValueError("the weak and strong models have the same quality: PGR is undefined")
    gap = strong_q - weak_q
    return [(share, (q - weak_q) / gap) for share, q in quality_curve(scores, w, g, num_points)]


def apgr(scores: ArrayLike, weak_scores: ArrayLike, strong_scores: ArrayLike, num_points: int = 10) -> float:
    """Average performance gap recovered: trapezoid area under the PGR curve over strong share in [0, 1]."""
    curve = pgr_curve(scores, weak_scores, strong_scores, num_points)
    shares = np.array([p[0] for p in curve])
    pgr = np.array([p[1] for p in curve])
    return float(np.sum((shares[1:] - shares[:-1]) * (pgr[1:] + pgr[:-1]) / 2.0))


def cpt(
    scores: ArrayLike,
    weak_scores: ArrayLike,
    strong_scores: ArrayLike,
    gap_fraction: float = 0.5,
    num_points: int = 10,
) -> float:
    """Call-performance threshold: the least strong share at which PGR first reaches ``gap_fraction``.

    The PGR curve is interpolated linearly between its points; returns 1.0 if it never gets there.
    """
    curve = pgr_curve(scores, weak_scores, strong_scores, num_points)
    prev_share, prev_pgr = curve[0]
    if prev_pgr >= gap_fraction:
        return prev_share
    for share, pgr in curve[1:]:
        if pgr >= gap_fraction:
            if pgr == prev_pgr:
                return share
            return prev_share + (share - prev_share) * (gap_fraction - prev_pgr) / (pgr - prev_pgr)
        prev_share, prev_pgr = share, pgr
    return 1.0


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels`` (Mann-Whitney; ties count 1/2).

    Returns ``nan`` when ``labels`` hold only one class.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if len(s) != len(y):
        raise ValueError(f"scores and labels differ in length: {len(s)} and {len(y)}")
    num_pos = int(y.sum())
    num_neg = len(y) - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over runs of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    rank_sum = float(ranks[y].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def bootstrap_ci(
    statistic: Callable[..., float],
    arrays: Sequence[ArrayLike],
    *,
    rng: np.random.Generator,
    num_resamples: int = 1000,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling rows with replacement.

    Resamples on which the statistic is undefined (it raises ``ValueError`` or returns nan) are skipped.
    """
    columns = [np.asarray(a) for a in arrays]
    n = len(columns[0])
    values: list[float] = []
    for _ in range(num_resamples):
        idx = rng.integers(0, n, size=n)
        try:
            value = statistic(*(c[idx] for c in columns))
        except ValueError:
            continue
        if not np.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.array(values), [tail, 1.0 - tail])
    return float(lo), float(hi)
