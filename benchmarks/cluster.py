"""xpuflow on a real loopback Ray cluster (head + three worker raylets, one CPU each) with the
sleep-based fake backend, driven as a user runs it: ``xpuflow serve CONFIG`` in its own process.

    python benchmarks/cluster.py            # re-runs itself in a network namespace; prints a table and
                                            # writes benchmarks/results/cluster.json (raw samples, method)
    python benchmarks/cluster.py --only added   # one phase (scaling, hetero, added, loss); no JSON

Figures (each a ratio or count measured in this run):
- scaling_3_vs_1: requests/s with three replicas on three nodes over one replica (closed loop).
- cluster_added_p50_ms: p50 latency at concurrency 1 through a cluster worker minus through a local one
  (fake backend, 20 ms a request), 150 requests a gateway, local and cluster gateways taking turns for
  three rounds; the median of the rounds' differences. Requests reach the worker over its channel
  (cluster.transport: direct, the default); cluster_added_p50_ms_ray_transport is the same figure with
  transport: ray (Ray actor calls), measured in the same rounds. For context, ray_call_added_p50_ms:
  what a bare Ray actor call that sleeps 20 ms on node a costs over the same sleep in the caller.
- node_loss_lost_requests: requests that failed while a node was killed (SIGKILL of its raylet) under load.
- node_loss_failover_p99_ms: p99 latency of the requests in flight when the node was killed (whole
  latency, queueing under the load included); node_loss_failover_extra_p99_ms: the same over the p50 of
  the requests that ended before the kill (the extra latency the loss cost them).
- rejoin_s: from `ray start` of a like node until the lost worker serves again (no gateway restart).
- hetero_p99_vs_ray_p2c / hetero_rps_vs_ray_p2c: a fast node (50 ms a request) and two slow ones
  (200 ms), one replica on each; the same load through ``xpuflow serve`` (one logical model over a fast
  and a slow deployment, so the gateway's scorer chooses among the three workers) and through a plain
  Ray Serve deployment (three replicas, one a node by a custom resource, Serve's default
  PowerOfTwoChoices router, its HTTP proxy on a free port of the head; each replica serves one request
  at a time, as the fake worker does). p99: open loop (Poisson arrivals at half the fleet's capacity,
  the same arrival times for both); rps: closed loop. Two rounds each, alternating; each figure is
  xpuflow's over Serve's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xpuflow.testing.ray_cluster import LocalRayCluster, in_netns_argv  # noqa: E402

BASE_PORT = 25000
GATEWAY_PORT = 18080
SERVICE_S = 0.1
FAST_S, SLOW_S = 0.05, 0.2
ADDED_ROUNDS = 3
HETERO_RATE = 0.5 * (1 / FAST_S + 2 / SLOW_S)  # half the three replicas' capacity (15 req/s)


def _config(
    replicas: int, *, cluster: bool, service_s: float = SERVICE_S, transport: str = "direct"
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "gateway": {"host": "127.0.0.1", "port": GATEWAY_PORT},
        "deployments": [
            {
                "name": "chat",
                "backend": "fake",
                "device": "cpu",
                "replicas": replicas,
                "max_batch_size": 1,
                "options": {"service_time_s": service_s},
            }
        ],
    }
    if cluster:
        config["cluster"] = {
            "address": f"127.0.0.1:{BASE_PORT}",
            "refresh_interval_s": 1.0,
            "health_interval_s": 0.1,
            "unhealthy_after_s": 0.5,
            "transport": transport,
        }
    return config


def _hetero_config() -> dict[str, Any]:
    """One logical model over a fast deployment (node speed=fast) and a slow one (speed=slow, 2 nodes)."""

    def dep(name: str, speed: str, replicas: int, service_s: float) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "fake",
            "device": "cpu",
            "replicas": replicas,
            "node": f"speed={speed}",
            "max_batch_size": 1,
            "options": {"service_time_s": service_s},
        }

    config = _config(1, cluster=True)
    config["deployments"] = [dep("fast", "fast", 1, FAST_S), dep("slow", "slow", 2, SLOW_S)]
    config["models"] = [{"name": "chat", "tiers": [{"name": "all", "deployments": ["fast", "slow"]}]}]
    return config


def _serve_app() -> Any:
    """The same fake model as a plain Ray Serve deployment: one replica a node, its speed by node label,
    serving one request at a time like the fake backend's worker (the others wait in the replica)."""
    from ray import serve

    @serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0, "resources": {"serve_replica": 1}})
    class Chat:
        def __init__(self) -> None:
            import ray

            speed: Any = (ray.get_runtime_context().get_node_labels() or {}).get("speed")
            speed = speed[0] if isinstance(speed, list) and speed else speed
            self.service_s = FAST_S if speed == "fast" else SLOW_S
            self.device = asyncio.Lock()  # one request at a time, as the fake worker (max_batch_size 1)

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            async with self.device:
                await asyncio.sleep(self.service_s)
            text = " ".join(reversed(body["messages"][-1]["content"].split()))
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    return Chat.bind()  # type: ignore[attr-defined]


