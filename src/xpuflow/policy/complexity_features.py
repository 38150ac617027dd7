"""Prompt features for the complexity scorer: a few dozen hand-built cues plus a set of lexical tokens.

``extract(prompt)`` turns one prompt into a ``Features`` value: ``values``, a tuple of floats in the order
of ``FEATURE_NAMES`` (each feature belongs to one of ``DIMENSIONS``, see ``FEATURE_DIMENSION``), and
``tokens``, the set of distinct lower-cased words (bytes) that the scorer looks up in its learned
vocabulary. Everything here is a pure function of the text.

Cost is the point of this module: the router scores every request, so extraction takes about 10 us
for a typical 300-character prompt and 20 us for 1 KB on one CPU core. It works on the UTF-8 bytes and
uses only C-level primitives (``bytes.translate``, ``bytes.split``, ``bytes.count``, set intersections):
CPython's ``re`` alone takes about as long to split 1 KB into words. Long prompts are analysed on a
bounded window, the first ``HEAD_CHARS`` and the last ``TAIL_CHARS`` characters (a question usually
sits at the end of a long context, its framing at the start), so a 1 MB prompt costs about what a 3 KB
one does; the length feature alone uses the full length, which is O(1).

Any ``str`` is accepted: empty, binary junk, NUL bytes, lone surrogates (encoded with
``errors="replace"``). ``bytes`` are decoded as UTF-8 with replacement first.

Example::

    f = extract("Prove step by step that the square root of 2 is irrational.")
    dict(zip(FEATURE_NAMES, f.values))["reasoning_cues"]   # log1p(2): "prove" and "step by step"
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from xpuflow.policy._lexicon import Lexicon

__all__ = [
    "DIMENSIONS",
    "FEATURE_DIMENSION",
    "FEATURE_NAMES",
    "HEAD_CHARS",
    "TAIL_CHARS",
    "Features",
    "as_text",
    "extract",
    "lexicon_masks",
    "scan_with",
]

HEAD_CHARS: Final = 2048
"""Characters analysed from the start of a long prompt."""
TAIL_CHARS: Final = 1024
"""Characters analysed from the end of a long prompt."""
CHARS_PER_TOKEN: Final = 4.0
"""The usual English estimate for BPE tokenisers; the length feature counts tokens this way."""

DIMENSIONS: Final = ("length", "math", "code", "reasoning", "entities", "negation", "format", "subject")
"""What ``ComplexityScorer.explain`` reports; ``subject`` holds the learned lexical (topic) cues."""

# (feature name, dimension), in the order of Features.values
_FEATURES: Final = (
    ("log_tokens", "length"),
    ("log_tokens_choice", "length"),
    ("log_tokens_squared", "length"),
    ("log_numbers", "math"),
    ("log_numbers_choice", "math"),
    ("longest_number", "math"),
    ("decimals", "math"),
    ("big_numbers", "math"),
    ("fractions", "math"),
    ("percent", "math"),
    ("currency", "math"),
    ("equations", "math"),
    ("math_terms", "math"),
    ("code_blocks", "code"),
    ("code_symbols", "code"),
    ("code_terms", "code"),
    ("reasoning_cues", "reasoning"),
    ("conditionals", "reasoning"),
    ("questions", "reasoning"),
    ("sentences", "reasoning"),
    ("lines", "reasoning"),
    ("capitalised_words", "entities"),
    ("negations", "negation"),
    ("constraints", "negation"),
    ("emphatic_negation", "negation"),
    ("multiple_choice", "format"),
)
FEATURE_NAMES: Final = tuple(name for name, _ in _FEATURES)
FEATURE_DIMENSION: Final = dict(_FEATURES)

# bytes.translate tables. _WORDS: letters lower-cased, other ASCII -> space, non-ASCII bytes kept so that
# words in other scripts stay tokens. _SHAPE: digits -> '0', capitals -> 'A', lower case -> 'a', rest kept.
# _DIGITS: digits -> '0', everything else -> space, so that split() yields one item per number.
_WORDS: Final = bytes(
    c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or c >= 128 else 32 for c in range(256)
)
_SHAPE: Final = bytes(
    48 if 48 <= c <= 57 else 65 if 65 <= c <= 90 else 97 if 97 <= c <= 122 else c for c in range(256)
)
_DIGITS: Final = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_MARKS: Final = b"%$={;?\n`.!/"
_NOT_MARKS: Final = bytes(c for c in range(256) if c not in _MARKS)


def _words(*items: str) -> frozenset[bytes]:
    return frozenset(w.encode() for item in items for w in item.split())


_MATH_TERMS: Final = _words(
    "equation equations solve solution integral integrate derivative differentiate polynomial matrix",
    "matrices vector eigenvalue probability expected variance theorem lemma prime primes sqrt root roots",
    "logarithm log exponent factor factorial modulo mod divisible remainder ratio proportion percentage",
    "sum product quotient calculate compute evaluate simplify function functions variable variables",
    "algebra geometry calculus triangle circle radius area volume angle perimeter sequence series limit",
    "inequality integer integers rational irrational real complex infinite finite convergent",
)
_CODE_TERMS: Final = _words(
    "def return import class function const var let public private static void int float bool",
    "printf println print elif lambda async await struct fn impl func namespace include template",
    "typedef nullptr null none true false self this new delete malloc free array list dict tuple",
    "python java javascript typescript rust golang sql select regex compile compiler runtime debug bug",
    "exception stack recursion recursive algorithm complexity pointer pointers iterator loop",
)
_REASONING_TERMS: Final = _words(
    "prove proof proofs derive derivation justify explain explanation reasoning reason why analyze",
    "analyse analysis compare contrast evaluate critique demonstrate infer deduce conclude hypothesis",
    "implies implication therefore hence consequently argument argue strategy optimal optimize plan",
)
_CONDITIONAL_TERMS: Final = _words("if then suppose assume assuming given unless whenever otherwise when")
_NEGATION_TERMS: Final = _words(
    "not no never none neither nor without except cannot nothing nobody isn aren wasn weren don doesn",
    "didn won wouldn shouldn couldn can hasn haven hadn false incorrect",
)
_CONSTRAINT_TERMS: Final = _words(
    "must exactly least most only require required requires limit maximum minimum within between",
    "constraint constraints condition conditions ensure guarantee always each every all both",
)
_FRACTION_TERMS: Final = _words("half halves third thirds quarter quarters fifth fifths twice double triple")

# one lexicon for all word cues: a single set intersection per prompt, then a tally over the few hits
_CUE_SETS: Final = (
    _FRACTION_TERMS,
    _MATH_TERMS,
    _CODE_TERMS,
    _REASONING_TERMS,
    _CONDITIONAL_TERMS,
    _NEGATION_TERMS,
    _CONSTRAINT_TERMS,
)
_CUE_INDEX: Final = {
    word: tuple(i for i, cue_set in enumerate(_CUE_SETS) if word in cue_set)
    for word in frozenset().union(*_CUE_SETS)
}
_CUE_WORDS: Final = frozenset(_CUE_INDEX)
# words whose presence gates a more expensive count; looked up in the same single pass as the cues
_FLAG_WORDS: Final = (b"step", b"not", b"percent")
_LOOKUP_WORDS: Final = _CUE_WORDS | frozenset(_FLAG_WORDS)
_LEXICON_BITS: Final = len(_CUE_SETS) + len(_FLAG_WORDS)


class Features(NamedTuple):
    """One prompt's cues: ``values`` in the order of ``FEATURE_NAMES``; ``words`` (in order, with
    repeats) for the vocabulary. Scoring intersects the vocabulary with ``words`` directly: building a
    set of every word first costs more than the whole lookup."""

    values: tuple[float, ...]
    words: list[bytes]

    @property
    def tokens(self) -> frozenset[bytes]:
        """The distinct words (for fitting)."""
        return frozenset(self.words)


def as_text(prompt: str | bytes | bytearray | memoryview) -> str:
    """The prompt as ``str``: bytes are decoded as UTF-8 with replacement, so no input is rejected.

    Raises ``TypeError`` for anything that is neither text nor bytes (a caller bug, not bad input).
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, bytes | bytearray | memoryview):
        return bytes(prompt).decode("utf-8", errors="replace")
    raise TypeError(f"a prompt must be str or bytes, not {type(prompt).__name__}")


