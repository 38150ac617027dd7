"""The complexity scorer: how much a prompt needs the strong tier, in microseconds and without a model.

``ComplexityScorer().score(prompt)`` is a float in [0, 1]; higher means the strong tier is more likely
to be needed. With the shipped parameters it is a calibrated probability that only the strong model
answers well (on the calibration data: GPT-4 right and Mixtral-8x7B wrong)::

    scorer = ComplexityScorer()                  # the shipped default parameters
    scorer.score("hi")                           # 0.07
    why = scorer.explain("Prove that sqrt(2) is irrational, step by step.")
    why.score, why.contributions["reasoning"]    # 0.35, +0.97 (logit units)
    why.bias + sum(why.contributions.values()) == why.logit     # up to float rounding
    scorer.threshold_for_strong_share(0.3)       # 0.19: the score above which 30% of calibration
                                                 # prompts fell, i.e. about 30% strong calls

How it scores (``docs/complexity.md`` has the details and the measured figures):

1. ``complexity_features.extract`` reads cues from the text: length in tokens, numbers and other math
   cues, code, reasoning depth, named entities, negation and constraints, the prompt's format, and the
   set of its words.
2. The format (a multiple-choice question or an open prompt) picks one of two experts, each a linear
   model fitted by ``complexity_fit`` with cross-validated ridge regression of the strong tier's quality
   gain: a weight per cue plus a weight per word of a learned vocabulary (the ``subject`` dimension:
   which topics the weak model finds hard), the words' sum divided by the square root of their number
   (binary bag of words, L2-normalised).
3. A per-expert logistic map (Platt scaling, fitted out of fold) turns that into a probability.

``explain`` reports each dimension's contribution to the logit relative to an average calibration prompt
of the same expert: ``logit = bias + sum(contributions)`` and ``score = 1 / (1 + exp(-logit))``, where
``bias`` is the logit of that average prompt.

Scoring is pure and never raises for any ``str`` (or ``bytes``); long prompts are analysed on a bounded
window (see ``complexity_features``), so a 1 MB prompt costs about what a 3 KB one does.
"""

from __future__ import annotations

import gzip
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Final

from xpuflow.errors import ConfigError
from xpuflow.policy.complexity_features import (
    DIMENSIONS,
    FEATURE_DIMENSION,
    FEATURE_NAMES,
    as_text,
    extract,
    lexicon_masks,
    scan_with,
)

__all__ = [
    "DEFAULT_PARAMS_FILE",
    "EXPERTS",
    "ComplexityParams",
    "ComplexityScorer",
    "ExpertParams",
    "Explanation",
]

DEFAULT_PARAMS_FILE: Final = "complexity_default.json"
"""The shipped parameters, in ``xpuflow/data/``."""
FORMAT_NAME: Final = "xpuflow-complexity"
FORMAT_VERSION: Final = 1
EXPERTS: Final = ("open", "choice")
"""Expert names: ``choice`` scores multiple-choice questions, ``open`` every other prompt."""

_CHOICE_INDEX: Final = FEATURE_NAMES.index("multiple_choice")
_LOGIT_LIMIT: Final = 30.0


