"""xpuflow on a real loopback Ray cluster (head + three worker raylets, one CPU each) with the
sleep-based fake backend, driven as a user runs it: ``xpuflow serve CONFIG`` in its own process.

    python benchmarks/cluster.py            # re-runs itself in a network namespace; prints a table and
                                            # writes benchmarks/results/cluster.json (raw samples, method)

Figures (each a ratio or count measured in this run):
- scaling_3_vs_1: requests/s with three replicas on three nodes over one replica (closed loop).
- cluster_added_p50_ms: p50 latency at concurrency 1 through a cluster worker minus through a local one.
- node_loss_lost_requests: requests that failed while a node was killed (SIGKILL of its raylet) under load.
- node_loss_failover_p99_ms: p99 latency of the requests in flight when the node was killed.
- rejoin_s: from `ray start` of a like node until the lost worker serves again (no gateway restart).
- hetero_*_vs_ray_p2c: not measured in this version (needs a Ray Serve deployment on the same cluster).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xpuflow.testing.ray_cluster import LocalRayCluster, in_netns_argv  # noqa: E402

BASE_PORT = 25000
GATEWAY_PORT = 18080
SERVICE_S = 0.1


def _config(replicas: int, *, cluster: bool, service_s: float = SERVICE_S) -> dict[str, Any]:
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
        }
    return config


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


async def _one(session: Any, i: int) -> tuple[float, float, bool, str]:
    body = {"model": "chat", "messages": [{"role": "user", "content": f"w{i} x"}], "max_tokens": 8}
    start = time.monotonic()
    try:
        async with session.post(f"http://127.0.0.1:{GATEWAY_PORT}/v1/chat/completions", json=body) as r:
            await r.read()
            ok = r.status == 200
            device = r.headers.get("x-xpuflow-device", "")
    except Exception:
        ok, device = False, ""
    return start, time.monotonic(), ok, device


async def _closed_loop(
    session: Any, concurrency: int, duration_s: float
) -> list[tuple[float, float, bool, str]]:
    samples: list[tuple[float, float, bool, str]] = []
    stop_at = time.monotonic() + duration_s
    counter = iter(range(10**9))

    async def client() -> None:
        while time.monotonic() < stop_at:
            samples.append(await _one(session, next(counter)))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(workdir: Path) -> dict[str, Any]:
    import aiohttp

    results: dict[str, Any] = {"samples": {}}
    cluster = LocalRayCluster(Path(f"/tmp/xfb{os.getpid()}"), base_port=BASE_PORT)
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            cluster.start_head(num_cpus=0)
            for name in ("a", "b", "c"):
                cluster.add_node(name, num_cpus=1, labels={"xpuflow-node": name})

            rps = {}
            for replicas in (1, 3):
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
            results["rps_1"], results["rps_3"] = rps[1], rps[3]
            results["scaling_3_vs_1"] = rps[3] / rps[1]

            p50 = {}
            for label, cluster_mode in (("local", False), ("cluster", True)):
                gateway = Gateway(_config(1, cluster=cluster_mode, service_s=0.02), workdir)
                try:
                    await gateway.ready(session)
                    await _closed_loop(session, 1, 1.0)
                    samples = [await _one(session, i) for i in range(150)]
                finally:
                    gateway.stop()
                latencies = [(e - s) * 1000 for s, e, ok, _ in samples if ok]
                p50[label] = _pct(latencies, 0.5)
                results["samples"][f"added_{label}"] = [round(v, 2) for v in latencies]
            results["p50_local_ms"], results["p50_cluster_ms"] = p50["local"], p50["cluster"]
            results["cluster_added_p50_ms"] = p50["cluster"] - p50["local"]

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
                results["node_loss_lost_requests"] = len(lost)
                results["node_loss_failover_p99_ms"] = _pct(in_flight, 0.99)
                results["samples"]["node_loss_in_flight_ms"] = [round(v, 2) for v in in_flight]
                joined_at = time.monotonic()  # from `ray start` of the new node, which takes seconds
                await asyncio.to_thread(cluster.add_node, "d", num_cpus=1, labels={"xpuflow-node": "d"})
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
        finally:
            cluster.stop()
    results["hetero_p99_vs_ray_p2c"] = None
    results["hetero_rps_vs_ray_p2c"] = None
    return results


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
    if os.environ.get("XPUFLOW_IN_NETNS") != "1":
        env = {**os.environ, "XPUFLOW_IN_NETNS": "1", "RAY_AUTH_MODE": "disabled"}
        sys.exit(subprocess.call(in_netns_argv([sys.executable, __file__]), env=env))
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(Path(tmp)))
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
