"""Model residency under a budget that holds about half the models: xpuflow's LRU-by-bytes against
Ray Serve multiplexing's LRU-by-count, replayed on the same requests.

Six real deployments, all ``load: on_demand`` on ``device: cpu`` with ``keep_alive_s`` 600 (so during the
run only eviction decides, never idling):

- ``smollm2-llamacpp``: SmolLM2-135M-Instruct on llama.cpp, widened to f16 (the embedded default's
  options), chat;
- ``smollm2-llamacpp-q4``: the same file on llama.cpp at its own Q4_1, no widening, chat;
- ``smollm2-transformers``: SmolLM2 on transformers (dequantised to fp32), chat;
- ``minilm-onnxruntime`` and ``minilm-openvino``: all-MiniLM-L6-v2, embeddings;
- ``mlp-npu``: an MLP (256 -> 1024 -> 1024 -> 16, float32) exported for the reference binary NPU stack
  (built from C into a temporary folder) on the ``binary`` backend, task tensor. The reference stack is
  emulated on the host, and the binary backend offers it the ``cpu`` resource, so it shares the CPU
  budget with the others.

Two gateway runs, each ``python -m xpuflow.cli.main serve CONFIG`` in its own process (HF_HUB_OFFLINE=1),
ready when ``/ready`` answers 200:

1. sizing: a budget of ``--sizing-budget-gb``; the gateway measures each model's size at start (it
   loads each once and unloads it), read from ``GET /admin/workers`` (``residency[].models[].size_bytes``);
2. the run: ``residency.budget_gb.cpu`` = max(half the sum of the measured sizes, 1.15 x the largest
   size), so about half the models fit and every model fits alone with a 15% margin.

In the run, ``--clients`` concurrent clients (asyncio, one keep-alive pool) take requests in order from
one sequence drawn from a Zipf law (exponent ``--zipf-s``, ranks assigned to models by a seeded shuffle,
seed ``--seed``) for ``--duration`` seconds; requests in flight at the end are finished. Chat: 8 tokens
max; embeddings: two short texts; tensors: one row over ``/v2/models/{name}/infer`` (JSON). A 503 is
retried after its Retry-After (at most ``--max-retries`` times), as a client would (idle keep-alive
connections close after 2 s, before the server's 5 s, so a retry never uses a closed one); a request is lost
when its final answer is not 2xx or the connection failed. Per request: model, status, latency (from
the first try to the last answer, retries included, and of the answering try alone), tries, and
whether ``x-xpuflow-cold-start: true`` was set.

A sampler thread reads ``/admin/workers`` and the gateway process's RSS (psutil, the process and its
children) every 100 ms. The RSS baseline is taken right after ``/ready`` (the start-up measurement has
loaded and unloaded each model by then, so the libraries are imported and only the weights come and go).

Figures (``benchmarks/results/residency.json``):

- ``budget_exceeded_samples``: samples where accounted bytes (``resident_bytes``) > budget, or RSS
  growth > budget + margin. The margin is 20% of the budget plus 64 MiB: accounted bytes are the sizes
  measured at start, while the RSS also holds what allocators keep after an unload (glibc arenas,
  llama.cpp and ONNX Runtime buffers) and the working memory of requests in flight (activations, KV
  cache, tokenizers). Target 0.
- ``hit_rate``: requests answered without a cold start / all; ``hit_rate_lru_by_count``: the same model
  sequence (in the order clients sent it) replayed through an LRU holding a fixed number of models,
  Ray Serve's ``max_num_models_per_replica`` = budget / mean measured size rounded to the nearest
  integer, the number of these models the budget holds on average. Target: xpuflow >= the baseline.
- ``cold_start_p50_ms`` per deployment: the p50 latency of its cold answers minus the p50 of its warm
  ones (the answering try's latency, without Retry-After waits), and the gateway's own ``load_ms_p50``.
- ``lost_requests``: target 0; ``retried_503`` counts the 503s clients retried.

``--charge-startup-memory`` is a diagnostic for a gateway that charges memory it holds from start-up
(imported libraries, allocator pools) to the budget at its first unload: it loads and unloads the
smallest model through the admin API in the sizing run, adds what is then unaccounted to the budget,
does the same in the run before the traffic, and holds models to the budget less that charge.

    python benchmarks/residency.py [--duration 180] [--clients 4] [--seed 7] [--zipf-s 1.1]
                                   [--at-commit REV] [--charge-startup-memory] [--store-as KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export_source, free_port, print_table, start_process, stop_process, write_results

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
MIB = 1 << 20
SAMPLE_INTERVAL_S = 0.1
BUDGET_SHARE = 0.5  # of the summed sizes
FIT_MARGIN = 1.15  # the budget holds the largest model with this margin
RSS_MARGIN_SHARE = 0.20
RSS_MARGIN_BYTES = 64 * MIB
KEEP_ALIVE_S = 600.0
# With keys configured the admin API opens to a key of its own (it is closed when no key holds it).
USER_KEY, ADMIN_KEY = secrets.token_hex(16), secrets.token_hex(16)
USER_KEY_ENV, ADMIN_KEY_ENV = "XPUFLOW_BENCH_USER_KEY", "XPUFLOW_BENCH_ADMIN_KEY"
API_KEYS = [
    {"name": "bench", "key_env": USER_KEY_ENV, "rights": ["infer"]},
    {"name": "ops", "key_env": ADMIN_KEY_ENV, "rights": ["admin", "metrics"]},
]
MLP_WIDTHS = [256, 1024, 1024, 16]
TEXTS = [
    ["The cat sat on the mat.", "A quick brown fox."],
    ["Residency keeps hot models loaded.", "Cold models are loaded on demand."],
    ["How far is the moon?", "Paris is the capital of France."],
]
CHATS = ["Say hello.", "Name a colour.", "What is 2+2?", "Name a fruit."]


# -- the deployments ---------------------------------------------------------------------------------


def prepare_mlp(work: Path) -> tuple[Path, Path]:
    """Build the reference NPU stack and export a seeded MLP; returns (model file, spec file)."""
    import numpy as np

    from xpuflow.vendor_ref import build_reference_stack, export_mlp

    stack = build_reference_stack(work / "refnpu")
    rng = np.random.default_rng(1234)
    layers = [
        (
            (rng.standard_normal((n_in, n_out)) * math.sqrt(2.0 / n_in)).astype(np.float32),
            (rng.standard_normal(n_out) * 0.1).astype(np.float32),
        )
        for n_in, n_out in itertools.pairwise(MLP_WIDTHS)
    ]
    model = work / "mlp.xpfmlp"
    export_mlp(layers, model)
    return model, stack.spec


def deployments(mlp: Path, spec: Path) -> list[dict[str, Any]]:
    from xpuflow.bundled import minilm_path, smollm2_gguf_path

    common = {"device": "cpu", "load": "on_demand", "keep_alive_s": KEEP_ALIVE_S}
    smollm2, minilm = str(smollm2_gguf_path()), str(minilm_path())
    return [
        {
            "name": "smollm2-llamacpp",
            "backend": "llamacpp",
            "model": smollm2,
            "task": "chat",
            "max_batch_size": 1,
            "options": {"n_ctx": 2048, "gguf_type": "f16"},
            **common,
        },
        {
            "name": "smollm2-llamacpp-q4",
            "backend": "llamacpp",
            "model": smollm2,
            "task": "chat",
            "max_batch_size": 1,
            "options": {"n_ctx": 2048},
            **common,
        },
        {
            "name": "smollm2-transformers",
            "backend": "transformers",
            "model": smollm2,
            "task": "chat",
            "max_batch_size": 8,
            **common,
        },
        {
            "name": "minilm-onnxruntime",
            "backend": "onnxruntime",
            "model": minilm,
            "task": "embedding",
            "max_batch_size": 32,
            **common,
        },
        {
            "name": "minilm-openvino",
            "backend": "openvino",
            "model": minilm,
            "task": "embedding",
            "max_batch_size": 32,
            **common,
        },
        {
            "name": "mlp-npu",
            "backend": "binary",
            "model": str(mlp),
            "task": "tensor",
            "max_batch_size": 32,
            "options": {"spec": str(spec), "compile": {"opt_level": 2}},
            **common,
        },
    ]


def task_of(deps: list[dict[str, Any]]) -> dict[str, str]:
    return {d["name"]: d["task"] for d in deps}


# -- the gateway -------------------------------------------------------------------------------------


def start_gateway(
    config: dict[str, Any], work: Path, tag: str, timeout_s: float, src: Path | None
) -> tuple[Any, str]:
    import yaml

    path = work / f"{tag}.yaml"
    config = {**config, "api_keys": API_KEYS}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "xpuflow.cli.main", "serve", str(path), "--host", "127.0.0.1"]
    argv += ["--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", USER_KEY_ENV: USER_KEY, ADMIN_KEY_ENV: ADMIN_KEY}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    proc = start_process(argv, f"{url}/ready", timeout_s, env=env)
    return proc, url


def get_admin(url: str, timeout_s: float = 5.0, method: str = "GET") -> bytes:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return bytes(response.read())


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    return json.loads(get_admin(url, timeout_s))


def residency_row(url: str) -> dict[str, Any]:
    return next(r for r in get_json(f"{url}/admin/workers")["residency"] if r["device"] == "cpu")


def charge_startup_memory(url: str, worker_id: str) -> int:
    """Load and unload one model through the admin API, so the gateway re-measures its memory, and
    return what it then charges as unaccounted (see ``--charge-startup-memory``)."""
    get_admin(f"{url}/admin/workers/{worker_id}/load", timeout_s=120, method="POST")
    get_admin(f"{url}/admin/workers/{worker_id}/unload", timeout_s=120, method="POST")
    return int(residency_row(url)["unaccounted_bytes"])


def tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def model_name(worker_id: str) -> str:
    return worker_id.rsplit("/", 1)[0]


# -- the request mix ---------------------------------------------------------------------------------


def zipf_sequence(models: list[str], s: float, seed: int, n: int) -> tuple[list[str], dict[str, float]]:
    """``n`` models drawn from a Zipf law over ``models`` (ranks by a seeded shuffle)."""
    rng = random.Random(seed)
    ranked = list(models)
    rng.shuffle(ranked)
    weights = [1.0 / (rank**s) for rank in range(1, len(ranked) + 1)]
    total = sum(weights)
    return rng.choices(ranked, weights=weights, k=n), {
        m: w / total for m, w in zip(ranked, weights, strict=True)
    }


def request_for(model: str, task: str, index: int) -> tuple[str, dict[str, Any]]:
    if task == "chat":
        content = CHATS[index % len(CHATS)]
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
        return "/v1/chat/completions", body
    if task == "embedding":
        return "/v1/embeddings", {"model": model, "input": TEXTS[index % len(TEXTS)]}
    rng = random.Random(index)
    row = [round(rng.uniform(-1.0, 1.0), 4) for _ in range(MLP_WIDTHS[0])]
    tensor = {"name": "input", "shape": [1, MLP_WIDTHS[0]], "datatype": "FP32", "data": row}
    return f"/v2/models/{model}/infer", {"inputs": [tensor]}


def retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0


async def run_clients(
    url: str,
    sequence: list[str],
    tasks: dict[str, str],
    clients: int,
    duration_s: float,
    max_retries: int,
    timeout_s: float,
) -> list[dict[str, Any]]:
    import aiohttp

    records: list[dict[str, Any]] = []
    counter = itertools.count()
    start = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, index: int) -> dict[str, Any]:
        model = sequence[index]
        path, body = request_for(model, tasks[model], index)
        record: dict[str, Any] = {"i": index, "model": model, "t_s": time.monotonic() - start}
        statuses: list[int] = []
        cold = False
        first = try_start = time.perf_counter()
        while True:
            try_start = time.perf_counter()
            try:
                async with session.post(url + path, json=body) as response:
                    payload = await response.read()
                    statuses.append(response.status)
                    if response.status >= 300:
                        record["last_error"] = payload[:400].decode(errors="replace")
                    cold = cold or response.headers.get("x-xpuflow-cold-start") == "true"
                    if response.status == 503 and len(statuses) <= max_retries:
                        await asyncio.sleep(retry_after_s(response.headers.get("retry-after")))
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                statuses.append(0)
                record["error"] = f"{type(exc).__name__}: {exc}"
            break
        record.update(
            status=statuses[-1],
            tries=len(statuses),
            statuses=statuses,
            cold=cold,
            latency_ms=round((time.perf_counter() - first) * 1000.0, 2),
            last_try_ms=round((time.perf_counter() - try_start) * 1000.0, 2),
        )
        return record

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() - start < duration_s:
            index = next(counter)
            if index >= len(sequence):
                return
            records.append(await one(session, index))

    # Idle connections close on our side before the server's keep-alive (5 s) ends, or a retry after
    # Retry-After would race the server's close and fail on a dead connection.
    connector = aiohttp.TCPConnector(limit=clients, keepalive_timeout=2.0)
    headers = {"authorization": f"Bearer {USER_KEY}"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return sorted(records, key=lambda r: r["i"])


class Sampler(threading.Thread):
    """Every 100 ms: the gateway's accounted bytes (``/admin/workers``) and its RSS."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.samples: list[dict[str, Any]] = []
        self.failures = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self._stop_event.is_set():
            tick = time.monotonic()
            rss = tree_rss(self.pid)
            try:
                row = residency_row(self.url)
            except Exception:
                self.failures += 1
                row = None
            if row is not None:
                self.samples.append(
                    {
                        "t_s": round(tick - start, 3),
                        "resident_bytes": row["resident_bytes"],
                        "unaccounted_bytes": row["unaccounted_bytes"],
                        "rss_bytes": rss,
                        "resident": [m["name"] for m in row["models"] if m["resident"]],
                    }
                )
            self._stop_event.wait(max(0.0, SAMPLE_INTERVAL_S - (time.monotonic() - tick)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


# -- figures -----------------------------------------------------------------------------------------


def lru_by_count_hits(sequence: list[str], capacity: int) -> int:
    cache: dict[str, None] = {}
    hits = 0
    for model in sequence:
        if model in cache:
            hits += 1
            cache.pop(model)
        elif len(cache) >= capacity:
            cache.pop(next(iter(cache)))
        cache[model] = None
    return hits


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def rnd(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of requests")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--max-retries", type=int, default=5, help="503s retried per request")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds per try")
    parser.add_argument("--sizing-budget-gb", type=float, default=8.0)
    parser.add_argument(
        "--budget-gb", type=float, help="the run's CPU budget instead of the rule above (a diagnostic)"
    )
    parser.add_argument(
        "--charge-startup-memory",
        action="store_true",
        help="a diagnostic: measure what the gateway charges as unaccounted after its first unload, "
        "add it to the budget, and have it charged before the traffic starts",
    )
    parser.add_argument(
        "--at-commit", metavar="REV", help="run the gateway from `git archive REV src`, not the working tree"
    )
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--output", type=Path, help="write the JSON here instead of benchmarks/results")
    parser.add_argument(
        "--store-as",
        metavar="KEY",
        help="keep benchmarks/results/residency.json and add this run's figures under KEY (no raw requests)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xpuflow-residency-"))
    procs: list[Any] = []
    src, product = None, "the working tree"
    if args.at_commit:
        src, commit = export_source(args.at_commit)
        product = f"commit {commit}"
    try:
        mlp, spec = prepare_mlp(work)
        deps = deployments(mlp, spec)
        tasks = task_of(deps)
        backends = {d["name"]: d["backend"] for d in deps}

        # 1. sizing: what each model measures when the gateway loads it at start.
        proc, url = start_gateway(
            {"deployments": deps, "residency": {"budget_gb": {"cpu": args.sizing_budget_gb}}},
            work,
            "sizing",
            args.start_timeout,
            src,
        )
        procs.append(proc)
        sizing = {model_name(m["name"]): m["size_bytes"] for m in residency_row(url)["models"]}
        smallest = min(residency_row(url)["models"], key=lambda m: m["size_bytes"])["name"]
        startup_bytes = charge_startup_memory(url, smallest) if args.charge_startup_memory else 0
        stop_process(proc)
        procs.remove(proc)
        os.unlink(proc.log_path)
        print("measured sizes (MiB): " + ", ".join(f"{m} {b / MIB:.0f}" for m, b in sizing.items()))
        budget_bytes = max(int(BUDGET_SHARE * sum(sizing.values())), int(FIT_MARGIN * max(sizing.values())))
        budget_bytes += startup_bytes
        budget_gb = args.budget_gb if args.budget_gb is not None else budget_bytes / GIB

        # 2. the run.
        proc, url = start_gateway(
            {"deployments": deps, "residency": {"budget_gb": {"cpu": round(budget_gb, 4)}}},
            work,
            "run",
            args.start_timeout,
            src,
        )
        procs.append(proc)
        charged_bytes = charge_startup_memory(url, smallest) if args.charge_startup_memory else 0
        start_row = residency_row(url)
        rss_base = tree_rss(proc.pid)
        sizes = {model_name(m["name"]): m["size_bytes"] for m in start_row["models"]}
        # What models may hold: the budget, less what a diagnostic run had charged before the traffic.
        budget_bytes = start_row["budget_bytes"] - charged_bytes
        capacity_by_count = max(1, round(budget_bytes / statistics.mean(sizes.values())))
        rss_limit = budget_bytes * (1 + RSS_MARGIN_SHARE) + RSS_MARGIN_BYTES

        expected = int(args.duration * 500) + 1000  # more than the clients can send
        sequence, shares = zipf_sequence(list(tasks), args.zipf_s, args.seed, expected)
        sampler = Sampler(url, proc.pid)
        sampler.start()
        started = time.monotonic()
        records = asyncio.run(
            run_clients(
                url, sequence, tasks, args.clients, args.duration, args.max_retries, args.request_timeout
            )
        )
        elapsed_s = time.monotonic() - started
        time.sleep(0.3)
        sampler.stop()
        end_status = get_json(f"{url}/admin/workers")
        end_row = next(r for r in end_status["residency"] if r["device"] == "cpu")
        metrics = [
            line
            for line in get_admin(f"{url}/metrics").decode().splitlines()
            if line.startswith(("xpuflow_model_resident", "xpuflow_residency_"))
        ]
        stop_process(proc)
        procs.remove(proc)
        log_tail = Path(proc.log_path).read_text(errors="replace")[-4000:]
        os.unlink(proc.log_path)
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
        if src is not None:
            shutil.rmtree(src.parent, ignore_errors=True)

    # -- figures ---------------------------------------------------------------------------------------
    sent = [r["model"] for r in records]
    ok = [r for r in records if 200 <= r["status"] < 300]
    lost = [r for r in records if not 200 <= r["status"] < 300]
    hits = sum(1 for r in ok if not r["cold"])  # a lost request is no hit
    baseline_hits = lru_by_count_hits(sent, capacity_by_count)
    retried_503 = sum(r["statuses"].count(503) for r in ok)
    all_503 = sum(r["statuses"].count(503) for r in records)
    capacity_bytes = start_row["budget_bytes"]  # what the gateway enforces
    over_accounted = [s for s in sampler.samples if s["resident_bytes"] > capacity_bytes]
    over_rss = [s for s in sampler.samples if s["rss_bytes"] - rss_base > rss_limit]
    exceeded = [
        s
        for s in sampler.samples
        if s["resident_bytes"] > capacity_bytes or s["rss_bytes"] - rss_base > rss_limit
    ]
    rows_end = {model_name(m["name"]): m for m in end_row["models"]}

    per_model: dict[str, Any] = {}
    for name in tasks:
        mine = [r for r in ok if r["model"] == name]
        # the answering try only: a 503's Retry-After wait is not the model's latency
        warm = [r["last_try_ms"] for r in mine if not r["cold"]]
        cold = [r["last_try_ms"] for r in mine if r["cold"]]
        cold_minus_warm = (
            p50(cold) - p50(warm) if cold and warm else None  # type: ignore[operator]
        )
        row = rows_end.get(name, {})
        per_model[name] = {
            "backend": backends[name],
            "zipf_share": round(shares[name], 4),
            "requests": sum(1 for r in records if r["model"] == name),
            "cold_starts": len(cold),
            "warm_p50_ms": rnd(p50(warm)),
            "cold_p50_ms": rnd(p50(cold)),
            "cold_start_p50_ms": rnd(cold_minus_warm),
            "load_ms_p50": row.get("load_ms_p50"),
            "loads": row.get("loads"),
            "evictions": row.get("evictions"),
            "size_bytes": sizes.get(name),
            "sizing_run_size_bytes": sizing.get(name),
        }

    growth = [s["rss_bytes"] - rss_base for s in sampler.samples]
    figures = {
        "budget_exceeded_samples": len(exceeded),
        "budget_exceeded_accounted_samples": len(over_accounted),
        "budget_exceeded_rss_samples": len(over_rss),
        "hit_rate": round(hits / len(records), 4) if records else None,
        "hit_rate_lru_by_count": round(baseline_hits / len(records), 4) if records else None,
        "cold_start_p50_ms": {n: m["cold_start_p50_ms"] for n, m in per_model.items()},
        "load_ms_p50": {n: m["load_ms_p50"] for n, m in per_model.items()},
        "lost_requests": len(lost),
        "retried_503": retried_503,
        "responses_503": all_503,
        "requests": len(records),
        "requests_per_s": round(len(records) / elapsed_s, 2),
        "samples": len(sampler.samples),
        "sampler_failures": sampler.failures,
        "budget_bytes": budget_bytes,
        "rss_limit_bytes": int(rss_limit),
        "max_resident_bytes": max((s["resident_bytes"] for s in sampler.samples), default=None),
        "max_rss_growth_bytes": max(growth, default=None),
        "rss_growth_at_end_bytes": growth[-1] if growth else None,
        "max_unaccounted_bytes": max((s["unaccounted_bytes"] for s in sampler.samples), default=None),
        "lru_by_count_capacity": capacity_by_count,
        "gateway_loads": end_row["loads"],
        "gateway_evictions": end_row["evictions"],
        "gateway_idle_unloads": end_row["idle_unloads"],
    }
    targets = {
        "budget_exceeded_samples": "== 0",
        "hit_rate": ">= hit_rate_lru_by_count",
        "lost_requests": "== 0",
    }
    passed = {
        "budget_exceeded_samples": figures["budget_exceeded_samples"] == 0,
        "hit_rate": (figures["hit_rate"] or 0) >= (figures["hit_rate_lru_by_count"] or 0),
        "lost_requests": figures["lost_requests"] == 0,
    }

    print(
        f"\nbudget {budget_bytes / MIB:.0f} MiB (sum of sizes {sum(sizes.values()) / MIB:.0f} MiB); "
        f"RSS limit {rss_limit / MIB:.0f} MiB over a baseline of {rss_base / MIB:.0f} MiB; "
        f"LRU-by-count capacity {capacity_by_count}"
    )
    print_table(
        f"\nper deployment ({len(records)} requests in {elapsed_s:.0f} s, {args.clients} clients)",
        [
            (
                n,
                m["backend"],
                f"{m['size_bytes'] / MIB:.0f}" if m["size_bytes"] else "-",
                f"{m['zipf_share']:.2f}",
                str(m["requests"]),
                str(m["cold_starts"]),
                str(m["evictions"]),
                str(m["warm_p50_ms"]),
                str(m["cold_start_p50_ms"]),
                str(m["load_ms_p50"]),
            )
            for n, m in per_model.items()
        ],
        ("deployment", "backend", "MiB", "share", "requests", "cold", "evicted", "warm p50 ms",
         "cold-warm p50 ms", "load_ms_p50"),
    )  # fmt: skip
    print_table(
        "\nfigures",
        [
            ("budget_exceeded_samples", str(figures["budget_exceeded_samples"]), "0"),
            ("  accounted > budget", str(len(over_accounted)), ""),
            ("  RSS growth > budget + margin", str(len(over_rss)), ""),
            ("max RSS growth MiB", f"{(figures['max_rss_growth_bytes'] or 0) / MIB:.0f}", ""),
            (
                "unaccounted MiB at start / max",
                f"{start_row['unaccounted_bytes'] / MIB:.0f} / "
                f"{(figures['max_unaccounted_bytes'] or 0) / MIB:.0f}",
                "",
            ),
            ("hit_rate", str(figures["hit_rate"]), ">= baseline"),
            ("hit_rate_lru_by_count", str(figures["hit_rate_lru_by_count"]), ""),
            ("lost_requests", str(figures["lost_requests"]), "0"),
            ("503s (retried ok)", f"{all_503} ({retried_503})", ""),
        ],
        ("figure", "value", "target"),
    )
    for r in lost:
        print(f"lost: {r['model']} statuses {r['statuses']} {r.get('error') or r.get('last_error', '')}")
    if args.no_write:
        return
    method = __doc__.split("\n\n    python")[0]
    data = {
        **figures,
        "targets": targets,
        "passed": passed,
        "per_deployment": per_model,
        "settings": {
            "duration_s": args.duration,
            "elapsed_s": round(elapsed_s, 1),
            "clients": args.clients,
            "seed": args.seed,
            "zipf_s": args.zipf_s,
            "max_retries": args.max_retries,
            "keep_alive_s": KEEP_ALIVE_S,
            "budget_gb": round(start_row["budget_bytes"] / GIB, 4),
            "models_budget_bytes": budget_bytes,
            "charge_startup_memory": args.charge_startup_memory,
            "startup_bytes_sizing_run": startup_bytes,
            "charged_bytes_before_traffic": charged_bytes,
            "product": product,
            "budget_rule": f"max({BUDGET_SHARE} x sum of sizes, {FIT_MARGIN} x largest)"
            if args.budget_gb is None
            else "--budget-gb",
            "rss_margin": f"{RSS_MARGIN_SHARE:.0%} of the budget + {RSS_MARGIN_BYTES // MIB} MiB",
            "rss_baseline_bytes": rss_base,
            "lru_by_count_capacity_rule": "round(budget / mean measured size)",
        },
        "metrics_at_end": metrics,
        "residency_at_end": end_row,
        "raw": {
            "requests": records,
            "memory_samples": sampler.samples,
            "sizing_sizes_bytes": sizing,
        },
        "gateway_log_tail": log_tail.splitlines()[-30:],
        "method": method,
    }
    if args.output is not None:
        args.output.write_text(json.dumps(data, indent=2) + "\n")
        path = args.output
    elif args.store_as:
        path = HERE / "results" / "residency.json"
        stored = json.loads(path.read_text())
        data["raw"] = {
            "memory_samples": [
                {k: v for k, v in sample.items() if k != "resident"} for sample in sampler.samples
            ],
            "sizing_sizes_bytes": sizing,
        }
        stored[args.store_as] = {k: v for k, v in data.items() if k != "method"}
        path.write_text(json.dumps(stored, indent=2) + "\n")
    else:
        path = write_results("residency", data)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
