"""The complexity scorer: shipped parameters, bad input, explain(), fitting, and the routing metrics."""

from __future__ import annotations

import csv
import math
import random
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.errors import ConfigError
from xpuflow.policy.complexity import (
    DEFAULT_PARAMS_FILE,
    EXPERTS,
    ComplexityParams,
    ComplexityScorer,
)
from xpuflow.policy.complexity_features import (
    DIMENSIONS,
    FEATURE_DIMENSION,
    FEATURE_NAMES,
    HEAD_CHARS,
    TAIL_CHARS,
    extract,
)
from xpuflow.policy.complexity_fit import FitConfig, cross_validate, fit, fold_ids
from xpuflow.policy.routing_metrics import apgr, auroc, bootstrap_ci, cpt, pgr_curve

HARD = (
    "Prove step by step that for every prime p > 3, p^2 - 1 is divisible by 24. Justify each lemma, "
    "consider the cases p = 1 mod 6 and p = 5 mod 6 separately, and do not assume the result for p = 5. "
    "Then derive a closed form for the sum of 1/(k(k+1)) for k = 1 to n and prove it by induction."
)
ONE_MB = ("Solve 3x + 7 = 22 and explain. " * 40_000)[: 1 << 20]
CALIBRATION_CSV = Path(__file__).resolve().parents[2].parent / "shared/data/routing/routellm_calibration.csv"


@pytest.fixture(scope="module")
def scorer() -> ComplexityScorer:
    return ComplexityScorer()


# ------------------------------------------------------------------------------------------ shipped file


def test_shipped_parameters_load_and_are_small() -> None:
    ref = resources.files("xpuflow").joinpath("data", DEFAULT_PARAMS_FILE)
    with resources.as_file(ref) as path:
        assert path.stat().st_size < 500_000
        params = ComplexityParams.load(path)
    assert set(params.experts) == set(EXPERTS)
    assert len(params.score_quantiles) == 101
    assert list(params.score_quantiles) == sorted(params.score_quantiles)
    for expert in params.experts.values():
        assert len(expert.cue_weights) == len(FEATURE_NAMES)
        assert 0 < len(expert.word_weights) <= 10_000
        assert expert.scale > 0  # a higher ridge output means more need of the strong tier


def test_every_feature_has_a_dimension() -> None:
    assert set(FEATURE_DIMENSION) == set(FEATURE_NAMES)
    assert set(FEATURE_DIMENSION.values()) <= set(DIMENSIONS)
    for required in ("length", "math", "code", "reasoning", "entities", "negation"):
        assert required in DIMENSIONS


# ------------------------------------------------------------------------------------------ scoring


def test_hard_proof_scores_higher_than_a_greeting(scorer: ComplexityScorer) -> None:
    assert scorer.score(HARD) > scorer.score("hi")


def test_long_multi_step_word_problem_beats_a_one_liner(scorer: ComplexityScorer) -> None:
    easy = "What is 2 + 2?"
    hard = (
        "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
        "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
        "fresh duck egg. Her brother Tom buys a third of what is left each Sunday at half price. "
        "How many dollars does she make every week at the farmers' market?"
    )
    assert scorer.score(hard) > scorer.score(easy)


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        " ",
        "\x00" * 100,
        "abc\x00def",
        "\ud800\udfff lone surrogates \udc80",
        "🙂" * 500,
        "\n\nA. \nB. \nAnswer:",
        "".join(chr(c) for c in range(0, 0x3000, 7)),
        bytes(range(256)).decode("latin-1"),
        "1" * 50_000,
        "a" * 50_000,
    ],
)
def test_bad_input_scores_in_range(scorer: ComplexityScorer, prompt: str) -> None:
    score = scorer.score(prompt)
    assert 0.0 <= score <= 1.0
    assert math.isfinite(scorer.logit(prompt))


def test_bytes_are_decoded_not_rejected(scorer: ComplexityScorer) -> None:
    junk = bytes(random.Random(0).randrange(256) for _ in range(4096))
    assert 0.0 <= scorer.score(junk) <= 1.0
    assert scorer.score(b"hello world") == scorer.score("hello world")


