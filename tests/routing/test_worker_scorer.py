"""The pure worker scorer: filter reasons, score terms, staleness, herd avoidance, probes, affinity."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuflow.policy.worker_scorer import (
    NEUTRAL,
    ScoringWeights,
    WorkerNeeds,
    WorkerScorer,
    session_affinity,
)
from xpuflow.types import WorkerSnapshot

GIB = 1 << 30


def snap(worker_id: str, **fields: object) -> WorkerSnapshot:
    return WorkerSnapshot(worker_id=worker_id, deployment="chat", device=f"dev-{worker_id}", **fields)  # type: ignore[arg-type]


def choose(snapshots: list[WorkerSnapshot], seed: int = 0, **kw: object) -> str:
    choice = WorkerScorer(top_k=1).choose(snapshots, rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    assert choice.chosen is not None
    return choice.chosen.worker_id


# -- filter ----------------------------------------------------------------------------------------------


def test_every_filtered_worker_is_rejected_with_its_reason() -> None:
    snapshots = [
        snap("ok", max_seq_len=4096, free_memory_bytes=8 * GIB),
        snap("sick", healthy=False),
        snap("leaving", draining=True),
        snap("short", max_seq_len=512),
        snap("full", free_memory_bytes=1 * GIB),
        snap("sick-and-short", healthy=False, max_seq_len=512),
    ]
    choice = WorkerScorer().choose(
        snapshots, WorkerNeeds(tokens=1000, memory_bytes=2 * GIB), rng=random.Random(0)
    )
    assert choice.chosen is not None
    assert choice.chosen.worker_id == "ok"
    reasons = {a.candidate: a.reason for a in choice.rejected}
    assert set(reasons) == {"sick", "leaving", "short", "full", "sick-and-short"}
    assert "unhealthy" in reasons["sick"]
    assert "cooldown" in reasons["sick"]
    assert "draining" in reasons["leaving"]
    assert reasons["short"] == "needs 1000 tokens but its max_seq_len is 512"
    assert reasons["full"] == "needs 2.00 GiB but dev-full has 1.00 GiB free"
    assert "unhealthy" in reasons["sick-and-short"]
    assert "max_seq_len" in reasons["sick-and-short"]
    # The decision-ready view: the refused workers keep their reasons, without scores.
    assert {a.candidate for a in choice.alternatives()} == set(reasons)


def test_unknown_needs_and_unknown_capacity_are_not_checked() -> None:
    snapshots = [snap("a"), snap("b", max_seq_len=10, free_memory_bytes=None)]
    passed, rejected = WorkerScorer().filter(snapshots, WorkerNeeds(tokens=None, memory_bytes=5 * GIB))
    assert [s.worker_id for s in passed] == ["a", "b"]
    assert rejected == []


def test_available_flag_overrides_the_snapshot_health() -> None:
    snapshots = [snap("probe-me", healthy=False), snap("tripped", healthy=True)]
    passed, rejected = WorkerScorer().filter(snapshots, available={"probe-me": True, "tripped": False})
    assert [s.worker_id for s in passed] == ["probe-me"]
    assert [a.candidate for a in rejected] == ["tripped"]


def test_nothing_passes_gives_no_choice_and_all_reasons() -> None:
    choice = WorkerScorer().choose([snap("a", draining=True)], rng=random.Random(0))
    assert choice.chosen is None
    assert choice.ranked == ()
    assert [a.candidate for a in choice.rejected] == ["a"]


# -- score -----------------------------------------------------------------------------------------------


def test_faster_worker_wins_when_loads_are_equal() -> None:
    assert choose([snap("slow", ema_latency_ms=200.0), snap("fast", ema_latency_ms=20.0)]) == "fast"


def test_queue_depth_counts_in_batches() -> None:
    # 8 queued on a batch-of-8 worker is one batch ahead, like 1 queued on a batch-of-1 worker.
    scorer = WorkerScorer()
    ranked = scorer.score(
        [snap("wide", queue_depth=8, max_batch_size=8), snap("narrow", queue_depth=1, max_batch_size=1)]
    )
    assert ranked[0].terms["speed"] == pytest.approx(ranked[1].terms["speed"])
    assert choose([snap("busy", queue_depth=16), snap("idle", queue_depth=0)]) == "idle"


def test_load_of_a_server_that_batches_itself_is_its_share_of_in_flight_slots() -> None:
    # 8 requests in flight on a remote server that takes 64 is a light load, not a full batch ahead
    ranked = WorkerScorer().score(
        [
            snap("remote", ema_latency_ms=100.0, in_flight=8, max_batch_size=8, max_in_flight=64),
            snap("idle", ema_latency_ms=100.0, max_batch_size=8, max_in_flight=64),
        ]
    )
    terms = {r.worker_id: r.terms["speed"] for r in ranked}
    assert terms["remote"] == pytest.approx(1.0 / (1.0 + 8 / 64))
    batched = WorkerScorer().score(
        [
            snap("local", ema_latency_ms=100.0, in_flight=8, max_batch_size=8),
            snap("idle", ema_latency_ms=100.0),
        ]
    )
    assert {r.worker_id: r.terms["speed"] for r in batched}["local"] == pytest.approx(0.5)


def test_a_request_stuck_in_flight_raises_the_expected_time_and_keeps_growing() -> None:
    scorer = WorkerScorer()
    hung = snap("hung", ema_latency_ms=50.0, in_flight=1, oldest_in_flight_s=2.0, taken_at_s=10.0)
    fine = snap("fine", ema_latency_ms=50.0, in_flight=0, taken_at_s=10.0)
    terms = {r.worker_id: r.terms["speed"] for r in scorer.score([hung, fine], now_s=10.0)}
    assert terms["fine"] == 1.0
    assert terms["hung"] == pytest.approx(50.0 / (2000.0 * (1 + 1 / 1)))  # at least 2 s now, not 50 ms
    patient = WorkerScorer(staleness_half_life_s=1e9)  # no staleness blending: the age term alone
    later = {r.worker_id: r.terms["speed"] for r in patient.score([hung, fine], now_s=10.0 + 2.0)}
    assert later["hung"] < terms["hung"]  # the same snapshot, read later: the request is older still
    assert choose([hung, fine]) == "fine"


def test_a_worker_judged_slow_by_old_samples_drifts_back_to_the_median_and_is_tried_again() -> None:
    scorer = WorkerScorer()
    peers = [snap(w, ema_latency_ms=0.45, latency_sampled_at_s=100.0, taken_at_s=100.0) for w in ("a", "b")]
    cold = snap("cold", ema_latency_ms=95.0, latency_sampled_at_s=90.0, taken_at_s=100.0)
    assert scorer.latency_ms(cold, 0.45, now_s=90.0) == pytest.approx(95.0)
    assert scorer.latency_ms(cold, 0.45, now_s=91.0) == pytest.approx(0.45 * (95.0 / 0.45) ** 0.5)
    assert scorer.latency_ms(peers[0], 0.45, now_s=200.0) == 0.45  # a fast one does not drift
    shares: Counter[str] = Counter()
    rng = random.Random(3)
    for _ in range(300):  # 10 s, 5 half-lives, after its last sample
        chosen = scorer.choose([*peers, cold], rng=rng, now_s=100.0).chosen
        assert chosen is not None
        shares[chosen.worker_id] += 1
    assert shares["cold"] > 300 * 0.1  # drawn among near-equals again, not starved
    assert choose([*peers, cold], now_s=90.0) != "cold"
    terms = {r.worker_id: r.terms["speed"] for r in scorer.score([*peers, cold], now_s=100.0)}
    assert terms["cold"] > 0.8  # about as good as its peers again


def test_a_fast_worker_with_a_queue_beats_an_idle_slow_one() -> None:
    fast = snap("fast", ema_latency_ms=10.0, queue_depth=16, max_batch_size=8)  # ~30 ms to serve
    slow = snap("slow", ema_latency_ms=100.0)  # ~100 ms
    assert choose([slow, fast]) == "fast"
    swamped = snap("fast", ema_latency_ms=10.0, queue_depth=120, max_batch_size=8)  # ~160 ms
    assert choose([slow, swamped]) == "slow"


def test_expected_time_term_is_relative_to_the_best() -> None:
    ranked = WorkerScorer().score([snap("a", ema_latency_ms=10.0), snap("b", ema_latency_ms=40.0)])
    assert [r.terms["speed"] for r in ranked] == pytest.approx([1.0, 0.25])


def test_unknown_latency_is_assumed_median() -> None:
    ranked = WorkerScorer().score(
        [snap("a", ema_latency_ms=10.0), snap("new"), snap("c", ema_latency_ms=30.0)]
    )
    terms = {r.worker_id: r.terms["speed"] for r in ranked}
    assert terms["new"] == pytest.approx(10.0 / 20.0)


def test_memory_utilisation_and_temperature_terms() -> None:
    scorer = WorkerScorer()
    assert (
        choose([snap("tight", free_memory_bytes=2 * GIB), snap("roomy", free_memory_bytes=20 * GIB)])
        == "roomy"
    )
    assert (
        choose([snap("hot-util", utilization_pct=95.0), snap("cool-util", utilization_pct=10.0)])
        == "cool-util"
    )
    ranked = scorer.score(
        [snap("cool", temperature_c=60.0), snap("warm", temperature_c=82.5), snap("hot", temperature_c=95.0)]
    )
    terms = {r.worker_id: r.terms["temperature"] for r in ranked}
    assert terms == pytest.approx({"cool": 1.0, "warm": 0.5, "hot": 0.0})
    assert [r.worker_id for r in ranked] == ["cool", "warm", "hot"]
    unknown = scorer.score([snap("x")])[0]
    assert unknown.terms["memory"] == unknown.terms["utilization"] == unknown.terms["temperature"] == NEUTRAL


def test_score_is_the_normalised_weighted_sum() -> None:
    weights = ScoringWeights(speed=2.0, memory=1.0, utilization=1.0, temperature=0.0)
    ranked = WorkerScorer(weights=weights).score([snap("a", utilization_pct=50.0, free_memory_bytes=GIB)])
    # speed 1 (alone), memory 1 (the most free), utilisation 0.5: (2*1 + 1*1 + 1*0.5) / 4
    assert ranked[0].score == pytest.approx(3.5 / 4)


# -- staleness -------------------------------------------------------------------------------------------


def test_freshness_halves_every_half_life() -> None:
    scorer = WorkerScorer(staleness_half_life_s=4.0)
    s = snap("a", taken_at_s=100.0)
    assert scorer.freshness(s, None) == 1.0
    assert scorer.freshness(s, 100.0) == 1.0
    assert scorer.freshness(s, 104.0) == pytest.approx(0.5)
    assert scorer.freshness(s, 112.0) == pytest.approx(0.125)
    assert scorer.freshness(s, 90.0) == 1.0  # a reading from the future counts as fresh


def test_stale_state_ages_toward_neutral() -> None:
    scorer = WorkerScorer(staleness_half_life_s=2.0)
    slow = snap("slow", ema_latency_ms=100.0, utilization_pct=100.0, taken_at_s=0.0)
    fast = snap("fast", ema_latency_ms=10.0, taken_at_s=0.0)
    fresh = {r.worker_id: r for r in scorer.score([slow, fast], now_s=0.0)}
    old = {r.worker_id: r for r in scorer.score([slow, fast], now_s=60.0)}
    assert fresh["slow"].terms["speed"] == pytest.approx(0.1)
    assert fresh["slow"].terms["utilization"] == pytest.approx(0.0)
    for term in ("speed", "utilization", "memory", "temperature"):
        assert old["slow"].terms[term] == pytest.approx(NEUTRAL, abs=1e-6)
        assert old["fast"].terms[term] == pytest.approx(NEUTRAL, abs=1e-6)
    assert "fresh" in old["slow"].explain()


def test_the_explanation_names_freshness_only_when_it_reads_below_100_percent() -> None:
    """A worker's own snapshot is microseconds old when scored: "state 100% fresh" says nothing."""
    scorer = WorkerScorer(staleness_half_life_s=5.0)
    worker = snap("w", ema_latency_ms=10.0, taken_at_s=100.0)
    (just_taken,) = scorer.score([worker], now_s=100.00002)
    assert just_taken.freshness < 1.0
    assert "fresh" not in just_taken.explain()
    (older,) = scorer.score([worker], now_s=101.0)
    assert older.explain().endswith("; state 87% fresh")