@dataclass(frozen=True)
class ExpertParams:
    """One expert's linear model, in the units of the raw features.

    ``raw = intercept + sum(cue_weights[j] * (x[j] - cue_means[j])) + (lexical - lexical_mean)`` where
    ``lexical = sum(word_weights[w] for w in found) / sqrt(len(found))`` over the distinct words of the
    prompt found in the vocabulary (0 when none is). ``logit = scale * raw + offset``.
    """

    intercept: float
    cue_weights: tuple[float, ...]
    cue_means: tuple[float, ...]
    word_weights: Mapping[str, float]
    lexical_mean: float
    scale: float
    offset: float

    def to_dict(self) -> dict[str, Any]:
        words = {w: round(v, 6) for w, v in self.word_weights.items()}
        return {
            "intercept": self.intercept,
            "cue_weights": dict(zip(FEATURE_NAMES, self.cue_weights, strict=True)),
            "cue_means": dict(zip(FEATURE_NAMES, self.cue_means, strict=True)),
            "words": words,
            "lexical_mean": self.lexical_mean,
            "scale": self.scale,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertParams:
        weights = data["cue_weights"]
        means = data["cue_means"]
        missing = [n for n in FEATURE_NAMES if n not in weights or n not in means]
        if missing:
            raise ConfigError(
                f"complexity parameters lack the features {missing}; refit them with this version"
            )
        words: Mapping[str, float] = data["words"]
        return cls(
            intercept=float(data["intercept"]),
            cue_weights=tuple(float(weights[n]) for n in FEATURE_NAMES),
            cue_means=tuple(float(means[n]) for n in FEATURE_NAMES),
            word_weights={w: float(v) for w, v in words.items()},
            lexical_mean=float(data["lexical_mean"]),
            scale=float(data["scale"]),
            offset=float(data["offset"]),
        )


@dataclass(frozen=True)
class ComplexityParams:
    """Everything a ``ComplexityScorer`` needs: one ``ExpertParams`` per name in ``EXPERTS``.

    ``score_quantiles`` are the scores of the calibration prompts at 0%, 1%, ..., 100%;
    ``metadata`` records how and on what the parameters were fitted.
    """

    experts: Mapping[str, ExpertParams]
    score_quantiles: tuple[float, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "feature_names": list(FEATURE_NAMES),
            "experts": {name: self.experts[name].to_dict() for name in EXPERTS},
            "score_quantiles": [round(q, 6) for q in self.score_quantiles],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComplexityParams:
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ConfigError(
                f"not complexity parameters of format {FORMAT_NAME} v{FORMAT_VERSION} "
                f"(got {data.get('format')!r} v{data.get('version')!r}); refit them with complexity_fit.fit"
            )
        missing = [name for name in EXPERTS if name not in data.get("experts", {})]
        if missing:
            raise ConfigError(f"complexity parameters lack the experts {missing}; refit them")
        return cls(
            experts={name: ExpertParams.from_dict(data["experts"][name]) for name in EXPERTS},
            score_quantiles=tuple(float(q) for q in data.get("score_quantiles", ())),
            metadata=dict(data.get("metadata", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write the parameters as JSON (gzip-compressed when ``path`` ends in ``.gz``)."""
        target = Path(path)
        text = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)
        if target.suffix == ".gz":
            target.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
        else:
            target.write_text(text, encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> ComplexityParams:
        """Read parameters written by ``save``; a bad file raises ``ConfigError`` naming it."""
        source = Path(path)
        try:
            raw = source.read_bytes()
            if source.suffix == ".gz":
                raw = gzip.decompress(raw)
            data = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(f"cannot read complexity parameters from {source}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"malformed complexity parameters in {source}: {exc!r}; refit them") from exc


@lru_cache(maxsize=1)
def _default_params() -> ComplexityParams:
    ref = resources.files("xpuflow") / "data" / DEFAULT_PARAMS_FILE
    with resources.as_file(ref) as path:
        return ComplexityParams.load(path)


@dataclass(frozen=True)
class Explanation:
    """Why a prompt got its score: ``logit = bias + sum(contributions.values())``, ``score = sigmoid(logit)``.

    ``contributions`` maps every name in ``complexity_features.DIMENSIONS`` to its push on the logit
    relative to an average calibration prompt (positive = towards the strong tier); ``bias`` is the
    logit of that average prompt. ``features`` holds the raw cue values, ``words`` the vocabulary words
    found with their weights (in logit units before normalisation), strongest first.
    """

    score: float
    logit: float
    bias: float
    expert: str
    contributions: Mapping[str, float]
    features: Mapping[str, float]
    words: tuple[tuple[str, float], ...]


class _Expert:
    """ExpertParams folded into what the hot path needs: scaled weights and one constant."""

    __slots__ = ("constant", "cue_weights", "keys", "params", "weights")

    def __init__(self, params: ExpertParams) -> None:
        self.params = params
        s = params.scale
        self.cue_weights = tuple(s * w for w in params.cue_weights)
        self.weights = {w.encode("utf-8", "surrogatepass"): s * v for w, v in params.word_weights.items()}
        self.keys = frozenset(self.weights)
        self.constant = params.offset + s * (
            params.intercept
            - sum(w * m for w, m in zip(params.cue_weights, params.cue_means, strict=True))
            - params.lexical_mean
        )


def _compile(params: ComplexityParams) -> tuple[_Expert, ...]:
    return tuple(_Expert(params.experts[name]) for name in EXPERTS)


def _lexicon_class() -> Any:
    """The C ``Lexicon`` when the extension was built (it is optional), else ``None``."""
    try:
        from xpuflow.policy._lexicon import Lexicon
    except ImportError:
        return None
    return Lexicon


def _build_lexicon(experts: Sequence[_Expert]) -> Any:
    """One C table for the cue words and every expert's vocabulary, or ``None`` without the extension."""
    lexicon_class = _lexicon_class()
    if lexicon_class is None:
        return None
    masks = lexicon_masks()
    words = sorted(masks.keys() | set().union(*(e.weights for e in experts)))
    nan = math.nan
    weights = [e.weights.get(w, nan) for w in words for e in experts]
    return lexicon_class(words, [masks.get(w, 0) for w in words], weights, len(experts))


@lru_cache(maxsize=1)
def _default_compiled() -> tuple[ComplexityParams, tuple[_Expert, ...], Any]:
    params = _default_params()
    experts = _compile(params)
    return params, experts, _build_lexicon(experts)


class ComplexityScorer:
    """Scores prompts with ``params`` (default: the shipped ``data/complexity_default.json``).

    The word lookups run in a small C extension when it was built at install time (``accelerated``:
    ``None`` uses it when present, ``False`` never, ``True`` requires it); the pure-Python path gives the
    same scores (to rounding) about twice as slowly. Instances are immutable and safe to share between
    threads (the C lookup holds the GIL).
    """

    __slots__ = ("_experts", "_lexicon", "params")

    def __init__(self, params: ComplexityParams | None = None, *, accelerated: bool | None = None) -> None:
        if params is None:
            # the default is read and compiled once per process, so constructing one per request is free
            self.params, self._experts, lexicon = _default_compiled()
        else:
            self.params = params
            self._experts = _compile(params)
            lexicon = None if accelerated is False else _build_lexicon(self._experts)
        self._lexicon = None if accelerated is False else lexicon
        if accelerated and self._lexicon is None:
            raise ConfigError(
                "the complexity scorer's C extension (xpuflow.policy._lexicon) is not built; reinstall "
                "xpuflow with a C compiler present (pip install -e .), or pass accelerated=None"
            )

    @property
    def accelerated(self) -> bool:
        """Whether the word lookups run in the C extension."""
        return self._lexicon is not None

    @classmethod
    def from_file(cls, path: str | Path) -> ComplexityScorer:
        """A scorer with parameters from a file written by ``ComplexityParams.save``.

        Raises ``ConfigError`` naming the file when it is missing, unreadable or not such parameters.
        """
        return cls(ComplexityParams.load(path))

    def logit(self, prompt: str | bytes) -> float:
        """The log-odds behind ``score``; any real number."""
        if self._lexicon is not None:
            values, sums, counts = scan_with(as_text(prompt), self._lexicon)
            e = 1 if values[_CHOICE_INDEX] else 0
            expert = self._experts[e]
            total: float = expert.constant + sum(map(operator.mul, expert.cue_weights, values))
            if counts[e]:
                total += sums[e] / math.sqrt(counts[e])
            return total
        features = extract(as_text(prompt))
        values = features.values
        expert = self._experts[1] if values[_CHOICE_INDEX] else self._experts[0]
        total = expert.constant + sum(map(operator.mul, expert.cue_weights, values))
        found = expert.keys.intersection(features.words)
        n = len(found)
        if n:
            # one C call fetches every weight (a Python-level loop over ~60 words costs ~2 us more)
            got = operator.itemgetter(*found)(expert.weights)
            total += (got if n == 1 else sum(got)) / math.sqrt(n)
        return float(total)

    def score(self, prompt: str | bytes) -> float:
        """How much ``prompt`` needs the strong tier, in [0, 1]; never raises for ``str`` or ``bytes``."""
        z = self.logit(prompt)
        z = min(max(z, -_LOGIT_LIMIT), _LOGIT_LIMIT)
        return 1.0 / (1.0 + math.exp(-z))

    def explain(self, prompt: str | bytes) -> Explanation:
        """The score with each dimension's contribution (see ``Explanation``)."""
        features = extract(as_text(prompt))
        values = features.values
        choice = bool(values[_CHOICE_INDEX])
        name = EXPERTS[1] if choice else EXPERTS[0]
        expert = self._experts[1] if choice else self._experts[0]
        p = expert.params
        contributions = dict.fromkeys(DIMENSIONS, 0.0)
        for feature, w, x, m in zip(FEATURE_NAMES, p.cue_weights, values, p.cue_means, strict=True):
            contributions[FEATURE_DIMENSION[feature]] += p.scale * w * (x - m)
        found = sorted(expert.keys.intersection(features.words))
        lexical = 0.0
        words: list[tuple[str, float]] = []
        if found:
            lexical = sum(expert.weights[w] for w in found) / math.sqrt(len(found))
            words = [(w.decode("utf-8", errors="replace"), expert.weights[w]) for w in found]
            words.sort(key=lambda item: -abs(item[1]))
        contributions["subject"] += lexical - p.scale * p.lexical_mean
        bias = p.offset + p.scale * p.intercept
        logit = bias + sum(contributions.values())
        clipped = min(max(logit, -_LOGIT_LIMIT), _LOGIT_LIMIT)
        return Explanation(
            score=1.0 / (1.0 + math.exp(-clipped)),
            logit=logit,
            bias=bias,
            expert=name,
            contributions=contributions,
            features=dict(zip(FEATURE_NAMES, values, strict=True)),
            words=tuple(words),
        )

    def threshold_for_strong_share(self, share: float) -> float:
        """The score above which ``share`` of the calibration prompts fell (e.g. 0.3 -> 30% strong calls).

        Raises ``ConfigError`` when ``share`` is outside [0, 1] or the parameters carry no quantiles.
        """
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"share must be in [0, 1], got {share}", field="share")
        q = self.params.score_quantiles
        if len(q) < 2:
            raise ConfigError("these complexity parameters carry no score quantiles; refit them")
        position = (1.0 - share) * (len(q) - 1)
        low = math.floor(position)
        high = min(low + 1, len(q) - 1)
        return q[low] + (q[high] - q[low]) * (position - low)
