"""Fit complexity-scorer parameters on labelled prompts (pure numpy; no scikit-learn at run time).

Recalibrating on one's own traffic takes prompts and, for each, how much better the strong tier did
than the weak one::

    from xpuflow.policy.complexity_fit import fit, cross_validate
    params = fit(prompts, gains)                      # gains: strong_score - weak_score, in [-1, 1]
    params.save("my_complexity.json")                 # ComplexityScorer.from_file("my_complexity.json")
    cv = cross_validate(prompts, gains, strata=benchmarks)   # out-of-fold scores, for honest figures

0/1 labels ("only the strong tier got it right") work as ``gains`` too. ``groups`` (optional, used only
while fitting) names a topic per prompt, such as a benchmark subject: each prompt's target is then
blended with its topic's smoothed, cross-fitted mean gain, which denoises the 0/1 outcomes the way
more data would. At scoring time the scorer sees the prompt text only.

The method, per expert (multiple-choice prompts and open prompts, see ``complexity``):

1. features: the cues of ``complexity_features`` standardised on the training rows, and the words with
   document frequency >= ``min_df`` (at most ``max_vocab``) as a binary bag of words, each row divided by
   the square root of its number of words (L2 normalisation); with ``idf`` each word's column is also
   scaled by its inverse document frequency, which lowers the penalty on rare, specific words;
2. ridge regression of the (blended) gain, with penalty ``alpha_cues`` on the standardised cues and
   ``alpha_lexical`` on the words, shrinking each cue towards a prior weight (``CUE_PRIORS``: cues the
   calibration data never exercises, such as code fences, keep their prior), solved by preconditioned
   conjugate gradients on a CSR matrix held in numpy arrays;
3. Platt scaling (a 1-D logistic regression of "gain > 0" on the ridge output), fitted on out-of-fold
   ridge outputs from ``calibration_folds`` inner folds so that the probabilities are not overconfident.

An expert with fewer than ``min_expert_rows`` rows (say, traffic with no multiple-choice prompts) is fitted
on all rows instead.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from xpuflow.errors import ConfigError
from xpuflow.policy.complexity import EXPERTS, ComplexityParams, ComplexityScorer, ExpertParams
from xpuflow.policy.complexity_features import FEATURE_NAMES, Features, as_text, extract

__all__ = [
    "CUE_PRIORS",
    "CrossValidation",
    "FitConfig",
    "cross_validate",
    "fit",
    "fold_ids",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

CUE_PRIORS: Final[Mapping[str, float]] = {
    "code_blocks": 0.06,
    "code_symbols": 0.02,
    "code_terms": 0.02,
    "reasoning_cues": 0.04,
}
"""Prior weights (gain per unit of the raw cue) that the ridge fit shrinks towards; 0 for other cues."""

_CHOICE_INDEX: Final = FEATURE_NAMES.index("multiple_choice")
_CONSTANT_STD: Final = 1e-9


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of one expert's fit (see the module docstring for where each one acts)."""

    alpha_cues: float = 30.0
    """Ridge penalty on the standardised cues (larger = closer to ``CUE_PRIORS``)."""
    alpha_lexical: float = 10.0
    """Ridge penalty on the word weights (larger = fewer topic cues)."""
    min_df: int = 3
    """A word joins the vocabulary when at least this many training prompts contain it."""
    max_vocab: int = 8000
    """At most this many words (the most frequent), to keep the parameter file small."""
    max_df: float = 1.0
    """A word in more than this share of the training prompts is left out (stop words such as "the":
    nearly every prompt has them, so they say little, and each one costs a lookup when scoring)."""
    idf: bool = True
    """Scale word columns by inverse document frequency before the fit (see the module docstring)."""
    group_blend: float = 0.5
    """Weight of a prompt's own gain against its group's mean gain, when groups are given."""
    group_smoothing: float = 20.0
    """Pseudo-count pulling a small group's mean towards the overall mean."""
    calibration_folds: int = 5
    """Inner folds for out-of-fold Platt scaling (and group means); 0 calibrates in-sample."""
    min_expert_rows: int = 50
    """An expert with fewer training rows is fitted on all rows."""
    seed: int = 0
    """Seed of the inner fold assignment."""

    def __post_init__(self) -> None:
        if self.alpha_cues <= 0 or self.alpha_lexical <= 0:
            raise ConfigError("alpha_cues and alpha_lexical must be > 0", field="alpha_cues")
        if not 0.0 < self.max_df <= 1.0:
            raise ConfigError("max_df must be in (0, 1]", field="max_df")
        if not 0.0 <= self.group_blend <= 1.0:
            raise ConfigError("group_blend must be in [0, 1]", field="group_blend")
        if self.calibration_folds == 1 or self.calibration_folds < 0:
            raise ConfigError("calibration_folds must be 0 or >= 2", field="calibration_folds")