def test_a_stale_idle_reading_no_longer_beats_a_fresh_moderate_one() -> None:
    # A remote worker polled long ago looked idle; a local one is fresh and moderately busy.
    stale_idle = snap("remote", ema_latency_ms=20.0, queue_depth=0, taken_at_s=0.0)
    fresh_busy = snap("local", ema_latency_ms=20.0, queue_depth=4, max_batch_size=8, taken_at_s=30.0)
    assert choose([stale_idle, fresh_busy], now_s=0.0) == "remote"
    assert choose([stale_idle, fresh_busy], now_s=30.0) == "local"


# -- choose ----------------------------------------------------------------------------------------------


def test_identical_stale_metrics_spread_across_the_top_k() -> None:
    scorer = WorkerScorer(top_k=3)
    snapshots = [snap(f"w{i}", ema_latency_ms=50.0, queue_depth=0, taken_at_s=0.0) for i in range(6)]
    rng = random.Random(42)
    counts = Counter(
        scorer.choose(snapshots, rng=rng, now_s=3.0).chosen.worker_id  # type: ignore[union-attr]
        for _ in range(3000)
    )
    # Ties keep input order, so the top three are w0..w2; each gets about a third, nobody gets a herd.
    assert set(counts) == {"w0", "w1", "w2"}
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_a_clearly_worse_worker_is_rarely_drawn() -> None:
    scorer = WorkerScorer(top_k=3)
    snapshots = [
        snap("fast-a", ema_latency_ms=10.0),
        snap("fast-b", ema_latency_ms=10.0),
        snap("slow", ema_latency_ms=100.0),
    ]
    rng = random.Random(1)
    counts = Counter(scorer.choose(snapshots, rng=rng).chosen.worker_id for _ in range(2000))  # type: ignore[union-attr]
    assert counts["slow"] < 0.05 * 2000
    assert abs(counts["fast-a"] - counts["fast-b"]) < 200


