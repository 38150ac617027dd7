"""A real multi-node Ray cluster on loopback, for tests and benchmarks: a head and worker raylets, each
with its own ports, resources and labels, started with ``ray start`` and stopped by process id::

    with LocalRayCluster(tmp_dir) as cluster:               # in a network namespace (see in_netns)
        cluster.start_head(resources={"head": 1})
        cluster.add_node("a", num_cpus=1, labels={"xpuflow-node": "a"})
        cluster.add_node("b", num_cpus=1)
        ray.init(address=cluster.address)
        cluster.kill_node("b")                              # SIGKILL its raylet and its processes
        cluster.add_node("c", num_cpus=1)                   # a like node joins

Why a network namespace: Ray looks up its own address outward even with ``--node-ip-address=127.0.0.1``,
so the cluster runs where loopback is the only interface (``unshare --net --map-root-user``, then
``ip link set lo up``; ``in_netns_argv`` builds that command line). Why process ids: ``ray stop`` stops
every Ray on the host. Ray renames its processes, so each node's processes are found by an environment
marker set before ``ray start`` (``XPUFLOW_RAY_CLUSTER`` and ``XPUFLOW_RAY_NODE``) in ``/proc/*/environ``.
Token auth stays off (``RAY_AUTH_MODE=disabled``): with it on, worker raylets fail ``InvalidAuthToken``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalRayCluster", "RayNode", "in_netns_argv", "netns_available"]

_PORTS_PER_NODE = 40


def netns_available() -> bool:
    """True when this user can create a network namespace (``unshare --net --map-root-user``)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        done = subprocess.run(
            ["unshare", "--net", "--map-root-user", "ip", "link", "set", "lo", "up"],
            check=False,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def in_netns_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` run in a new network namespace whose loopback is up (and nothing else)."""
    quoted = " ".join(_shell_quote(a) for a in argv)
    return ["unshare", "--net", "--map-root-user", "sh", "-c", f"ip link set lo up && exec {quoted}"]


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@dataclass
class RayNode:
    """One raylet of the cluster and the processes started under its marker."""

    name: str
    index: int
    head: bool
    labels: dict[str, str] = field(default_factory=dict)

    def pids(self, cluster_token: str) -> list[int]:
        return _marked_pids(cluster_token, self.name)


def _marked_pids(cluster_token: str, node: str | None = None) -> list[int]:
    """Processes whose environment carries this cluster's marker (and node's, when given)."""
    want = f"XPUFLOW_RAY_CLUSTER={cluster_token}".encode()
    want_node = f"XPUFLOW_RAY_NODE={node}".encode() if node is not None else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and (want_node is None or want_node in env):
            found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class LocalRayCluster:
    """Raylets on 127.0.0.1 with explicit ports (``base_port`` + 40 per node). See the module docstring."""

    def __init__(
        self,
        temp_dir: Path | str,
        *,
        base_port: int = 21000,
        object_store_memory_bytes: int = 80 * 1024 * 1024,
        env: Mapping[str, str] | None = None,
        health_check_period_ms: int = 500,
        health_check_failure_threshold: int = 3,
    ) -> None:
        self.token = uuid.uuid4().hex[:12]
        # Ray's Unix sockets live under the temp dir; keep the path short (sockets allow ~107 bytes)
        self.temp_dir = Path(temp_dir)
        self.base_port = base_port
        self.object_store_memory_bytes = object_store_memory_bytes
        self.nodes: dict[str, RayNode] = {}
        self._next_index = 0
        self._extra_env = dict(env or {})
        self._health = (health_check_period_ms, health_check_failure_threshold)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def _env(self, node: str) -> dict[str, str]:
        period_ms, threshold = self._health
        return {
            **os.environ,
            **self._extra_env,
            "XPUFLOW_RAY_CLUSTER": self.token,
            "XPUFLOW_RAY_NODE": node,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # a lost node leaves the cluster view in period * threshold (default 3 s * 5)
            "RAY_health_check_period_ms": str(period_ms),
            "RAY_health_check_failure_threshold": str(threshold),
            "RAY_health_check_initial_delay_ms": "0",
        }

    def _ports(self, index: int) -> list[str]:
        base = self.base_port + 100 + index * _PORTS_PER_NODE
        return [
            f"--node-manager-port={base}",
            f"--object-manager-port={base + 1}",
            f"--metrics-export-port={base + 2}",
            f"--dashboard-agent-grpc-port={base + 3}",
            f"--dashboard-agent-listen-port={base + 4}",
            f"--runtime-env-agent-port={base + 5}",
            f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + _PORTS_PER_NODE - 1}",
        ]

    def _start(self, name: str, args: list[str], labels: Mapping[str, str], head: bool) -> RayNode:
        if name in self.nodes:
            raise ValueError(f"node '{name}' is already in the cluster")
        index = self._next_index
        self._next_index += 1
        argv = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store_memory_bytes}",
            "--disable-usage-stats",
            *self._ports(index),
            *args,
        ]
        if labels:
            argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
        done = subprocess.run(
            argv, check=False, env=self._env(name), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray start for node '{name}' failed:\n{done.stdout}\n{done.stderr}")
        node = RayNode(name, index, head, dict(labels))
        self.nodes[name] = node
        return node

    def start_head(
        self,
        *,
        num_cpus: float = 0,
        resources: Mapping[str, float] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> RayNode:
        """The head (GCS) with no dashboard and Serve's proxy kept off port 8000 by its callers."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        return self._start(
            "head",
            [
                "--head",
                f"--port={self.base_port}",
                f"--ray-client-server-port={self.base_port + 1}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                f"--num-cpus={num_cpus:g}",
                "--num-gpus=0",
                f"--resources={json.dumps(dict(resources or {}))}",
            ],
            labels or {},
            head=True,
        )

    def add_node(
        self,
        name: str,
        *,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> RayNode:
        """A worker raylet joining the head."""
        return self._start(
            name,
            [
                f"--address={self.address}",
                f"--num-cpus={num_cpus:g}",
                "--num-gpus=0",
                f"--resources={json.dumps(dict(resources or {}))}",
            ],
            labels or {},
            head=False,
        )

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's raylet first (as when a machine is lost), then what it leaves behind."""
        node = self.nodes.pop(name)
        pids = node.pids(self.token)
        raylets = [p for p in pids if _comm(p) == "raylet"]
        for pid in raylets or pids:
            _kill(pid)
        for pid in pids:
            _kill(pid)
        return pids

    def stop(self) -> None:
        """Kill every process of this cluster, worker nodes first, then the head; wait for them."""
        for name in [n for n in self.nodes if n != "head"] + [n for n in self.nodes if n == "head"]:
            for pid in self.nodes[name].pids(self.token):
                _kill(pid)
        self.nodes.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = _marked_pids(self.token)
            if not left:
                break
            for pid in left:
                _kill(pid)
            time.sleep(0.1)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
