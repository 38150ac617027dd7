"""Injected failures: a worker killed at a time, or slowed by a factor from a time.

    parse_kill("chat-gpu/0@30")        # Fault(KILL, "chat-gpu/0", at_s=30.0)
    parse_slow("chat-gpu/1x4@10s")     # Fault(SLOW, "chat-gpu/1", at_s=10.0, factor=4.0); "×" works too

A killed worker fails the batches it is running at once and every later one a moment after it starts
(``KILL_FAIL_S``: a refused connection is fast), as a crashed engine process does; the health tracker,
the retries and the failover then do what they do in ``xpuflow serve``. A slowed worker runs every batch
it starts from then on ``factor`` times slower (a throttled or degraded device).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from xpuflow.errors import ConfigError

__all__ = [
    "KILL_FAIL_S",
    "Fault",
    "FaultKind",
    "check_workers",
    "parse_kill",
    "parse_slow",
]

#: How long a batch on a killed worker runs before it fails (a refused connection).
KILL_FAIL_S = 0.001

_TIME = r"([0-9]+(?:\.[0-9]*)?)\s*s?"
_KILL = re.compile(rf"^(.+)@{_TIME}$")
_SLOW = re.compile(rf"^(.+?)\s*[x×\*]\s*([0-9]+(?:\.[0-9]*)?)@{_TIME}$")


class FaultKind(str, Enum):
    KILL = "kill"
    SLOW = "slow"


@dataclass(frozen=True)
class Fault:
    """``kind`` happens to ``worker`` at ``at_s`` (simulated seconds from the first arrival)."""

    kind: FaultKind
    worker: str
    at_s: float
    factor: float = 1.0

    def describe(self) -> str:
        if self.kind is FaultKind.KILL:
            return f"kill {self.worker} at {self.at_s:g} s"
        return f"slow {self.worker} x{self.factor:g} at {self.at_s:g} s"


def parse_kill(text: str) -> Fault:
    """``WORKER@T``: kill WORKER at T seconds."""
    match = _KILL.match(text.strip())
    if not match:
        raise ConfigError(f"--kill '{text}': write WORKER@SECONDS, e.g. chat-gpu/0@30", field="--kill")
    return Fault(FaultKind.KILL, match.group(1).strip(), float(match.group(2)))


def parse_slow(text: str) -> Fault:
    """``WORKERxK@T`` (or ``×``): WORKER runs K times slower from T seconds."""
    match = _SLOW.match(text.strip())
    if not match:
        raise ConfigError(
            f"--slow '{text}': write WORKERxFACTOR@SECONDS, e.g. chat-gpu/1x4@10",
            field="--slow",
        )
    factor = float(match.group(2))
    if not factor > 0:
        raise ConfigError(f"--slow '{text}': the factor must be > 0", field="--slow")
    return Fault(FaultKind.SLOW, match.group(1).strip(), float(match.group(3)), factor)


def check_workers(faults: Iterable[Fault], worker_ids: Iterable[str]) -> None:
    """ConfigError when a fault names a worker the fleet does not have."""
    known = list(worker_ids)
    for fault in faults:
        if fault.worker not in known:
            shown = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
            raise ConfigError(
                f"{fault.kind.value} names worker '{fault.worker}', which the fleet does not have; "
                f"workers: {shown}",
                field=f"--{fault.kind.value}",
            )