def test_choice_is_reproducible_with_the_same_seed() -> None:
    snapshots = [snap(f"w{i}", queue_depth=i % 2) for i in range(5)]
    scorer = WorkerScorer()
    first = [scorer.choose(snapshots, rng=random.Random(9)).chosen.worker_id for _ in range(3)]  # type: ignore[union-attr]
    again = [scorer.choose(snapshots, rng=random.Random(9)).chosen.worker_id for _ in range(3)]  # type: ignore[union-attr]
    assert first == again


def test_zero_temperature_takes_the_best() -> None:
    scorer = WorkerScorer(top_k=3, choice_temperature=0.0)
    snapshots = [snap("a", queue_depth=3), snap("b"), snap("c", queue_depth=1)]
    assert {scorer.choose(snapshots, rng=random.Random(s)).chosen.worker_id for s in range(50)} == {"b"}  # type: ignore[union-attr]
    assert scorer.selection_weights([0.9, 0.9, 0.5]) == [1.0, 1.0, 0.0]


def test_probe_candidate_takes_the_request_and_the_reason_says_so() -> None:
    snapshots = [snap("good", ema_latency_ms=5.0), snap("recovering", ema_latency_ms=500.0, healthy=False)]
    choice = WorkerScorer().choose(
        snapshots, rng=random.Random(0), available={"recovering": True}, probes={"recovering"}
    )
    assert choice.chosen is not None
    assert choice.chosen.worker_id == "recovering"
    assert choice.chosen.probe
    assert "probe" in choice.reason
    assert choice.probability == 1.0


