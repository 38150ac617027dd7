"""Shared helpers for benchmarks: whole-process timing, medians, tables and JSON results."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Open-ended requests, so greedy decoding runs to the token limit instead of stopping early.
PROMPTS = [
    "Write a long story about the sea.",
    "Describe in detail how a CPU cache works.",
    "Write a long essay about the history of Rome.",
    "Explain in detail how airplanes fly.",
    "Describe your favourite city in great detail.",
    "Write a long poem about mountains.",
    "Explain in detail how vaccines work.",
    "Describe the water cycle in great detail.",
]


def time_process(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    """Wall-clock milliseconds of each of ``runs`` executions of ``argv`` (after one warm-up run)."""
    subprocess.run(argv, check=True, capture_output=True, env=env)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
    }


def machine() -> dict[str, Any]:
    import os

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({**data, "machine": machine(), "measured_at": time.time()}, indent=2) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


async def smollm2_session(max_batch_size: int, *, continuous: bool = False) -> tuple[Any, Path]:
    """SmolLM2-135M-Instruct on the CPU through the ``transformers`` backend, one torch thread (the GGUF
    is dequantised once into the artifact store), optionally with ``options.continuous_batching``.
    Returns the session and the dequantised model folder."""
    from xpuflow.artifacts.builder import build_all
    from xpuflow.artifacts.store import ArtifactStore
    from xpuflow.backends.base import ModelConfig
    from xpuflow.backends.transformers.plugin import DEQUANT_PROFILE, TransformersPlugin
    from xpuflow.bundled import smollm2_gguf_path
    from xpuflow.types import Resource, ResourceType

    cpu = Resource("cpu", ResourceType.CPU, "host CPU")
    plugin = TransformersPlugin()
    options = {"num_threads": 1, "continuous_batching": continuous}
    config = ModelConfig(
        "smollm2", smollm2_gguf_path(), "chat", max_batch_size=max_batch_size, options=options
    )
    artifacts = build_all(plugin, [cpu], config, ArtifactStore())
    session = await plugin.create_session([cpu], config, artifacts)
    return session, artifacts[DEQUANT_PROFILE].path


# -- processes for the benchmarks that drive `xpuflow serve` as users run it --------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except Exception:
        return False


def start_process(
    argv: list[str], ready_url: str, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so it can be stopped with its children) and wait, bounded,
    until ``ready_url`` answers 200. Its output goes to a temporary log file (``proc.log_path``)."""
    import os
    import tempfile

    log = tempfile.NamedTemporaryFile(prefix="xpuflow-bench-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc.log_path = log.name  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode}: {tail}")
        if http_ok(ready_url):
            return proc
        time.sleep(0.1)
    stop_process(proc)
    os.unlink(log.name)
    raise RuntimeError(f"{' '.join(argv[:3])} did not answer {ready_url} within {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the session of a process this script started (SIGCONT first, in case it was stopped),
    then SIGKILL it if it is still there after ``timeout_s``."""
    import os
    import signal

    if proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def process_tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    return sum(p.memory_info().rss for p in process_tree(pid)) / (1 << 20)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its children have used."""
    return sum(sum(p.cpu_times()[:2]) for p in process_tree(pid))


def xpuflow_binary() -> Path:
    """The ``xpuflow`` console script of the interpreter running the benchmark (the project's venv)."""
    return Path(sys.executable).parent / "xpuflow"


def export_source(rev: str) -> tuple[Path, str]:
    """``src/`` of commit ``rev`` in a temporary folder (with the C extensions built in the working
    tree, which git does not hold), and the full commit id: a gateway started with ``src=`` that folder
    runs that commit, whatever the shared working tree holds at the moment."""
    import shutil
    import tempfile

    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix=f"xpuflow-{commit[:10]}-"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "src"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    for built in (root / "src").rglob("*.so"):
        target = folder / built.relative_to(root)
        if target.parent.exists() and not target.exists():
            shutil.copy2(built, target)
    return folder / "src", commit


def start_xpuflow(
    config: dict[str, Any], *, timeout_s: float = 60.0, src: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``xpuflow serve CONFIG --port P`` in its own process, ``config`` written as YAML to a temporary
    file; returns the process once ``/health`` answers, and the gateway's base URL. ``src``: run the
    package from this source folder (``export_source``) instead of the installed one."""
    import os
    import shutil
    import tempfile

    import yaml

    path = Path(tempfile.mkdtemp(prefix="xpuflow-bench-")) / "xpuflow.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(xpuflow_binary()), "serve", str(path), "--host", "127.0.0.1", "--port", str(port)]
    env = None
    if src is not None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        }
    try:
        proc = start_process(argv, f"{url}/health", timeout_s, env=env)
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    proc.config_dir = path.parent  # type: ignore[attr-defined]  # the caller removes it when done
    return proc, url


def remote_deployment(name: str, upstream: str, **fields: Any) -> dict[str, Any]:
    """A ``remote_openai`` deployment of the mock model at ``upstream``; ``options`` in ``fields`` are
    merged into the default ones."""
    options = {"base_url": upstream, "model": "mock", **fields.pop("options", {})}
    return {"name": name, "backend": "remote_openai", "task": "chat", **fields, "options": options}