DEFAULT_CONFIGS: Final[Mapping[str, FitConfig]] = {
    "open": FitConfig(alpha_cues=3000.0, alpha_lexical=100.0, idf=False),
    "choice": FitConfig(alpha_cues=3000.0, alpha_lexical=100.0, group_blend=0.25, max_df=0.1),
}
"""Per-expert defaults chosen by 5-fold cross-validation on the RouteLLM calibration set. ``max_df`` 0.1
drops the stop words from the multiple-choice expert: MMLU's APGR over five fold splits went from 0.659
to 0.661 (mean), with about 30 fewer vocabulary lookups per 1 KB prompt. On the open expert it cost
GSM8K 0.004 (0.663 -> 0.659), so that one keeps them."""


@dataclass(frozen=True)
class CrossValidation:
    """Out-of-fold ``scores`` (each from a model that never saw the row) and each row's ``folds`` id."""

    scores: FloatArray
    folds: IntArray
    logits: FloatArray = field(repr=False)
    """The logits behind ``scores`` (not clipped, so they keep ranking where scores saturate)."""


# ------------------------------------------------------------------------------------------ folds


def fold_ids(strata: Sequence[Any], num_folds: int, seed: int = 0) -> IntArray:
    """A fold id in ``range(num_folds)`` per row, balanced within every stratum (shuffled by ``seed``)."""
    if num_folds < 2:
        raise ConfigError(f"num_folds must be >= 2, got {num_folds}", field="num_folds")
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(strata), dtype=np.int64)
    by_stratum: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(i)
    offset = 0
    for key in sorted(by_stratum, key=repr):
        rows = np.array(by_stratum[key], dtype=np.int64)
        rows = rows[rng.permutation(len(rows))]
        # continue the round-robin across strata so that small strata do not all start at fold 0
        folds[rows] = (np.arange(len(rows)) + offset) % num_folds
        offset += len(rows)
    return folds


# ------------------------------------------------------------------------------------------ design


@dataclass(frozen=True)
class _Lexical:
    """Bag-of-words rows as CSR arrays: ``data`` is the column scale / sqrt(words in the row)."""

    indptr: IntArray
    indices: IntArray
    data: FloatArray
    rows: IntArray  # row of each stored entry
    num_cols: int

    def matvec(self, v: FloatArray) -> FloatArray:
        n = len(self.indptr) - 1
        out = np.bincount(self.rows, weights=self.data * v[self.indices], minlength=n)
        return out.astype(np.float64, copy=False)

    def rmatvec(self, u: FloatArray) -> FloatArray:
        out = np.bincount(self.indices, weights=self.data * u[self.rows], minlength=self.num_cols)
        return out.astype(np.float64, copy=False)


def _vocabulary(features: Sequence[Features], cfg: FitConfig) -> tuple[list[bytes], FloatArray]:
    df: Counter[bytes] = Counter()
    for f in features:
        df.update(f.tokens)
    eligible = []
    for token, count in df.items():
        if count < cfg.min_df or count > cfg.max_df * len(features):
            continue
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a fragment of a multi-byte character cut at the window edge
        eligible.append((-count, token))
    eligible.sort()
    chosen = eligible[: cfg.max_vocab]
    n = len(features)
    vocab = [token for _, token in chosen]
    idf = np.array([math.log((1 + n) / (1 + -neg)) + 1.0 for neg, _ in chosen], dtype=np.float64)
    return vocab, idf


def _lexical(features: Sequence[Features], vocab: Sequence[bytes], scale: FloatArray) -> _Lexical:
    index = {t: j for j, t in enumerate(vocab)}
    indptr = [0]
    indices: list[int] = []
    for f in features:
        cols = sorted(index[t] for t in f.tokens if t in index)
        indices.extend(cols)
        indptr.append(len(indices))
    ind = np.array(indices, dtype=np.int64)
    ptr = np.array(indptr, dtype=np.int64)
    rows = np.repeat(np.arange(len(features), dtype=np.int64), np.diff(ptr))
    counts = np.diff(ptr).astype(np.float64)
    data = scale[ind] / np.sqrt(counts[rows]) if len(ind) else np.zeros(0)
    return _Lexical(ptr, ind, data, rows, len(vocab))


