"""The complexity scorer's C word lookups (``xpuflow.policy._lexicon``) against its pure-Python path."""

from __future__ import annotations

import csv
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.errors import ConfigError
from xpuflow.policy.complexity import ComplexityScorer
from xpuflow.policy.complexity_features import extract, lexicon_masks, scan_with

CALIBRATION_CSV = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "routellm_calibration.csv"
)

try:
    from xpuflow.policy._lexicon import Lexicon
except ImportError:  # optional extension: required below when a C compiler is here
    Lexicon = None  # type: ignore[assignment,misc]

needs_lexicon = pytest.mark.skipif(Lexicon is None, reason="the C extension is not built (no C compiler)")


def test_the_extension_is_built_wherever_a_compiler_is() -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the pure-Python path serves")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no Python headers (Debian: python3-dev): the pure-Python path serves")
    assert Lexicon is not None, (
        "a C compiler is present but xpuflow.policy._lexicon is not importable: reinstall with "
        "`pip install -e .` (setup.py builds it)"
    )
    assert ComplexityScorer().accelerated


@needs_lexicon
def test_scan_counts_each_distinct_word_once_per_cue_set_and_sums_expert_weights() -> None:
    lex = Lexicon(
        [b"prove", b"not", b"zebra", b"yak"],
        [1 << 3, 1 << 8, 0, 0],
        [0.5, math.nan, math.nan, math.nan, 1.0, 2.0, math.nan, 4.0],
        2,
    )
    assert lex.size() == 4
    cues, sums, counts = lex.scan(b"  prove zebra prove   not zebra yak cat ")
    assert cues[3] == 1 and cues[8] == 1 and sum(cues) == 2  # noqa: PT018
    assert sums == (1.5, 6.0)  # expert 0: prove + zebra; expert 1: zebra + yak
    assert counts == (2, 2)
    # a fresh scan starts from zero: nothing of the previous one carries over
    assert lex.scan(b"yak") == ((0,) * 16, (0.0, 4.0), (0, 1))
    assert lex.scan(b"") == ((0,) * 16, (0.0, 0.0), (0, 0))


@needs_lexicon
def test_bad_lexicons_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Lexicon([b"a", b"a"], [0, 0], [0.0, 0.0], 1)
    with pytest.raises(ValueError, match="one int per word"):
        Lexicon([b"a"], [0], [0.0], 2)
    with pytest.raises(ValueError, match="16 cue sets"):
        Lexicon([b"a"], [1 << 16], [0.0], 1)
    with pytest.raises(TypeError, match="bytes"):
        Lexicon(["a"], [0], [0.0], 1)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="num_experts"):
        Lexicon([], [], [], 0)
    lex = Lexicon([b"a"], [0], [1.0], 1)
    with pytest.raises(TypeError, match="bytes"):
        lex.scan("a")  # type: ignore[arg-type]


@needs_lexicon
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_the_c_path_scores_any_text_as_the_python_path_does(text: str) -> None:
    fast, slow = ComplexityScorer(), ComplexityScorer(accelerated=False)
    assert (fast.accelerated, slow.accelerated) == (True, False)
    assert fast.logit(text) == pytest.approx(slow.logit(text), abs=1e-9)


@needs_lexicon
def test_the_c_path_gives_the_same_features_on_real_prompts() -> None:
    prompts = [
        "Prove step by step that the square root of 2 is NOT rational, unless you cannot.",
        "Which is correct?\nA. 50% of $20\nB) 3/4 of 12\n(C) none",
        "def f(x): return {x; x}  # why does this fail? " * 40,
        "x" * 10_000 + " percent",
    ]
    if CALIBRATION_CSV.is_file():
        with CALIBRATION_CSV.open(newline="", encoding="utf-8") as fh:
            prompts += [row["prompt"] for _, row in zip(range(400), csv.DictReader(fh), strict=False)]
    scorer = ComplexityScorer()
    lexicon = scorer._lexicon
    for prompt in prompts:
        values, _, _ = scan_with(prompt, lexicon)
        assert values == extract(prompt).values
        assert scorer.score(prompt) == pytest.approx(
            ComplexityScorer(accelerated=False).score(prompt), abs=1e-12
        )


def test_accelerated_can_be_turned_off_or_required() -> None:
    assert not ComplexityScorer(accelerated=False).accelerated
    params = ComplexityScorer().params
    assert not ComplexityScorer(params, accelerated=False).accelerated
    if Lexicon is None:
        with pytest.raises(ConfigError, match="C extension"):
            ComplexityScorer(accelerated=True)
    else:
        assert ComplexityScorer(params, accelerated=True).accelerated


def test_every_cue_word_has_a_mask_within_sixteen_bits() -> None:
    masks = lexicon_masks()
    assert masks[b"prove"] and masks[b"step"] and masks[b"percent"]  # noqa: PT018
    assert all(0 <= m < 1 << 16 for m in masks.values())
