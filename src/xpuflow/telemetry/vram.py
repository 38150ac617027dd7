"""Live GPU memory: a daemon thread polls a source every few milliseconds; readers take a snapshot.

The router asks "how much VRAM is free on cuda:0 right now?" on every request, so the answer must cost
a pointer read, not an NVML call. ``VRAMMonitor`` polls in the background (15 ms by default) and swaps in
a new immutable ``VramSnapshot`` after each poll; a reader always sees one whole poll, never half of one::

    with VRAMMonitor.auto(poll_interval_ms=15) as monitor:
        reading = monitor.snapshot().get("cuda:0")
        if reading is not None and reading.free_gb < 1.5:
            ...  # not enough headroom

Sources: ``NvmlSource`` (pynvml called directly, no ``nvidia-smi`` subprocess), ``TorchCudaSource``
(``torch.cuda.mem_get_info``, the fallback), and ``xpuflow.testing.FakeVramSource`` for tests.
``VRAMMonitor.auto`` picks the first that opens and says why the others did not; it never raises.
The poller's own CPU time is measured (``stats().cpu_fraction``) so its cost is a number, not a guess.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from xpuflow.clock import Clock, SystemClock
from xpuflow.errors import ConfigError, DiscoveryError

__all__ = [
    "GIB",
    "GpuMemory",
    "MonitorStats",
    "NvmlSource",
    "TorchCudaSource",
    "VRAMMonitor",
    "VramSnapshot",
    "VramSource",
]

log = logging.getLogger(__name__)

GIB = 1 << 30
MIN_POLL_INTERVAL_MS = 1.0
MAX_POLL_INTERVAL_MS = 1000.0
SourceChoice = Literal["auto", "nvml", "torch", "none"]


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """One GPU's memory at one instant. ``taken_at_s`` is the monitor clock's monotonic time of the read;
    ``utilization_pct`` is None where the source cannot tell (torch, or a board without the counter)."""

    device: str
    free_bytes: int
    used_bytes: int
    total_bytes: int
    utilization_pct: float | None
    taken_at_s: float

    @property
    def free_gb(self) -> float:
        """Free memory in GiB (2**30 bytes), the unit nvidia-smi and torch report."""
        return self.free_bytes / GIB

    @property
    def used_gb(self) -> float:
        return self.used_bytes / GIB

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "free_bytes": self.free_bytes,
            "used_bytes": self.used_bytes,
            "total_bytes": self.total_bytes,
            "utilization_pct": self.utilization_pct,
            "taken_at_s": self.taken_at_s,
        }


_NO_READINGS: Mapping[str, GpuMemory] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class VramSnapshot:
    """Every GPU's reading from one poll, keyed by device id ("cuda:0"). Immutable, so sharing is safe.

    ``error`` says why the latest poll failed (the readings are then the last good ones, and their
    ``taken_at_s`` shows how old) or why there is no source at all.
    """

    readings: Mapping[str, GpuMemory] = field(default_factory=lambda: _NO_READINGS)
    taken_at_s: float | None = None
    source: str = "none"
    error: str | None = None
    polls: int = 0

    def get(self, device: str) -> GpuMemory | None:
        return self.readings.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self.readings

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "taken_at_s": self.taken_at_s,
            "error": self.error,
            "polls": self.polls,
            "devices": [reading.to_dict() for reading in self.readings.values()],
        }


@runtime_checkable
class VramSource(Protocol):
    """Where readings come from. ``open`` raises ``DiscoveryError`` (saying what to install or fix) when
    the source cannot work here; ``read`` returns one ``GpuMemory`` per GPU that answered, stamped
    ``now_s``; ``close`` releases the library. Example: ``NvmlSource()``, ``FakeVramSource({...})``."""

    name: str

    def open(self) -> None: ...

    def read(self, now_s: float) -> Sequence[GpuMemory]: ...

    def close(self) -> None: ...


def _describe(exc: BaseException) -> str:
    """An NVML error as text; pynvml's ``__str__`` itself calls the library, which may be the problem."""
    try:
        text = str(exc)
    except Exception:  # the message lookup needs the library that just failed
        text = ""
    return text or type(exc).__name__