def _cg(
    apply: Callable[[FloatArray], FloatArray],
    rhs: FloatArray,
    precond: FloatArray,
    tol: float = 1e-8,
    max_iter: int = 2000,
) -> FloatArray:
    """Preconditioned conjugate gradients for a symmetric positive definite ``apply``."""
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / precond
    p = z.copy()
    rz = float(r @ z)
    limit = tol * float(np.linalg.norm(rhs)) + 1e-300
    for _ in range(max_iter):
        if float(np.linalg.norm(r)) <= limit:
            break
        ap = apply(p)
        step = rz / float(p @ ap)
        x += step * p
        r -= step * ap
        z = r / precond
        rz_next = float(r @ z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return x


@dataclass(frozen=True)
class _Linear:
    """A fitted expert before calibration; ``predict`` gives the raw ridge output."""

    vocab: list[bytes]
    scale: FloatArray  # per word: idf, or 1 without idf weighting
    cue_weights: FloatArray  # raw units
    cue_means: FloatArray
    word_coef: FloatArray  # per word, on the scaled and normalised column
    lexical_mean: float
    intercept: float

    def predict(self, cues: FloatArray, features: Sequence[Features]) -> FloatArray:
        lex = _lexical(features, self.vocab, self.scale)
        lexical = lex.matvec(self.word_coef)
        return self.intercept + (cues - self.cue_means) @ self.cue_weights + (lexical - self.lexical_mean)


def _ridge(cues: FloatArray, features: Sequence[Features], target: FloatArray, cfg: FitConfig) -> _Linear:
    n = len(target)
    means = cues.mean(axis=0)
    stds = cues.std(axis=0)
    live = stds > _CONSTANT_STD
    prior_raw = np.array([CUE_PRIORS.get(name, 0.0) for name in FEATURE_NAMES])
    hs = (cues[:, live] - means[live]) / stds[live]
    u0 = prior_raw[live] * stds[live]

    vocab, idf = _vocabulary(features, cfg)
    scale = idf if cfg.idf else np.ones_like(idf)
    lex = _lexical(features, vocab, scale)
    lex_means = lex.rmatvec(np.ones(n)) / n
    y = target - target.mean()
    num_cues = hs.shape[1]

    def a_mul(z: FloatArray) -> FloatArray:
        u, b = z[:num_cues], z[num_cues:]
        out: FloatArray = hs @ u + lex.matvec(b) - float(lex_means @ b)
        return out

    def at_mul(r: FloatArray) -> FloatArray:
        return np.concatenate([hs.T @ r, lex.rmatvec(r) - lex_means * float(r.sum())])

    penalty = np.concatenate([np.full(num_cues, cfg.alpha_cues), np.full(len(vocab), cfg.alpha_lexical)])
    z0 = np.concatenate([u0, np.zeros(len(vocab))])
    # shrink towards z0: solve for d = z - z0 with the residual of the prior as target
    residual = y - a_mul(z0)
    rhs = at_mul(residual)
    lex_sq = np.bincount(lex.indices, weights=lex.data**2, minlength=len(vocab)) - n * lex_means**2
    precond = np.concatenate([np.full(num_cues, float(n)), np.maximum(lex_sq, 0.0)]) + penalty
    d = _cg(lambda v: at_mul(a_mul(v)) + penalty * v, rhs, precond)
    z = z0 + d

    weights = prior_raw.copy()
    weights[live] = z[:num_cues] / stds[live]
    return _Linear(
        vocab=vocab,
        scale=scale,
        cue_weights=weights,
        cue_means=means,
        word_coef=z[num_cues:],
        lexical_mean=float(lex_means @ z[num_cues:]),
        intercept=float(target.mean()),
    )


def _platt(raw: FloatArray, positive: NDArray[np.bool_]) -> tuple[float, float]:
    """Slope and offset of P(positive) = sigmoid(a * raw + b), by Newton's method with Platt's targets."""
    num_pos = int(positive.sum())
    num_neg = len(positive) - num_pos
    # Platt (1999): soft targets keep the fit finite when the classes separate
    t = np.where(positive, (num_pos + 1.0) / (num_pos + 2.0), 1.0 / (num_neg + 2.0))
    x = np.stack([raw, np.ones_like(raw)], axis=1)
    coef = np.array([0.0, math.log((num_pos + 1.0) / (num_neg + 1.0))])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ coef, -30.0, 30.0)))
        grad = x.T @ (p - t)
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        coef -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(coef[0]), float(coef[1])