class ServeApp:
    """A Ray Serve application on the same cluster, its HTTP proxy on the head at a free port."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.port = _free_port()

    def start(self) -> None:
        import ray
        from ray import serve

        ray.init(address=self.address, namespace="bench-serve", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location="HeadOnly")
        serve.run(_serve_app(), name="chat", route_prefix="/")

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _hetero_run(system: str, address: str, session: Any, workdir: Path) -> dict[str, Any]:
    if system == "xpuflow":
        gateway = Gateway(_hetero_config(), workdir)
        try:
            await gateway.ready(session)
            return await _hetero(session, CHAT_URL)
        finally:
            gateway.stop()
    serve_app = ServeApp(address)
    try:
        await asyncio.to_thread(serve_app.start)
        return await _hetero(session, f"http://127.0.0.1:{serve_app.port}/")
    finally:
        await asyncio.to_thread(serve_app.stop)


def _ray_call_added_ms(address: str, service_s: float = 0.02, calls: int = 150) -> float:
    """p50 of a bare Ray actor call that sleeps ``service_s`` (node a) minus p50 of the same sleep here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def p50(fn: Any) -> float:
        fn()
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
        return _pct(times, 0.5)

    @ray.remote(num_cpus=0)
    class Sleeper:
        async def sleep(self, seconds: float) -> None:
            await asyncio.sleep(seconds)

    ray.init(address=address, namespace="bench-floor", log_to_driver=False)
    try:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]
        node = next(n["NodeID"] for n in nodes if n["Alive"] and n["Labels"].get("xpuflow-node") == "a")
        strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        sleeper = Sleeper.options(scheduling_strategy=strategy).remote()  # type: ignore[attr-defined]
        remote = p50(lambda: ray.get(sleeper.sleep.remote(service_s)))
        here = p50(lambda: asyncio.run(asyncio.sleep(service_s)))
        return remote - here
    finally:
        ray.shutdown()


class Gateway:
    """``xpuflow serve CONFIG`` in its own process."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.path = workdir / f"xpuflow-{time.monotonic_ns()}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "gateway.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xpuflow.cli.main", "serve", str(self.path)],
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )

    async def ready(self, session: Any, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xpuflow serve exited with {self.proc.returncode}; see gateway.log")
            try:
                async with session.get(f"http://127.0.0.1:{GATEWAY_PORT}/ready") as response:
                    if response.status == 200:
                        return
            except Exception:
                pass
            await asyncio.sleep(0.25)
        raise TimeoutError("the gateway did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


CHAT_URL = f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions"


async def _one(session: Any, i: int, url: str = CHAT_URL) -> tuple[float, float, bool, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": f"w{i} x"}], "max_tokens": 8}
    start = time.monotonic()
    try:
        async with session.post(url, json=body) as r:
            await r.read()
            ok = r.status == 200
            device = r.headers.get("x-xpuflow-device", "")
    except Exception:
        ok, device = False, ""
    return start, time.monotonic(), ok, device


async def _closed_loop(
    session: Any, concurrency: int, duration_s: float, url: str = CHAT_URL
) -> list[tuple[float, float, bool, str]]:
    samples: list[tuple[float, float, bool, str]] = []
    stop_at = time.monotonic() + duration_s
    counter = iter(range(10**9))

    async def client() -> None:
        while time.monotonic() < stop_at:
            samples.append(await _one(session, next(counter), url))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


async def _open_loop(
    session: Any, rate_per_s: float, duration_s: float, url: str, seed: int = 7
) -> list[tuple[float, float, bool, str]]:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s`` (the same arrival times for every system)."""
    import random

    rng = random.Random(seed)
    tasks = []
    began = time.monotonic()
    at = 0.0
    i = 0
    while True:
        at += rng.expovariate(rate_per_s)
        if at >= duration_s:
            break
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        tasks.append(asyncio.ensure_future(_one(session, i, url)))
        i += 1
    return list(await asyncio.gather(*tasks))