def test_non_text_is_a_type_error(scorer: ComplexityScorer) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        scorer.score(None)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_scores_in_range(prompt: str) -> None:
    score = ComplexityScorer().score(prompt)
    assert 0.0 <= score <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=5000))
def test_any_bytes_score_in_range(data: bytes) -> None:
    assert 0.0 <= ComplexityScorer().score(data) <= 1.0


def test_one_megabyte_prompt_is_scored_in_bounded_time(scorer: ComplexityScorer) -> None:
    scorer.score(ONE_MB)
    start = time.perf_counter()
    score = scorer.score(ONE_MB)
    elapsed_s = time.perf_counter() - start
    assert 0.0 <= score <= 1.0
    assert elapsed_s < 0.05


def test_long_prompts_are_analysed_on_a_window_but_measured_in_full() -> None:
    head = "word " * (HEAD_CHARS // 5)
    middle_a = "zebra " * 10_000
    middle_b = "quokka " * 20_000
    tail = "final question?" + " " * TAIL_CHARS
    a, b = extract(head + middle_a + tail), extract(head + middle_b + tail)
    assert b"zebra" not in a.tokens
    assert b"quokka" not in b.tokens
    length = FEATURE_NAMES.index("log_tokens")
    assert b.values[length] > a.values[length]


def test_scoring_is_deterministic() -> None:
    first = [ComplexityScorer().score(p) for p in (HARD, "hi", ONE_MB[:5000])]
    second = [ComplexityScorer().score(p) for p in (HARD, "hi", ONE_MB[:5000])]
    assert first == second


def test_default_scorer_is_cheap_to_construct_per_request() -> None:
    ComplexityScorer()
    start = time.perf_counter()
    for _ in range(1000):
        ComplexityScorer()
    assert time.perf_counter() - start < 0.5  # the parameters are read and compiled once per process
    assert ComplexityScorer().params is ComplexityScorer().params


def test_a_1kb_prompt_scores_in_microseconds(scorer: ComplexityScorer) -> None:
    prompt = (HARD + " ") * 3
    prompt = prompt[:1024]
    calls = 2000
    start = time.perf_counter()
    for _ in range(calls):
        scorer.score(prompt)
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    assert per_call_us < 500  # generous: shared CI machines; the benchmark measures the real figure


# ------------------------------------------------------------------------------------------ explain


@pytest.mark.parametrize(
    "prompt",
    [
        HARD,
        "hi",
        "",
        "Which is NOT a prime?\nA. 2\nB. 3\nC. 9\nD. 11\nAnswer:",
        "```python\ndef f(): pass\n```",
    ],
)
def test_explain_contributions_sum_to_the_logit(scorer: ComplexityScorer, prompt: str) -> None:
    why = scorer.explain(prompt)
    assert set(why.contributions) == set(DIMENSIONS)
    assert why.bias + sum(why.contributions.values()) == pytest.approx(why.logit, abs=1e-9)
    assert why.logit == pytest.approx(scorer.logit(prompt), abs=1e-9)
    assert why.score == pytest.approx(scorer.score(prompt), abs=1e-12)
    assert why.score == pytest.approx(1 / (1 + math.exp(-why.logit)), abs=1e-12)
    assert why.expert in EXPERTS


def test_explain_picks_the_choice_expert_for_multiple_choice(scorer: ComplexityScorer) -> None:
    why = scorer.explain("Which is largest?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert why.expert == "choice"
    assert scorer.explain("hi").expert == "open"


def test_explain_reports_reasoning_and_code_cues(scorer: ComplexityScorer) -> None:
    why = scorer.explain(HARD)
    assert why.features["reasoning_cues"] > 0
    assert why.contributions["reasoning"] > 0  # the prior keeps unseen reasoning cues pointing upwards
    code = scorer.explain("Fix this:\n```python\ndef f(x):\n    return {x: 1};\n```\nWhy does it crash?")
    assert code.features["code_blocks"] > 0
    assert code.contributions["code"] > 0


def test_threshold_for_strong_share(scorer: ComplexityScorer) -> None:
    shares = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    thresholds = [scorer.threshold_for_strong_share(s) for s in shares]
    assert thresholds == sorted(thresholds, reverse=True)
    assert all(0.0 <= t <= 1.0 for t in thresholds)
    with pytest.raises(ConfigError):
        scorer.threshold_for_strong_share(1.5)


# ------------------------------------------------------------------------------------------ fitting

TOPICS = ("apples", "trains", "paint", "rivers", "music", "stamps")


def synthetic(n: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    """Prompts where 'zebra' and length make the strong tier win; everything else is noise."""
    rng = random.Random(seed)
    prompts, gains, groups = [], [], []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        words = [rng.choice(TOPICS) for _ in range(rng.randint(3, 30))]
        hard = rng.random() < 0.4
        if hard:
            words.insert(rng.randrange(len(words)), "zebra")
        p_gain = 0.8 if hard else 0.1
        gains.append(1.0 if rng.random() < p_gain else (-1.0 if rng.random() < 0.1 else 0.0))
        prompts.append(f"Tell me about {topic}: " + " ".join(words) + "?")
        groups.append(topic)
    return prompts, np.array(gains), groups


def test_fit_recovers_a_planted_word() -> None:
    prompts, gains, _ = synthetic(400, seed=1)
    params = fit(prompts, gains, config=FitConfig(alpha_lexical=1.0, calibration_folds=3))
    assert params.experts["open"].word_weights["zebra"] > 0
    test_prompts, test_gains, _ = synthetic(300, seed=2)
    scorer = ComplexityScorer(params)
    scores = [scorer.score(p) for p in test_prompts]
    assert auroc(scores, test_gains > 0) > 0.8
    zebra = np.array(["zebra" in p for p in test_prompts])
    # calibrated: the mean score tracks the observed rate on each side
    assert np.mean(np.array(scores)[zebra]) == pytest.approx(np.mean(test_gains[zebra] > 0), abs=0.15)
    assert np.mean(np.array(scores)[~zebra]) == pytest.approx(np.mean(test_gains[~zebra] > 0), abs=0.15)


def test_max_df_leaves_out_words_that_nearly_every_prompt_has() -> None:
    prompts, gains, _ = synthetic(400, seed=1)  # every prompt says "Tell me about"
    kept = fit(prompts, gains, config=FitConfig(calibration_folds=0)).experts["open"].word_weights
    pruned = (
        fit(prompts, gains, config=FitConfig(calibration_folds=0, max_df=0.5)).experts["open"].word_weights
    )
    assert {"tell", "me", "about"} <= set(kept)
    assert not {"tell", "me", "about"} & set(pruned)
    assert "zebra" in pruned  # in about 40% of the prompts
    with pytest.raises(ConfigError, match="max_df"):
        FitConfig(max_df=0.0)


def test_fit_round_trips_through_a_file(tmp_path) -> None:
    prompts, gains, groups = synthetic(200, seed=3)
    params = fit(prompts, gains, groups=groups, config=FitConfig(calibration_folds=0), metadata={"who": "t"})
    for name in ("p.json", "p.json.gz"):
        path = params.save(tmp_path / name)
        again = ComplexityScorer.from_file(path)
        assert again.params.metadata["who"] == "t"
        for p in prompts[:20]:
            assert again.score(p) == pytest.approx(
                ComplexityScorer(params).score(p), abs=1e-4
            )  # the file rounds weights


def test_cross_validate_scores_every_row_out_of_fold() -> None:
    prompts, gains, groups = synthetic(250, seed=4)
    cv = cross_validate(prompts, gains, groups=groups, num_folds=4, config=FitConfig(calibration_folds=0))
    assert cv.scores.shape == (250,)
    assert set(cv.folds.tolist()) == {0, 1, 2, 3}
    assert np.all((cv.scores >= 0) & (cv.scores <= 1))
    assert auroc(cv.logits, gains > 0) > 0.7


def test_fold_ids_balance_each_stratum() -> None:
    strata = ["a"] * 50 + ["b"] * 23
    folds = fold_ids(strata, 5, seed=0)
    for s in ("a", "b"):
        counts = np.bincount(folds[np.array(strata) == s], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_fit_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ConfigError, match="labels"):
        fit(["a", "b"], [1.0])
    with pytest.raises(ConfigError, match="same outcome"):
        fit([f"p {i}" for i in range(60)], np.zeros(60))
    with pytest.raises(ConfigError, match="finite"):
        fit(["a", "b"], [1.0, float("nan")])
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="refit"):
        ComplexityScorer.from_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ComplexityScorer.from_file(bad)


@pytest.mark.skipif(not CALIBRATION_CSV.is_file(), reason="the RouteLLM calibration data is not checked out")
def test_out_of_fold_apgr_on_the_calibration_data_meets_the_target() -> None:
    with CALIBRATION_CSV.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    prompts = [r["prompt"] for r in rows]
    weak = np.array([float(r["weak_score"]) for r in rows])
    strong = np.array([float(r["strong_score"]) for r in rows])
    bench = np.array([r["benchmark"] for r in rows])
    cv = cross_validate(
        prompts, strong - weak, groups=[r["category"] for r in rows], strata=bench.tolist(), seed=0
    )
    for name in ("gsm8k", "mmlu"):
        m = bench == name
        assert apgr(cv.logits[m], weak[m], strong[m]) >= 0.65, name


# ------------------------------------------------------------------------------------------ metrics

# 10 prompts; the strong model is always right, the weak one only on the 5 lowest-scored.
SCORES = np.arange(10.0)
WEAK = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=float)
STRONG = np.ones(10)


def test_pgr_curve_by_hand() -> None:
    curve = pgr_curve(SCORES, WEAK, STRONG)
    shares = [round(s, 10) for s, _ in curve]
    assert shares == [round(k / 10, 10) for k in range(11)]
    # top-k to strong recovers min(k, 5) of the 5 missing answers
    assert [round(p, 10) for _, p in curve] == [min(k, 5) / 5 for k in range(11)]


def test_apgr_by_hand() -> None:
    # trapezoid over PGR 0, .2, .4, .6, .8, 1, 1, 1, 1, 1, 1 at shares 0, .1, ..., 1
    assert apgr(SCORES, WEAK, STRONG) == pytest.approx(0.75)
    assert apgr(-SCORES, WEAK, STRONG) == pytest.approx(0.25)
    # one tied score: everything goes to the same model, the curve is the diagonal
    assert apgr(np.zeros(10), WEAK, STRONG) == pytest.approx(0.5)


def test_random_scores_average_one_half() -> None:
    rng = np.random.default_rng(0)
    weak = (rng.random(2000) < 0.6).astype(float)
    strong = (rng.random(2000) < 0.8).astype(float)
    values = [apgr(rng.random(2000), weak, strong) for _ in range(50)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.02)


def test_cpt_by_hand() -> None:
    # PGR 0.4 at share 0.2 and 0.6 at 0.3: half the gap at 0.25
    assert cpt(SCORES, WEAK, STRONG, 0.5) == pytest.approx(0.25)
    assert cpt(SCORES, WEAK, STRONG, 1.0) == pytest.approx(0.5)


def test_auroc_by_hand() -> None:
    assert auroc([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert auroc([1, 1], [0, 1]) == pytest.approx(0.5)
    assert auroc([3, 2, 1], [1, 0, 0]) == pytest.approx(1.0)
    assert math.isnan(auroc([1, 2], [1, 1]))


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="length"):
        apgr([1, 2], [1], [1, 1])
    with pytest.raises(ValueError, match="same quality"):
        apgr([1, 2], [1, 1], [1, 1])


def test_bootstrap_interval_contains_the_estimate() -> None:
    lo, hi = bootstrap_ci(apgr, (SCORES, WEAK, STRONG), rng=np.random.default_rng(0), num_resamples=200)
    assert lo <= 0.75 <= hi