# ------------------------------------------------------------------------------------------ fitting


def _group_target(
    gains: FloatArray, groups: Sequence[str] | None, folds: IntArray | None, cfg: FitConfig
) -> FloatArray:
    if groups is None or cfg.group_blend >= 1.0 or len(set(groups)) < 2:
        return gains
    g = np.asarray(groups, dtype=object)
    prior = np.empty_like(gains)
    fold_list = folds if folds is not None else np.zeros(len(gains), dtype=np.int64)
    for k in np.unique(fold_list):
        held = fold_list == k
        train = ~held if folds is not None else held
        overall = float(gains[train].mean())
        sums: dict[Any, float] = {}
        counts: dict[Any, int] = {}
        for name, value in zip(g[train], gains[train], strict=True):
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
        m = cfg.group_smoothing
        prior[held] = [(sums.get(name, 0.0) + m * overall) / (counts.get(name, 0) + m) for name in g[held]]
    return cfg.group_blend * gains + (1.0 - cfg.group_blend) * prior


def _fit_expert(
    cues: FloatArray,
    features: Sequence[Features],
    gains: FloatArray,
    groups: Sequence[str] | None,
    cfg: FitConfig,
) -> tuple[ExpertParams, FloatArray]:
    """The expert's parameters and its out-of-fold calibrated scores on its own rows."""
    n = len(gains)
    positive = gains > 0
    inner = fold_ids(positive.tolist(), cfg.calibration_folds, cfg.seed) if cfg.calibration_folds else None
    target = _group_target(gains, groups, inner, cfg)
    model = _ridge(cues, features, target, cfg)
    if inner is None:
        raw = model.predict(cues, features)
    else:
        raw = np.empty(n)
        for k in range(cfg.calibration_folds):
            held = inner == k
            train = np.flatnonzero(~held)
            sub_groups = None if groups is None else [groups[i] for i in train.tolist()]
            sub_target = _group_target(gains[train], sub_groups, inner[train], cfg)
            part = _ridge(cues[train], [features[i] for i in train.tolist()], sub_target, cfg)
            raw[held] = part.predict(cues[held], [f for f, h in zip(features, held, strict=True) if h])
    scale, offset = _platt(raw, positive)
    words = [t.decode("utf-8") for t in model.vocab]
    word_weights = model.word_coef * model.scale
    params = ExpertParams(
        intercept=model.intercept,
        cue_weights=tuple(float(w) for w in model.cue_weights),
        cue_means=tuple(float(m) for m in model.cue_means),
        word_weights={w: float(v) for w, v in zip(words, word_weights, strict=True)},
        lexical_mean=model.lexical_mean,
        scale=scale,
        offset=offset,
    )
    calibrated = 1.0 / (1.0 + np.exp(-np.clip(scale * raw + offset, -30.0, 30.0)))
    return params, calibrated


def _configs(config: FitConfig | Mapping[str, FitConfig] | None) -> Mapping[str, FitConfig]:
    if config is None:
        return DEFAULT_CONFIGS
    if isinstance(config, FitConfig):
        return dict.fromkeys(EXPERTS, config)
    unknown = set(config) - set(EXPERTS)
    if unknown:
        raise ConfigError(
            f"unknown experts {sorted(unknown)} in config; valid: {list(EXPERTS)}", field="config"
        )
    return {name: config.get(name, DEFAULT_CONFIGS[name]) for name in EXPERTS}


def _prepare(prompts: Sequence[str], labels: ArrayLike) -> tuple[list[Features], FloatArray, FloatArray]:
    gains = np.asarray(labels, dtype=np.float64).ravel()
    if len(gains) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(gains)} labels", field="labels")
    if not np.all(np.isfinite(gains)):
        raise ConfigError("labels must be finite numbers (strong minus weak quality)", field="labels")
    features = [extract(as_text(p)) for p in prompts]
    cues = np.array([f.values for f in features], dtype=np.float64).reshape(len(features), len(FEATURE_NAMES))
    return features, cues, gains