def _rps(samples: list[tuple[float, float, bool, str]]) -> float:
    ok = [s for s in samples if s[2]]
    return len(ok) / (max(s[1] for s in ok) - min(s[0] for s in ok))


async def _hetero(session: Any, url: str) -> dict[str, Any]:
    """p99 at half capacity (open loop) and requests/s in a closed loop, against ``url``."""
    await _closed_loop(session, 6, 2.0, url)  # warm-up: every worker has served and been measured
    opened = await _open_loop(session, HETERO_RATE, 12.0, url)
    closed = await _closed_loop(session, 12, 6.0, url)
    latencies = [(e - s) * 1000 for s, e, ok, _ in opened if ok]
    return {
        "p99_ms": _pct(latencies, 0.99),
        "p50_ms": _pct(latencies, 0.5),
        "failed": sum(1 for s in opened + closed if not s[2]),
        "rps": _rps(closed),
        "open_ms": [round(v, 2) for v in latencies],
        "served_by": dict(Counter(d or "?" for _, _, ok, d in opened if ok)),
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


PHASES = ("scaling", "hetero", "added", "loss")


async def run(workdir: Path, phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
    import aiohttp

    results: dict[str, Any] = {"samples": {}}
    cluster = LocalRayCluster(Path(f"/tmp/xfb{os.getpid()}"), base_port=BASE_PORT)
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            cluster.start_head(num_cpus=0)
            for name, speed in (("a", "fast"), ("b", "slow"), ("c", "slow")):
                labels = {"xpuflow-node": name, "speed": speed}
                cluster.add_node(name, num_cpus=1, resources={"serve_replica": 1}, labels=labels)

            rps = {}
            for replicas in (1, 3) if "scaling" in phases else ():
                gateway = Gateway(_config(replicas, cluster=True), workdir)
                try:
                    await gateway.ready(session)
                    await _closed_loop(session, 6, 1.0)  # warm-up
                    samples = await _closed_loop(session, 12, 6.0)
                finally:
                    gateway.stop()
                ok = [s for s in samples if s[2]]
                span = max(s[1] for s in ok) - min(s[0] for s in ok)
                rps[replicas] = len(ok) / span
                results["samples"][f"scaling_{replicas}"] = [
                    round((e - s) * 1000, 2) for s, e, _, _ in samples
                ]
            if rps:
                results["rps_1"], results["rps_3"] = rps[1], rps[3]
                results["scaling_3_vs_1"] = rps[3] / rps[1]

            # two rounds, alternating (xpuflow, Serve, Serve, xpuflow), so drift on a shared machine
            # weighs on both; p99 over the pooled open-loop samples, rps the mean of the rounds
            runs: dict[str, list[dict[str, Any]]] = {"xpuflow": [], "ray_serve": []}
            order = ("xpuflow", "ray_serve", "ray_serve", "xpuflow") if "hetero" in phases else ()
            for system in order:
                runs[system].append(await _hetero_run(system, cluster.address, session, workdir))
            pooled = {}
            for system, rounds in runs.items() if order else ():
                opened = [v for r in rounds for v in r["open_ms"]]
                results["samples"][f"hetero_open_{system}"] = opened
                pooled[system] = {
                    "p99_ms": _pct(opened, 0.99),
                    "p50_ms": _pct(opened, 0.5),
                    "rps": sum(r["rps"] for r in rounds) / len(rounds),
                    "failed": sum(r["failed"] for r in rounds),
                    "rounds": [{k: v for k, v in r.items() if k != "open_ms"} for r in rounds],
                }
                results[f"hetero_{system}"] = pooled[system]
            if order:
                results["hetero_p99_vs_ray_p2c"] = pooled["xpuflow"]["p99_ms"] / pooled["ray_serve"]["p99_ms"]
                results["hetero_rps_vs_ray_p2c"] = pooled["xpuflow"]["rps"] / pooled["ray_serve"]["rps"]
            if "added" in phases:
                await _added(results, cluster, session, workdir)
            if "loss" in phases:
                await _loss(results, cluster, session, workdir)
        finally:
            cluster.stop()
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)  # Ray's session logs and sockets
    return results


async def _added(results: dict[str, Any], cluster: LocalRayCluster, session: Any, workdir: Path) -> None:
    # Ray's own cost of one actor call that takes as long as the fake request (context for
    # cluster_added_p50_ms): a bare actor sleeping SERVICE on node a, called from a driver here
    results["ray_call_added_p50_ms"] = await asyncio.to_thread(_ray_call_added_ms, cluster.address)

    # local and cluster gateways take turns (ADDED_ROUNDS each), so drift on a shared machine
    # falls on both; the figure is the median of the rounds' differences. "cluster" is the default
    # transport (each worker's channel), "cluster_ray" the same over Ray actor calls.
    p50: dict[str, list[float]] = {"local": [], "cluster": [], "cluster_ray": []}
    for _ in range(ADDED_ROUNDS):
        for label, cluster_mode, transport in (
            ("local", False, "direct"),
            ("cluster", True, "direct"),
            ("cluster_ray", True, "ray"),
        ):
            config = _config(1, cluster=cluster_mode, service_s=0.02, transport=transport)
            gateway = Gateway(config, workdir)
            try:
                await gateway.ready(session)
                await _closed_loop(session, 1, 1.0)
                samples = [await _one(session, i) for i in range(150)]
            finally:
                gateway.stop()
            latencies = [(e - s) * 1000 for s, e, ok, _ in samples if ok]
            p50[label].append(_pct(latencies, 0.5))
            rounds = results["samples"].setdefault(f"added_{label}", [])
            rounds.append([round(v, 2) for v in latencies])
    differences = sorted(c - lo for c, lo in zip(p50["cluster"], p50["local"], strict=True))
    over_ray = sorted(c - lo for c, lo in zip(p50["cluster_ray"], p50["local"], strict=True))
    results["p50_local_ms"], results["p50_cluster_ms"] = p50["local"], p50["cluster"]
    results["p50_cluster_ray_transport_ms"] = p50["cluster_ray"]
    results["cluster_added_p50_ms"] = statistics.median(differences)
    results["cluster_added_p50_ms_rounds"] = differences
    results["cluster_added_p50_ms_ray_transport"] = statistics.median(over_ray)
    results["cluster_added_p50_ms_ray_transport_rounds"] = over_ray


async def _loss(results: dict[str, Any], cluster: LocalRayCluster, session: Any, workdir: Path) -> None:
    gateway = Gateway(_config(3, cluster=True), workdir)
    try:
        await gateway.ready(session)
        await _closed_loop(session, 6, 1.0)
        load = asyncio.ensure_future(_closed_loop(session, 12, 8.0))
        await asyncio.sleep(2.0)
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill_node, "c")
        samples = await load
        lost = [s for s in samples if not s[2]]
        in_flight = [(e - s) * 1000 for s, e, ok, _ in samples if s <= killed_at <= e]
        before = [(e - s) * 1000 for s, e, ok, _ in samples if ok and e < killed_at]
        results["node_loss_lost_requests"] = len(lost)
        results["node_loss_failover_p99_ms"] = _pct(in_flight, 0.99)
        # the "extra latency": over what a request took under the same load before the kill
        results["node_loss_steady_p50_ms"] = _pct(before, 0.5)
        results["node_loss_failover_extra_p99_ms"] = _pct(in_flight, 0.99) - _pct(before, 0.5)
        results["samples"]["node_loss_in_flight_ms"] = [round(v, 2) for v in in_flight]
        joined_at = time.monotonic()  # from `ray start` of the new node, which takes seconds
        labels = {"xpuflow-node": "d", "speed": "slow"}
        await asyncio.to_thread(cluster.add_node, "d", num_cpus=1, labels=labels)
        rejoin_s = None
        while time.monotonic() - joined_at < 90:
            # the restarted worker takes traffic again: a response served on the new node
            answers = await asyncio.gather(*(_one(session, i) for i in range(3)))
            if any(device.endswith("@d") for _, _, _, device in answers):
                rejoin_s = time.monotonic() - joined_at
                break
            await asyncio.sleep(0.1)
        results["rejoin_s"] = rejoin_s
    finally:
        gateway.stop()


