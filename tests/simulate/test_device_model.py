from __future__ import annotations

import json
from pathlib import Path

import pytest

from xpuflow.errors import ConfigError
from xpuflow.simulate import (
    DeviceModel,
    fit_backends_json,
    fit_bench_runs,
    load_device_model,
    save_device_model,
)


def model() -> DeviceModel:
    return DeviceModel("m", {1: 1000.0, 8: 4000.0}, {1: 50.0, 8: 200.0}, max_batch_size=8, overhead_s=0.01)


def test_batch_timing_follows_the_documented_formula() -> None:
    t = model().batch_timing([(500, 10)])
    assert t.prefill_s == pytest.approx(0.01 + 500 / 1000)
    assert t.step_s == pytest.approx(1 / 50)
    assert t.total_s == pytest.approx(0.51 + 10 / 50)
    assert t.first_token_s == pytest.approx(0.51 + 1 / 50)


def test_speeds_interpolate_between_points_and_stay_flat_outside() -> None:
    m = model()
    assert m.decode_rate(1) == 50
    assert m.decode_rate(8) == 200
    assert m.decode_rate(32) == 200
    assert m.decode_rate(4) == pytest.approx(50 + 150 * 3 / 7)
    assert m.batch_timing([(0, 4)], slowdown=3.0).total_s == pytest.approx(3 * (0.01 + 4 / 50))


def test_round_trip_yaml_and_json(tmp_path: Path) -> None:
    for name in ("m.yaml", "m.json"):
        save_device_model(model(), tmp_path / name)
        again = load_device_model(tmp_path / name)
        assert again.decode_tokens_per_s == {1: 50.0, 8: 200.0}
        assert again.overhead_s == 0.01


def test_bad_files_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nprefill_tokens_per_s: {1: 10}\ndecode_tokens_per_s: {1: -3}\n")
    with pytest.raises(ConfigError, match="decode_tokens_per_s"):
        load_device_model(path)
    path.write_text("prefill_tokens_per_s: {1: 10}\ndecode_tokens_per_s: {1: 3}\nspeed: 4\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_device_model(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_device_model(tmp_path / "missing.yaml")


def test_fit_from_backends_json() -> None:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "backends.json"
    m = fit_backends_json(path, "transformers")
    assert set(m.decode_tokens_per_s) == {1, 8, 32}
    assert m.decode_rate(32) > m.decode_rate(1)
    with pytest.raises(ConfigError, match="no backend"):
        fit_backends_json(path, "nope")


def test_fit_from_bench_runs(tmp_path: Path) -> None:
    paths = []
    for concurrency, per_stream in ((1, 40.0), (4, 30.0)):
        records = [
            {"outcome": "ok", "ttft_ms": 100.0, "latency_ms": 100.0 + 1000.0 * 10 / per_stream,
             "output_tokens": 11, "prompt_tokens": 200}
            for _ in range(5)
        ]  # fmt: skip
        path = tmp_path / f"c{concurrency}.json"
        path.write_text(json.dumps({"plan": {"concurrency": concurrency}, "requests": records}))
        paths.append(path)
    m = fit_bench_runs(paths, name="dev")
    assert m.prefill_tokens_per_s[1] == pytest.approx(2000.0)
    assert m.decode_tokens_per_s[1] == pytest.approx(40.0)
    assert m.decode_tokens_per_s[4] == pytest.approx(120.0)


def test_fake_backend_sleeps_the_device_model_time(tmp_path: Path) -> None:
    import asyncio
    import time

    from xpuflow.backends.base import GenerationParams, ModelConfig
    from xpuflow.testing.fake_backend import FakePlugin

    save_device_model(DeviceModel("m", {1: 100.0}, {1: 100.0, 2: 100.0}), tmp_path / "m.yaml")
    config = ModelConfig(model_id="fake", options={"device_model": str(tmp_path / "m.yaml")})
    session = asyncio.run(FakePlugin().create_session([], config, {}))
    began = time.perf_counter()
    asyncio.run(session.generate_batch(["a b c d e", "f"], GenerationParams(max_tokens=4)))
    assert time.perf_counter() - began == pytest.approx(6 / 100 + 4 * 2 / 100, abs=0.03)


def test_continuous_request_timing_and_throughput() -> None:
    m = DeviceModel(
        "c", {1: 1000.0, 4: 2000.0}, {1: 10.0, 4: 20.0}, max_batch_size=4, overhead_s=0.1, continuous=True
    )
    one = m.request_timing(500, 10, concurrent=1)
    assert one.total_s == pytest.approx(0.1 + 500 / 1000 + 10 * 1 / 10)
    four = m.request_timing(500, 10, concurrent=4)
    assert four.first_token_s == pytest.approx(0.1 + 500 / 2000 + 4 / 20)
    assert four.total_s == pytest.approx(0.1 + 500 / 2000 + 10 * 4 / 20)
    # busy, it runs max_batch_size requests at once
    assert m.throughput_per_s([(500, 10)]) == pytest.approx(4 / four.total_s)
    static = DeviceModel("s", {1: 1000.0}, {1: 10.0, 4: 20.0}, max_batch_size=4)
    assert static.throughput_per_s([(500, 10)], 1) == pytest.approx(1 / static.request_s(500, 10))
    assert static.throughput_per_s([(500, 10)] * 4) == pytest.approx(
        4 / static.batch_timing([(500, 10)] * 4).total_s
    )


def test_continuous_flag_round_trips_and_is_checked(tmp_path: Path) -> None:
    m = DeviceModel("c", {1: 100.0}, {1: 10.0}, continuous=True)
    save_device_model(m, tmp_path / "c.yaml")
    assert load_device_model(tmp_path / "c.yaml").continuous
    (tmp_path / "bad.yaml").write_text(
        "prefill_tokens_per_s: {1: 1}\ndecode_tokens_per_s: {1: 1}\ncontinuous: 3\n"
    )
    with pytest.raises(ConfigError, match="continuous must be true or false"):
        load_device_model(tmp_path / "bad.yaml")


def test_fake_backend_runs_a_continuous_device_model_concurrently(tmp_path: Path) -> None:
    import asyncio
    import time

    from xpuflow.backends.base import BatchMode, GenerationParams, ModelConfig
    from xpuflow.testing.fake_backend import FakePlugin

    model = DeviceModel("c", {1: 1000.0}, {1: 100.0, 2: 100.0}, max_batch_size=2, continuous=True)
    save_device_model(model, tmp_path / "c.yaml")
    config = ModelConfig(
        model_id="fake", max_batch_size=8, options={"device_model": str(tmp_path / "c.yaml")}
    )
    session = asyncio.run(FakePlugin().create_session([], config, {}))
    assert session.batch_mode is BatchMode.CONTINUOUS
    assert session.max_in_flight == 2

    async def two() -> None:
        params = GenerationParams(max_tokens=5)
        await asyncio.gather(session.generate("a b", params), session.generate("c d", params))

    began = time.perf_counter()
    asyncio.run(two())
    # the first runs alone (n=1), the second beside it (n=2): they overlap, the longer one counts
    expected = max(model.request_timing(2, 5, 1).total_s, model.request_timing(2, 5, 2).total_s)
    assert time.perf_counter() - began == pytest.approx(expected, abs=0.03)