def _fit_features(
    features: Sequence[Features],
    cues: FloatArray,
    gains: FloatArray,
    groups: Sequence[str] | None,
    configs: Mapping[str, FitConfig],
) -> tuple[ComplexityParams, FloatArray]:
    choice = cues[:, _CHOICE_INDEX] > 0
    experts: dict[str, ExpertParams] = {}
    scores = np.empty(len(gains))
    used: dict[str, int] = {}
    for name, mask in (("open", ~choice), ("choice", choice)):
        cfg = configs[name]
        rows = np.flatnonzero(mask)
        fallback = len(rows) < cfg.min_expert_rows
        if fallback:
            rows = np.arange(len(gains))
        positive = int((gains[rows] > 0).sum())
        if positive == 0 or positive == len(rows):
            raise ConfigError(
                f"the {name} expert's {len(rows)} training prompts all have the same outcome; "
                "pass prompts where the strong tier helped and prompts where it did not",
                field="labels",
            )
        picked = rows.tolist()
        sub_groups = None if groups is None else [groups[i] for i in picked]
        params, calibrated = _fit_expert(
            cues[rows], [features[i] for i in picked], gains[rows], sub_groups, cfg
        )
        experts[name] = params
        used[name] = len(rows)
        scores[mask] = calibrated[mask] if fallback else calibrated
    quantiles = tuple(float(q) for q in np.quantile(scores, np.linspace(0.0, 1.0, 101)))
    metadata = {
        "rows": len(gains),
        "expert_rows": used,
        "configs": {name: asdict(configs[name]) for name in EXPERTS},
        "quantiles_from": "out-of-fold calibrated scores of the training prompts",
    }
    return ComplexityParams(experts=experts, score_quantiles=quantiles, metadata=metadata), scores


def fit(
    prompts: Sequence[str],
    labels: ArrayLike,
    *,
    groups: Sequence[str] | None = None,
    config: FitConfig | Mapping[str, FitConfig] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ComplexityParams:
    """Parameters for a ``ComplexityScorer`` fitted on ``prompts`` and their ``labels``.

    ``labels``: per prompt, the strong tier's quality minus the weak tier's (e.g. 1, 0 or -1 for
    right/wrong outcomes), or 1/0 flags "only the strong tier was good enough". ``groups``: an optional
    topic per prompt, used only while fitting (see the module docstring). ``config``: one ``FitConfig``
    for both experts or a mapping by expert name; the defaults are ``DEFAULT_CONFIGS``. ``metadata`` is
    stored with the parameters. Raises ``ConfigError`` for mismatched lengths, non-finite labels, or an
    expert whose prompts all have the same outcome.
    """
    features, cues, gains = _prepare(prompts, labels)
    if groups is not None and len(groups) != len(gains):
        raise ConfigError(f"{len(gains)} prompts but {len(groups)} groups", field="groups")
    params, _ = _fit_features(features, cues, gains, groups, _configs(config))
    if metadata:
        params = ComplexityParams(params.experts, params.score_quantiles, {**params.metadata, **metadata})
    return params


def cross_validate(
    prompts: Sequence[str],
    labels: ArrayLike,
    *,
    groups: Sequence[str] | None = None,
    strata: Sequence[Any] | None = None,
    config: FitConfig | Mapping[str, FitConfig] | None = None,
    num_folds: int = 5,
    seed: int = 0,
) -> CrossValidation:
    """Out-of-fold scores: ``num_folds`` fits, each scoring only the rows it was not fitted on.

    Folds are stratified by ``strata`` (e.g. the benchmark) and by ``labels > 0``. Everything learned
    from data (vocabulary, standardisation, group means, weights, calibration) comes from the training
    folds alone.
    """
    features, cues, gains = _prepare(prompts, labels)
    if groups is not None and len(groups) != len(gains):
        raise ConfigError(f"{len(gains)} prompts but {len(groups)} groups", field="groups")
    keys = [(s, bool(g > 0)) for s, g in zip(strata or [None] * len(gains), gains, strict=True)]
    folds = fold_ids(keys, num_folds, seed)
    configs = _configs(config)
    scores = np.empty(len(gains))
    logits = np.empty(len(gains))
    for k in range(num_folds):
        train = np.flatnonzero(folds != k)
        test = np.flatnonzero(folds == k)
        picked = train.tolist()
        sub_groups = None if groups is None else [groups[i] for i in picked]
        params, _ = _fit_features(
            [features[i] for i in picked], cues[train], gains[train], sub_groups, configs
        )
        scorer = ComplexityScorer(params)
        for i in test.tolist():
            z = scorer.logit(prompts[i])
            logits[i] = z
            scores[i] = 1.0 / (1.0 + math.exp(-min(max(z, -30.0), 30.0)))
    return CrossValidation(scores=scores, folds=folds, logits=logits)