TARGETS = {
    "scaling_3_vs_1": (">=", 2.7),
    "cluster_added_p50_ms": ("<=", 2.0),
    "node_loss_lost_requests": ("==", 0),
    "node_loss_failover_p99_ms": ("<=", 1000.0),
    "rejoin_s": ("<=", 60.0),
    "hetero_p99_vs_ray_p2c": ("<=", 0.7),
    "hetero_rps_vs_ray_p2c": (">=", 1.0),
}


def _verdict(value: Any, op: str, target: float) -> str:
    if value is None:
        return "not measured"
    ok = {">=": value >= target, "<=": value <= target, "==": value == target}[op]
    return "pass" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"comma-separated phases to run ({', '.join(PHASES)}); a partial run prints its figures "
        "and leaves benchmarks/results/cluster.json as it is",
    )
    args = parser.parse_args()
    phases = tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if os.environ.get("XPUFLOW_IN_NETNS") != "1":
        env = {**os.environ, "XPUFLOW_IN_NETNS": "1", "RAY_AUTH_MODE": "disabled"}
        sys.exit(subprocess.call(in_netns_argv([sys.executable, __file__, *sys.argv[1:]]), env=env))
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(Path(tmp), phases))
    rows = []
    for name, (op, target) in TARGETS.items():
        value = results.get(name)
        rows.append(
            {
                "figure": name,
                "value": value,
                "target": f"{op} {target:g}",
                "verdict": _verdict(value, op, target),
            }
        )
    print(f"{'figure':<28} {'value':>12} {'target':>10}  verdict")
    for row in rows:
        value = row["value"]
        shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{row['figure']:<28} {shown:>12} {row['target']:>10}  {row['verdict']}")
    if set(phases) != set(PHASES):
        extra = {k: v for k, v in results.items() if k != "samples" and not isinstance(v, (list, dict))}
        print(json.dumps(extra, indent=2))
        return
    out = ROOT / "benchmarks" / "results" / "cluster.json"
    out.write_text(
        json.dumps(
            {
                "method": __doc__,
                "setup": {
                    "cluster": "head (0 CPUs, the gateway's node) + raylets a, b, c (1 CPU each) on loopback "
                    "in a network namespace; node d joins after c is killed",
                    "backend": f"fake, service_time_s {SERVICE_S}, max_batch_size 1, one worker per node",
                    "load": "closed loop over HTTP to xpuflow serve (aiohttp), 12 clients",
                    "hetero": f"node a {FAST_S * 1000:g} ms, nodes b and c {SLOW_S * 1000:g} ms a request; "
                    f"open loop {HETERO_RATE:g} req/s for 12 s (p99), closed loop 12 clients for 6 s (rps), "
                    "two rounds a system, alternating; "
                    "Ray Serve: 3 replicas pinned one a node by the custom resource serve_replica, "
                    "default router (PowerOfTwoChoices), default max_ongoing_requests",
                },
                "figures": rows,
                "raw": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
