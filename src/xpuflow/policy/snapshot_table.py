"""Worker snapshots as columns: the worker scorer's choice among many workers without a Python object
per worker per request.

``WorkerScorer.choose`` reads one ``WorkerSnapshot`` per worker and builds a ranked, explained
candidate for each: right for a gateway tier of a few workers, and most of the cost of simulating a
fleet of dozens (``xpuflow simulate``). A ``SnapshotTable`` keeps the snapshots' numbers in C arrays,
set by the workers' owner when a worker's state changes, and ``WorkerScorer.choose_rows`` scores the
rows in C and draws among the best in Python: the same choice and the same random draw as ``choose``
over the same snapshots (the arithmetic is the scorer's, operation for operation)::

    table = SnapshotTable(len(workers))
    for row, worker in enumerate(workers):
        table.set(row, worker.snapshot(), worker.metrics.busy_state())
    table.reread(now_s, max_age_s=0.05)       # rows older than 50 ms read again at now_s
    row = scorer.choose_rows(table, None, WorkerNeeds(tokens=900), rng=rng, now_s=now_s)

A row set with its worker's ``WorkerMetrics.busy_state()`` can be read again at a later time by the
table itself, as a worker re-reads an unchanged snapshot: ``taken_at_s`` moves to now, the
utilisation is ``WorkerMetrics.utilization()`` at now (the same arithmetic) and the age of the oldest
request in flight grows by the time passed. A row whose oldest busy interval left the window is
returned to the owner instead (``reread``), which reads its metrics (they drop the interval) and
passes the reading on (``reread_row``).

The table is in a small C extension built at install time; ``SnapshotTable.available()`` says whether
it was. Without it there is no table and callers use ``choose`` over snapshots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from xpuflow.types import WorkerSnapshot

__all__ = ["SNAPSHOT_FIELDS", "BusyState", "SnapshotTable", "snapshot_from_fields"]


def _table_class() -> Any:
    """The C ``Table`` when the extension was built (it is optional), else ``None``."""
    try:
        from xpuflow.policy._snapshot_table import Table
    except ImportError:  # built without a C compiler
        return None
    return Table


_Table = _table_class()

BusyState = tuple[float, float, float, float | None, float | None, float | None]
"""``WorkerMetrics.busy_state()``: what the table needs to re-read a worker's utilisation later."""

_new_snapshot = object.__new__

#: ``WorkerSnapshot``'s fields in declaration order: a row may be set from a tuple of their values.
SNAPSHOT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(WorkerSnapshot))


def snapshot_from_fields(values: tuple[Any, ...]) -> WorkerSnapshot:
    """``WorkerSnapshot(*values)``, without the frozen dataclass's __init__ (the same object)."""
    snapshot = _new_snapshot(WorkerSnapshot)
    snapshot.__dict__.update(zip(SNAPSHOT_FIELDS, values, strict=True))
    return snapshot


class SnapshotTable:
    """``size`` rows, each one worker's snapshot; see the module docstring. Not thread-safe."""

    __slots__ = ("_table", "set", "size", "top")

    def __init__(self, size: int) -> None:
        if _Table is None:
            raise RuntimeError(
                "the snapshot table's C extension (xpuflow.policy._snapshot_table) is not built; reinstall "
                "xpuflow with a C compiler present (pip install -e .), or score snapshots with "
                "WorkerScorer.choose"
            )
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = size
        self._table: Any = _Table(size)
        # the C calls themselves: they run on every request
        self.set = self._table.set
        self.top = self._table.top

    @staticmethod
    def available() -> bool:
        """Whether the C extension was built (without it, ``SnapshotTable()`` raises)."""
        return _Table is not None

    #: ``set(row, snapshot, busy=None)``: row ``row`` is now ``snapshot`` (or the tuple of its fields' values
    #: in declaration order, ``SNAPSHOT_FIELDS``: no object is built unless ``snapshot(row)`` asks for
    #: it); with ``busy`` (``BusyState`` or None) the table can re-read it later by itself.
    set: Callable[..., None]

    def reread(self, now_s: float, max_age_s: float, rows: Sequence[int] | None = None) -> list[int]:
        """Read every row (of ``rows``; None: all) taken more than ``max_age_s`` before ``now_s`` again
        at ``now_s``. Returns the rows it could not re-read because their oldest busy interval left the
        window: pass each its worker's reading with ``reread_row``."""
        result: list[int] = self._table.reread(now_s, max_age_s, None if rows is None else tuple(rows))
        return result

    def reread_row(self, row: int, now_s: float, utilization_pct: float, busy: BusyState) -> None:
        """Read one row again at ``now_s`` with its worker's utilisation and busy state."""
        self._table.reread_row(row, now_s, utilization_pct, busy)

    def snapshot(self, row: int) -> WorkerSnapshot:
        """The row as a ``WorkerSnapshot`` (the one it was set from, read again if it was)."""
        base, taken_at_s, utilization_pct, oldest_in_flight_s = self._table.read(row)
        if isinstance(base, tuple):
            base = snapshot_from_fields(base)
        if (
            base.taken_at_s == taken_at_s
            and base.utilization_pct == utilization_pct
            and base.oldest_in_flight_s == oldest_in_flight_s
        ):
            return base  # type: ignore[no-any-return]
        # the same snapshot with three fields moved: copied without the frozen dataclass's __init__
        fresh = _new_snapshot(WorkerSnapshot)
        fields = fresh.__dict__
        fields.update(base.__dict__)
        fields["taken_at_s"] = taken_at_s
        fields["utilization_pct"] = utilization_pct
        fields["oldest_in_flight_s"] = oldest_in_flight_s
        return fresh

    #: ``top(rows, now_s, tokens, memory_bytes, top_k, params) -> (rows, scores, weights) | None``: the C
    #: scoring, for ``WorkerScorer.choose_rows`` (its only intended caller).
    top: Callable[
        [tuple[int, ...] | None, float, int | None, int | None, int, tuple[float, ...]],
        tuple[list[int], list[float], list[float]] | None,
    ]