def _window(text: str) -> bytes:
    if len(text) > HEAD_CHARS + TAIL_CHARS:
        text = text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]
    # "replace" turns lone surrogates (which str allows and UTF-8 does not) into '?'
    return text.encode("utf-8", errors="replace")


def extract(prompt: str) -> Features:
    """The features of ``prompt`` (see the module docstring); never raises for any ``str``."""
    raw = _window(prompt)
    words = raw.translate(_WORDS)
    word_list = words.split()
    present = _LOOKUP_WORDS.intersection(word_list)
    hits = [0] * _LEXICON_BITS
    for word in present:
        for i in _CUE_INDEX.get(word, ()):
            hits[i] += 1
    for i, word in enumerate(_FLAG_WORDS, len(_CUE_SETS)):
        hits[i] = word in present
    return Features(_values(prompt, raw, words, hits), word_list)


def lexicon_masks() -> dict[bytes, int]:
    """Each cue word's bit mask, for a word-lookup table such as the scorer's C ``Lexicon``: bit ``i``
    for the cue set ``i`` (fractions, math, code, reasoning, conditional, negation, constraint), then
    one bit each for "step", "not" and "percent"."""
    masks: dict[bytes, int] = {}
    for word in _LOOKUP_WORDS:
        bits = 0
        for i in _CUE_INDEX.get(word, ()):
            bits |= 1 << i
        for i, flag in enumerate(_FLAG_WORDS, len(_CUE_SETS)):
            if word == flag:
                bits |= 1 << i
        masks[word] = bits
    return masks