class NvmlSource:
    """Reads NVML directly: one ``nvmlDeviceGetMemoryInfo`` and one ``nvmlDeviceGetUtilizationRates``
    per GPU per poll (a few microseconds each, no subprocess).

    ``nvml`` is a module-like object with pynvml's functions (``xpuflow.testing.FakeNvml`` in tests);
    by default ``pynvml`` (package nvidia-ml-py) is imported in ``open``. ``close`` balances ``open``'s
    ``nvmlInit`` with one ``nvmlShutdown``.
    """

    name = "nvml"

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml: Any = nvml
        self._handles: list[tuple[str, Any]] = []
        self._no_utilization: set[str] = set()
        self._failing: set[str] = set()
        self._open = False

    def open(self) -> None:
        if self._open:
            return
        nvml = self._nvml if self._nvml is not None else _import_pynvml()
        try:
            nvml.nvmlInit()
        except Exception as exc:  # no driver, no libnvidia-ml, no permission
            raise DiscoveryError(
                f"NVML did not start ({_describe(exc)}); install the NVIDIA driver (it provides "
                "libnvidia-ml.so.1) to watch GPU memory"
            ) from exc
        try:
            count = int(nvml.nvmlDeviceGetCount())
            handles = [(f"cuda:{i}", nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as exc:
            _shutdown(nvml)
            raise DiscoveryError(f"NVML started but could not list GPUs ({_describe(exc)})") from exc
        self._nvml, self._handles, self._open = nvml, handles, True

    def read(self, now_s: float) -> list[GpuMemory]:
        if not self._open:
            raise DiscoveryError("NvmlSource.read() before open(); call open() first")
        nvml = self._nvml
        readings = []
        for device, handle in self._handles:
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # one GPU falling off the bus must not blank the others
                if device not in self._failing:
                    self._failing.add(device)
                    log.warning("NVML memory read failed for %s: %s", device, _describe(exc))
                continue
            self._failing.discard(device)
            readings.append(
                GpuMemory(
                    device,
                    int(memory.free),
                    int(memory.used),
                    int(memory.total),
                    self._utilization(device, handle),
                    now_s,
                )
            )
        return readings

    def _utilization(self, device: str, handle: Any) -> float | None:
        if device in self._no_utilization:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:
            # Not Supported (MIG slices, some boards) stays so: stop paying for the exception every poll.
            if getattr(exc, "value", None) == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                self._no_utilization.add(device)
            return None

    def close(self) -> None:
        if self._open:
            self._open = False
            self._handles = []
            _shutdown(self._nvml)


def _import_pynvml() -> Any:
    try:
        with warnings.catch_warnings():  # the deprecated `pynvml` wrapper package warns on import
            warnings.simplefilter("ignore")
            import pynvml
    except Exception as exc:
        raise DiscoveryError(
            "nvidia-ml-py is not installed; pip install 'xpuflow[nvidia]' to watch GPU memory with NVML"
        ) from exc
    return pynvml


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:  # nothing left to undo
        log.debug("nvmlShutdown failed: %s", exc)


class TorchCudaSource:
    """Reads ``torch.cuda.mem_get_info`` per device: the fallback where NVML is missing.

    It creates a CUDA context on each device it reads (hundreds of MB and a second or two, once), so it
    suits a process that already runs torch on those GPUs. ``cuda`` stands in for ``torch.cuda`` in tests.
    """

    name = "torch"

    def __init__(self, cuda: Any | None = None) -> None:
        self._cuda = cuda
        self._count = 0

    def open(self) -> None:
        cuda = self._cuda
        if cuda is None:
            try:
                import torch
            except Exception as exc:
                raise DiscoveryError("torch is not installed, so torch.cuda cannot report memory") from exc
            cuda = torch.cuda
        try:
            available = bool(cuda.is_available())
            count = int(cuda.device_count()) if available else 0
        except Exception as exc:
            raise DiscoveryError(f"torch.cuda failed to start ({exc})") from exc
        if not available:
            raise DiscoveryError("torch sees no CUDA device (CPU-only build or no driver)")
        self._cuda, self._count = cuda, count

    def read(self, now_s: float) -> list[GpuMemory]:
        if self._cuda is None:
            raise DiscoveryError("TorchCudaSource.read() before open(); call open() first")
        readings = []
        for index in range(self._count):
            free, total = self._cuda.mem_get_info(index)
            readings.append(GpuMemory(f"cuda:{index}", int(free), int(total - free), int(total), None, now_s))
        return readings

    def close(self) -> None:
        """Nothing to release: torch owns its CUDA contexts for the life of the process."""


@dataclass(frozen=True)
class MonitorStats:
    """What the poller cost: ``cpu_fraction`` is its thread CPU time over wall time (0.002 = 0.2 % of
    one core); ``cpu_per_poll_us`` is the mean CPU time of one poll."""

    polls: int
    failures: int
    cpu_time_s: float
    wall_time_s: float
    poll_interval_ms: float
    source: str

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_time_s / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def cpu_per_poll_us(self) -> float:
        return self.cpu_time_s / self.polls * 1e6 if self.polls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "poll_interval_ms": self.poll_interval_ms,
            "polls": self.polls,
            "failures": self.failures,
            "cpu_time_s": self.cpu_time_s,
            "wall_time_s": self.wall_time_s,
            "cpu_fraction": self.cpu_fraction,
            "cpu_per_poll_us": self.cpu_per_poll_us,
        }


@dataclass
class _Counters:
    polls: int = 0
    failures: int = 0
    cpu_time_s: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None
    logged: set[str] = field(default_factory=set)


class VRAMMonitor:
    """Polls a ``VramSource`` on a daemon thread and publishes immutable snapshots.

    ``snapshot()`` is one attribute read (safe from any thread). ``start()`` opens the source, takes
    a first reading synchronously (so a started monitor always has one) and starts the thread;
    ``stop()`` ends the thread, joins it and closes the source. A monitor with no usable source is
    still a monitor: its snapshot is empty and ``error`` says why. Neither call raises for a source
    that cannot open. Use it as a context manager to pair them.
    """

    def __init__(
        self,
        source: VramSource | None,
        *,
        poll_interval_ms: float = 15.0,
        clock: Clock | None = None,
        unavailable_reason: str | None = None,
    ) -> None:
        if not MIN_POLL_INTERVAL_MS <= poll_interval_ms <= MAX_POLL_INTERVAL_MS:
            raise ConfigError(
                f"poll_interval_ms must be within {MIN_POLL_INTERVAL_MS:g}..{MAX_POLL_INTERVAL_MS:g}, "
                f"got {poll_interval_ms}; 10-20 ms keeps free VRAM fresh for about 1 % of one core",
                field="vram_poll_interval_ms",
            )
        self._source = source
        self.poll_interval_ms = float(poll_interval_ms)
        self._clock: Clock = clock or SystemClock()
        self._opened = False
        reason = unavailable_reason or ("no VRAM source" if source is None else None)
        self._snapshot = VramSnapshot(source=source.name if source else "none", error=reason)
        self._lock = threading.Lock()  # serialises start/stop and polls, never readers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters = _Counters()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def auto(
        cls,
        *,
        source: SourceChoice = "auto",
        poll_interval_ms: float = 15.0,
        clock: Clock | None = None,
        nvml: Any | None = None,
        torch_cuda: Any | None = None,
    ) -> VRAMMonitor:
        """A monitor over the first source that opens: NVML, then ``torch.cuda``. Never raises.

        In ``auto`` mode torch is tried only when it is already imported (or ``torch_cuda`` is given):
        importing torch just to find no GPU costs seconds. ``source="torch"`` forces it. The returned
        monitor's source is already open; ``start()`` it for live readings or ``poll_once()`` for one.
        """
        reasons: list[str] = []
        candidates: list[VramSource] = []
        if source in ("auto", "nvml"):
            candidates.append(NvmlSource(nvml))
        try_torch = source == "torch" or (
            source == "auto" and (torch_cuda is not None or "torch" in sys.modules)
        )
        if try_torch:
            candidates.append(TorchCudaSource(torch_cuda))
        for candidate in candidates:
            try:
                candidate.open()
            except Exception as exc:  # DiscoveryError, or anything a broken binding raises
                reasons.append(str(exc))
                log.debug("VRAM source %s unavailable: %s", candidate.name, exc)
                continue
            monitor = cls(candidate, poll_interval_ms=poll_interval_ms, clock=clock)
            monitor._opened = True
            if reasons:
                log.info("VRAM monitor uses %s (%s)", candidate.name, "; ".join(reasons))
            return monitor
        if source == "auto" and not try_torch:
            reasons.append("torch.cuda not tried (torch is not loaded; choose the 'torch' source to force)")
        reason = "no VRAM source: " + ("; ".join(reasons) if reasons else "disabled by configuration")
        return cls(None, poll_interval_ms=poll_interval_ms, clock=clock, unavailable_reason=reason)

    # -- readers -----------------------------------------------------------------------------------

    def snapshot(self) -> VramSnapshot:
        """The latest whole poll. Never blocks."""
        return self._snapshot

    @property
    def source_name(self) -> str:
        return self._source.name if self._source is not None else "none"

    @property
    def available(self) -> bool:
        return self._source is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> str | None:
        return self._snapshot.error

    def stats(self) -> MonitorStats:
        c = self._counters
        if c.started_at is None:
            wall = 0.0
        else:
            wall = (c.stopped_at if c.stopped_at is not None else time.monotonic()) - c.started_at
        return MonitorStats(c.polls, c.failures, c.cpu_time_s, wall, self.poll_interval_ms, self.source_name)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> VRAMMonitor:
        """Open the source, read once, start polling. Idempotent; returns self."""
        with self._lock:
            if self.running or not self._ensure_open():
                return self
            self._poll_locked()
            self._stop = threading.Event()
            self._counters.started_at, self._counters.stopped_at = time.monotonic(), None
            self._thread = threading.Thread(target=self._run, name="xpuflow-vram-monitor", daemon=True)
            self._thread.start()
        return self

    def poll_once(self) -> VramSnapshot:
        """Read now, on the calling thread (tests, CLIs and one-shot checks need no thread)."""
        with self._lock:
            if self._ensure_open():
                self._poll_locked()
        return self._snapshot

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop polling, join the thread and close the source. Idempotent."""
        thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("VRAM monitor thread did not stop within %.1f s", timeout_s)
        with self._lock:
            self._thread = None
            if self._counters.started_at is not None and self._counters.stopped_at is None:
                self._counters.stopped_at = time.monotonic()
            if self._opened and self._source is not None:
                self._opened = False
                try:
                    self._source.close()
                except Exception as exc:  # closing must not turn a shutdown into a crash
                    log.debug("closing VRAM source %s failed: %s", self._source.name, exc)

    close = stop

    def __enter__(self) -> VRAMMonitor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _ensure_open(self) -> bool:
        if self._source is None:
            return False
        if not self._opened:
            try:
                self._source.open()
            except Exception as exc:
                log.warning("VRAM source %s did not open: %s", self._source.name, exc)
                self._snapshot = VramSnapshot(source=self._source.name, error=str(exc))
                return False
            self._opened = True
        return True

    def _run(self) -> None:
        cpu_start = time.thread_time()
        interval_s = self.poll_interval_ms / 1000.0
        next_at = time.monotonic()
        stop = self._stop
        while True:
            next_at += interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow read, a paused process): skip ticks rather than burst
                next_at, delay = time.monotonic(), 0.0
            if stop.wait(delay):
                break
            with self._lock:
                if stop.is_set():
                    break
                self._poll_locked()
            self._counters.cpu_time_s = time.thread_time() - cpu_start

    def _poll_locked(self) -> None:
        assert self._source is not None
        counters = self._counters
        counters.polls += 1
        now = self._clock.monotonic()
        try:
            readings = self._source.read(now)
        except Exception as exc:  # keep the last good readings; their age tells readers how stale
            counters.failures += 1
            message = f"{self._source.name} read failed: {_describe(exc)}"
            if message not in counters.logged:
                counters.logged.add(message)
                log.warning("VRAM monitor: %s", message)
            old = self._snapshot
            self._snapshot = VramSnapshot(old.readings, old.taken_at_s, old.source, message, counters.polls)
            return
        mapping = MappingProxyType({reading.device: reading for reading in readings})
        # One reference assignment publishes the whole poll: readers see the old snapshot or the new one.
        self._snapshot = VramSnapshot(mapping, now, self._source.name, None, counters.polls)