def test_probe_that_fails_the_filter_is_not_chosen() -> None:
    snapshots = [snap("good"), snap("recovering", draining=True)]
    choice = WorkerScorer().choose(snapshots, rng=random.Random(0), probes={"recovering"})
    assert choice.chosen is not None
    assert choice.chosen.worker_id == "good"


def test_alternatives_carry_scores_and_reasons() -> None:
    choice = WorkerScorer(top_k=1).choose(
        [snap("a", ema_latency_ms=10.0), snap("b", ema_latency_ms=30.0), snap("c", draining=True)],
        rng=random.Random(0),
    )
    alternatives = {a.candidate: a for a in choice.alternatives()}
    assert alternatives["b"].score is not None
    assert alternatives["b"].reason.startswith("scored")
    assert alternatives["c"].score is None
    assert "draining" in alternatives["c"].reason
    assert "a" not in alternatives
    assert "a scored" in choice.reason or "only worker" in choice.reason


# -- affinity --------------------------------------------------------------------------------------------


def test_session_affinity_sticks_and_moves_only_when_its_worker_goes() -> None:
    workers = [snap(f"w{i}") for i in range(4)]
    scorer = WorkerScorer()
    rng = random.Random(3)
    favourites = {}
    for key in ("alice", "bob", "carol", "dave", "erin"):
        ranked = scorer.score(workers, affinity=session_affinity(key))
        favourites[key] = ranked[0].worker_id
        picks = Counter(
            scorer.choose(workers, rng=rng, affinity=session_affinity(key)).chosen.worker_id  # type: ignore[union-attr]
            for _ in range(300)
        )
        # Soft stickiness: the favourite gets the bulk, equal workers share a little (exp(-0.3/0.1)).
        assert picks[favourites[key]] > 0.8 * 300, (key, picks)
    gone = favourites["alice"]
    rest = [w for w in workers if w.worker_id != gone]
    for key, favourite in favourites.items():
        new_favourite = scorer.score(rest, affinity=session_affinity(key))[0].worker_id
        if favourite != gone:
            assert new_favourite == favourite  # keys on other workers do not move
        else:
            assert new_favourite != gone