def scan_with(prompt: str, lexicon: Lexicon) -> tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]]:
    """``extract``'s values with the word lookups done by ``lexicon`` (built from ``lexicon_masks`` plus
    the experts' vocabularies): ``(values, sums, counts)``, the last two per expert (see ``Lexicon``)."""
    raw = _window(prompt)
    words = raw.translate(_WORDS)
    hits, sums, counts = lexicon.scan(words)
    return _values(prompt, raw, words, hits), sums, counts


def _values(prompt: str, raw: bytes, words: bytes, hits: Sequence[int]) -> tuple[float, ...]:
    """The cue values from the window and the counts of distinct cue words per bit of ``lexicon_masks``."""
    shape = raw.translate(_SHAPE)
    # the few ASCII symbols we count, extracted in one pass so that each count scans a short string
    marks = raw.translate(None, _NOT_MARKS)
    numbers = raw.translate(_DIGITS).split()
    log1p = math.log1p
    (
        fraction_hits,
        math_hits,
        code_hits,
        reasoning_hits,
        conditional_hits,
        negation_hits,
        constraint_hits,
        has_step,
        has_not,
        has_percent,
    ) = hits[:10]

    choice = 1.0 if (b"\nA. " in raw or b"\nA) " in raw or b"(A)" in raw) and b"B" in raw else 0.0
    log_tokens = log1p(len(prompt) / CHARS_PER_TOKEN)
    log_numbers = log1p(len(numbers))
    # each count scans the whole window: skip those that a cheap test shows would be zero
    longest = len(max(numbers)) if numbers else 0  # digit runs are all b"0...0", so max is the longest
    decimals = shape.count(b"0.0") if numbers else 0
    big_numbers = shape.count(b"0000") if longest >= 4 else 0
    fractions = shape.count(b"0/0") if numbers and b"/" in marks else 0
    step_by_step = words.count(b"step by step") if has_step else 0
    emphatic = raw.count(b"NOT ") if has_not else 0
    return (
        log_tokens,
        log_tokens * choice,
        log_tokens * log_tokens / 10.0,
        log_numbers,
        log_numbers * choice,
        log1p(longest),
        log1p(decimals),
        log1p(big_numbers),
        log1p(fractions + fraction_hits),
        log1p(marks.count(b"%") + (1 if has_percent else 0)),
        log1p(marks.count(b"$")),
        log1p(marks.count(b"=")),
        log1p(math_hits),
        log1p(marks.count(b"```")),
        log1p(marks.count(b"{") + marks.count(b";")),
        log1p(code_hits),
        log1p(reasoning_hits + step_by_step),
        log1p(conditional_hits),
        log1p(marks.count(b"?")),
        log1p(marks.count(b".") + marks.count(b"!")),
        log1p(marks.count(b"\n")),
        log1p(shape.count(b" A")),
        log1p(negation_hits),
        log1p(constraint_hits),
        log1p(emphatic),
        choice,
    )
