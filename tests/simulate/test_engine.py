from __future__ import annotations

import math
from pathlib import Path

import pytest

from xpuflow.errors import ConfigError
from xpuflow.simulate import (
    PolicyName,
    SimRequest,
    Simulation,
    capacity_per_s,
    find_min_fleet,
    load_fleet,
    load_trace,
    parse_kill,
    parse_slo,
    parse_slow,
    summarize,
)


def steady(n: int, gap_s: float, tokens: tuple[int, int] = (200, 20)) -> list[SimRequest]:
    return [SimRequest(i * gap_s, *tokens) for i in range(n)]


def test_one_request_takes_the_device_model_time(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file).with_replicas({"small": 0, "big": 1})
    result = Simulation(fleet, [SimRequest(0.0, 800, 30)]).run()
    expected = fleet.deployments["big"].model.batch_timing([(800, 30)])
    assert result.outcomes == ["ok"]
    assert result.e2e_s[0] == pytest.approx(expected.total_s)
    assert result.ttft_s[0] == pytest.approx(expected.first_token_s)
    assert result.worker == ["big/0"]


def test_equal_requests_batch_and_every_request_ends(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    requests = [SimRequest(0.0, 100, 16) for _ in range(40)]  # one batch group: they share batches
    result = Simulation(fleet, requests, policy="xpuflow", seed=3).run()
    assert result.outcomes.count("ok") == 40
    assert all(not math.isnan(v) for v in result.e2e_s)


@pytest.mark.parametrize("policy", list(PolicyName))
def test_every_policy_serves_a_light_load(fleet_file: Path, policy: PolicyName) -> None:
    fleet = load_fleet(fleet_file)
    result = Simulation(fleet, steady(200, 0.5), policy=policy, seed=1).run()
    summary = summarize(result, parse_slo("ttft_p99=5s,e2e_p99=10s"))
    assert summary["outcomes"]["ok"] == 200
    assert summary["slo_attainment"] > 0.9
    assert 0 < summary["mean_utilisation"] < 1


def test_same_seed_same_result(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    a = Simulation(fleet, steady(100, 0.2), seed=5).run()
    b = Simulation(fleet, steady(100, 0.2), seed=5).run()
    assert a.e2e_s == b.e2e_s
    assert a.worker == b.worker


def test_kill_fails_over_and_loses_no_request(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    faults = [parse_kill("big/0@10")]
    result = Simulation(fleet, steady(200, 0.25), seed=2, faults=faults).run()
    assert result.outcomes.count("ok") == 200
    late = [w for w, t in zip(result.worker, result.arrival_s, strict=True) if t > 12]
    assert "big/0" not in late


def test_slow_worker_gets_less_traffic_under_xpuflow(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file).with_replicas({"small": 0, "big": 2})
    faults = [parse_slow("big/1x8@0")]
    result = Simulation(fleet, steady(200, 0.4), seed=2, faults=faults).run()
    assert result.worker.count("big/1") < result.worker.count("big/0") / 2


def test_fault_syntax() -> None:
    assert parse_slow("a/1×4@2s").factor == 4
    assert parse_slow("box/1x2.5@3").worker == "box/1"
    assert parse_kill("gpu/0@7.5").at_s == 7.5
    with pytest.raises(ConfigError, match="WORKER@SECONDS"):
        parse_kill("gpu/0")


def test_unknown_fault_worker(fleet_file: Path) -> None:
    with pytest.raises(ConfigError, match="does not have"):
        Simulation(load_fleet(fleet_file), steady(3, 1), faults=[parse_kill("nope/0@1")])


def test_scale_multiplies_the_rate(fleet_file: Path) -> None:
    result = Simulation(load_fleet(fleet_file), steady(11, 1.0), scale=2.0).run()
    assert result.arrival_s[-1] == pytest.approx(5.0)


def test_find_min_meets_the_slo_and_one_less_does_not(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    requests = steady(120, 0.25, (300, 30))
    slo = parse_slo("ttft_p99=3s,e2e_p99=6s")
    plan = find_min_fleet(fleet, requests, slo, seed=1)
    assert plan.met
    assert capacity_per_s(fleet.with_replicas(plan.counts), requests) > 0
    for name, count in plan.counts.items():
        if count:
            smaller = {**plan.counts, name: count - 1}
            assert not any(c == smaller and met for c, met, _ in plan.tried)


def test_multi_tier_model_uses_the_tier_rules(fleet_file: Path) -> None:
    text = fleet_file.read_text().replace(
        "tiers: [{name: main, deployments: [big, small]}]",
        "tiers: [{name: strong, deployments: [big]}, {name: weak, deployments: [small]}]",
    )
    fleet_file.write_text(text)
    fleet = load_fleet(fleet_file)
    requests = [SimRequest(i * 0.5, 4000 if i % 2 else 50, 10) for i in range(40)]
    result = Simulation(fleet, requests, seed=1).run()
    assert result.outcomes.count("ok") == 40
    long_ones = {
        w.split("/")[0] for w, r in zip(result.worker, requests, strict=True) if r.input_tokens > 1000
    }
    assert long_ones == {"big"}


def test_real_trace_slice(fleet_file: Path, traces_dir: Path) -> None:
    requests = load_trace("azure-conv", [traces_dir], duration_s=60)
    fleet = load_fleet(fleet_file).with_replicas({"big": 4, "small": 8})
    for policy in (PolicyName.XPUFLOW, PolicyName.JSQ):
        result = Simulation(fleet, requests, policy=policy, seed=0, scale=0.25).run()
        assert len(result.outcomes) == len(requests)
        assert result.outcomes.count("ok") > 0


CONTINUOUS = """name: cont
max_batch_size: 4
overhead_s: 0.01
prefill_tokens_per_s: {1: 1000, 4: 2000}
decode_tokens_per_s: {1: 10, 4: 20}
continuous: true
"""


def continuous_fleet(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "cont.yaml").write_text(CONTINUOUS)
    path = tmp_path / "cont_fleet.yaml"
    path.write_text(
        "deployments:\n"
        f"  - {{name: cont, backend: fake, replicas: 1, max_seq_len: 32768{extra}, "
        "options: {device_model: cont.yaml}}\n"
        "models:\n  - {name: chat, tiers: [{name: main, deployments: [cont]}]}\n"
    )
    return path


def test_a_continuous_device_runs_requests_side_by_side(tmp_path: Path) -> None:
    fleet = load_fleet(continuous_fleet(tmp_path))
    model = fleet.deployments["cont"].model
    # five different output lengths (no two would share a static batch) arrive together: four run at
    # once, each at the concurrency it started with; the fifth waits for a slot
    requests = [SimRequest(0.0, 100, 10 + i) for i in range(5)]
    result = Simulation(fleet, requests).run()
    assert result.outcomes == ["ok"] * 5
    for i in range(4):
        assert result.queue_s[i] == 0.0
        assert result.e2e_s[i] == pytest.approx(model.request_timing(100, 10 + i, i + 1).total_s)
    first_free = min(result.e2e_s[:4])
    assert result.queue_s[4] == pytest.approx(first_free)
    assert result.e2e_s[4] == pytest.approx(first_free + model.request_timing(100, 14, 4).total_s)
    # busy time is the union of the overlapping requests, not their sum
    summary = summarize(result, parse_slo("e2e_p99=60s"))
    assert summary["utilisation"]["cont/0"] <= 1.0


def test_max_in_flight_caps_a_continuous_device_and_needs_one(tmp_path: Path) -> None:
    fleet = load_fleet(continuous_fleet(tmp_path, ", max_in_flight: 2"))
    result = Simulation(fleet, [SimRequest(0.0, 100, 10 + i) for i in range(3)]).run()
    assert result.queue_s[:2] == [0.0, 0.0]
    assert result.queue_s[2] > 0
    static = tmp_path / "static"
    static.mkdir()
    (static / "cont.yaml").write_text(CONTINUOUS.replace("continuous: true\n", ""))
    (static / "cont_fleet.yaml").write_text((tmp_path / "cont_fleet.yaml").read_text())
    with pytest.raises(ConfigError, match="max_in_flight applies to devices that batch by themselves"):
        load_fleet(static / "cont_fleet.yaml")


def test_capacity_counts_a_continuous_device_at_its_in_flight_cap(tmp_path: Path) -> None:
    fleet = load_fleet(continuous_fleet(tmp_path))
    model = fleet.deployments["cont"].model
    requests = [SimRequest(0.0, 100, 20)]
    assert capacity_per_s(fleet, requests) == pytest.approx(4 / model.request_timing(100, 20, 4).total_s)


def test_a_candidate_sample_serves_everything_and_is_checked(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    result = Simulation(fleet, steady(200, 0.5), seed=1, sample=2).run()
    assert result.outcomes.count("ok") == 200
    with pytest.raises(ValueError, match="sample must be >= 1"):
        Simulation(fleet, steady(1, 1.0), sample=0)


def test_a_snapshot_read_again_later_equals_a_fresh_one(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file).with_replicas({"small": 0, "big": 1})
    sim = Simulation(fleet, [SimRequest(0.0, 4000, 400), SimRequest(0.5, 100, 20)])
    sim.run()
    worker = sim.workers["big/0"]
    # the simulator reads snapshots at the clock's time
    sim.clock.advance(10.0 - sim.clock.monotonic())
    first = worker.snapshot(10.0)
    sim.clock.advance(2.5)
    later = worker.snapshot(12.5)  # unchanged worker, older than max_age_s: the time-only refresh
    assert later is not first
    worker._changed()
    fresh = worker.snapshot(12.5)
    assert later == fresh
    assert later.mean_batch_size == fresh.mean_batch_size == 1.0


def test_summary_per_deployment_adds_up_to_the_run(fleet_file: Path) -> None:
    fleet = load_fleet(fleet_file)
    result = Simulation(fleet, steady(300, 0.1, (400, 60)), seed=2).run()
    summary = summarize(result, parse_slo("ttft_p99=2s,e2e_p99=60s"))
    parts = summary["by_deployment"]
    assert set(parts) <= {"big", "small"}
    assert sum(p["served"] for p in parts.values()) == summary["outcomes"]["ok"]
    assert sum(p["share_of_served"] for p in parts.values()) == pytest.approx(1.0)
    attained = sum(p["slo_attainment"] * p["served"] for p in parts.values())
    assert attained == pytest.approx(summary["slo_attainment"] * summary["requests"])
    assert all(p["slo_attainment"] <= p["within_ttft"] <= 1.0 for p in parts.values())


def test_the_models_wait_weight_reaches_the_simulated_scorer(fleet_file: Path) -> None:
    fleet_file.write_text(
        fleet_file.read_text().replace(
            "deployments: [big, small]}]}", "deployments: [big, small]}], wait_weight: 12}"
        )
    )
    fleet = load_fleet(fleet_file)
    assert fleet.wait_weight == 12.0
    assert Simulation(fleet, steady(2, 1.0)).scorer.wait_weight == 12.0