def test_affinity_as_weights_and_its_bound() -> None:
    scorer = WorkerScorer()
    snapshots = [snap("a"), snap("b")]
    ranked = scorer.score(snapshots, affinity={"b": 7.0, "a": float("nan")})
    assert ranked[0].worker_id == "b"
    assert ranked[0].terms["affinity"] == 1.0
    assert ranked[0].score - ranked[1].score == pytest.approx(scorer.weights.affinity)
    # A heavy load still outweighs stickiness.
    busy = [snap("a"), snap("b", queue_depth=64)]
    assert choose(busy, affinity={"b": 1.0}) == "a"


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k"),
        ({"choice_temperature": -1.0}, "choice_temperature"),
        ({"staleness_half_life_s": 0.0}, "staleness_half_life_s"),
        ({"throttle_start_c": 90.0, "throttle_limit_c": 80.0}, "throttle_limit_c"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerScorer(**kwargs)  # type: ignore[arg-type]


def test_bad_weights_and_needs_are_refused() -> None:
    with pytest.raises(ValueError, match="weight speed"):
        ScoringWeights(speed=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        ScoringWeights(speed=0, memory=0, utilization=0, temperature=0)
    with pytest.raises(ValueError, match="tokens"):
        WorkerNeeds(tokens=-1)
    with pytest.raises(ValueError, match="memory_bytes"):
        WorkerNeeds(memory_bytes=-5)


# -- properties ------------------------------------------------------------------------------------------

snapshots_strategy = st.lists(
    st.builds(
        WorkerSnapshot,
        worker_id=st.just(""),
        deployment=st.just("chat"),
        device=st.sampled_from(["cuda:0", "cpu", "remote:a"]),
        healthy=st.booleans(),
        draining=st.booleans(),
        queue_depth=st.integers(0, 500),
        in_flight=st.integers(0, 64),
        max_batch_size=st.integers(1, 64),
        ema_latency_ms=st.none() | st.floats(0.0, 1e5),
        free_memory_bytes=st.none() | st.integers(0, 80 * GIB),
        utilization_pct=st.none() | st.floats(0.0, 100.0),
        temperature_c=st.none() | st.floats(0.0, 120.0),
        max_seq_len=st.none() | st.integers(1, 1 << 17),
        taken_at_s=st.floats(0.0, 100.0),
    ),
    min_size=0,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=snapshots_strategy,
    tokens=st.none() | st.integers(0, 1 << 17),
    memory=st.none() | st.integers(0, 80 * GIB),
    available_bits=st.lists(st.booleans(), min_size=12, max_size=12),
    probe_bits=st.lists(st.booleans(), min_size=12, max_size=12),
    top_k=st.integers(1, 5),
    temperature=st.sampled_from([0.0, 0.05, 0.1, 1.0]),
    seed=st.integers(0, 2**32 - 1),
    now=st.none() | st.floats(0.0, 200.0),
)
def test_never_picks_a_filtered_worker(
    raw: list[WorkerSnapshot],
    tokens: int | None,
    memory: int | None,
    available_bits: list[bool],
    probe_bits: list[bool],
    top_k: int,
    temperature: float,
    seed: int,
    now: float | None,
) -> None:
    from dataclasses import replace

    snapshots = [replace(s, worker_id=f"w{i}") for i, s in enumerate(raw)]
    available = {s.worker_id: available_bits[i] for i, s in enumerate(snapshots) if i % 3}
    probes = {s.worker_id for i, s in enumerate(snapshots) if probe_bits[i]}
    needs = WorkerNeeds(tokens, memory)
    scorer = WorkerScorer(top_k=top_k, choice_temperature=temperature)
    choice = scorer.choose(
        snapshots, needs, rng=random.Random(seed), available=available, probes=probes, now_s=now
    )
    refused = {a.candidate for a in choice.rejected}
    ranked = [c.worker_id for c in choice.ranked]
    # Every worker is either ranked or refused with a reason, never both.
    assert sorted(refused | set(ranked)) == sorted(s.worker_id for s in snapshots)
    assert not refused & set(ranked)
    for snapshot in snapshots:
        flag = available.get(snapshot.worker_id, snapshot.healthy)
        assert (snapshot.worker_id in refused) == (
            scorer.refusal(snapshot, needs, available=flag) is not None
        )
    if choice.chosen is None:
        assert not ranked
        return
    assert choice.chosen.worker_id not in refused
    assert 0.0 < choice.probability <= 1.0
    scores = [c.score for c in choice.ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= c.score <= 1.0 + scorer.weights.affinity for c in choice.ranked)
    if not choice.chosen.probe:
        assert choice.chosen.worker_id in ranked[:top_k]
        assert not any(c.probe for c in choice.ranked)


def test_load_counts_in_the_batches_a_worker_achieves_when_it_reports_them() -> None:
    # 4 queued on a batch-of-8 worker whose requests run one per batch is 4 batches ahead, not half of one
    ranked = WorkerScorer().score(
        [
            snap("lonely", ema_latency_ms=100.0, queue_depth=4, max_batch_size=8, mean_batch_size=1.0),
            snap("idle", ema_latency_ms=100.0, max_batch_size=8, mean_batch_size=1.0),
        ]
    )
    speed = {r.worker_id: r.terms["speed"] for r in ranked}
    assert speed["lonely"] == pytest.approx(1.0 / (1.0 + 4 / 1))
    # the achieved size stays within [1, max_batch_size]; unknown keeps max_batch_size
    for achieved, capacity in ((0.2, 1.0), (3.0, 3.0), (20.0, 8.0), (None, 8.0)):
        pair = WorkerScorer().score(
            [
                snap("busy", ema_latency_ms=100.0, queue_depth=6, max_batch_size=8, mean_batch_size=achieved),
                snap("idle", ema_latency_ms=100.0, max_batch_size=8),
            ]
        )
        busy = next(r for r in pair if r.worker_id == "busy")
        assert busy.terms["speed"] == pytest.approx(1.0 / (1.0 + 6 / capacity))
    # a worker that batches by itself keeps its in-flight slots as capacity
    remote = snap("remote", ema_latency_ms=100.0, in_flight=8, max_in_flight=64, mean_batch_size=1.0)
    terms = {
        r.worker_id: r.terms["speed"]
        for r in WorkerScorer().score([remote, snap("idle", ema_latency_ms=100.0)])
    }
    assert terms["remote"] == pytest.approx(1.0 / (1.0 + 8 / 64))
