"""Capacity planning by discrete-event simulation: request traces through xpuflow's own routing and
scheduling code (tier rules, worker scorer, queues, batcher, health, retries) on a virtual clock, with
devices replaced by service-time models. ``docs/simulate.md`` says what is simulated and what is not::

    fleet = load_fleet("fleet.yaml")
    requests = load_trace("azure-conv", default_trace_dirs(), duration_s=600)
    result = Simulation(fleet, requests, policy="xpuflow", scale=2.0).run()
    summarize(result, parse_slo("ttft_p99=2s,e2e_p99=30s"))
"""

from __future__ import annotations

from xpuflow.simulate.capacity import (
    FleetPlan,
    capacity_per_s,
    find_min_fleet,
    mean_request_s,
)
from xpuflow.simulate.device_model import (
    BatchTiming,
    DeviceModel,
    load_device_model,
    save_device_model,
)
from xpuflow.simulate.engine import SimResult, Simulation
from xpuflow.simulate.faults import Fault, FaultKind, parse_kill, parse_slow
from xpuflow.simulate.fit import fit_backends_json, fit_bench_runs
from xpuflow.simulate.fleet import Fleet, SimDeployment, fleet_from_config, load_fleet
from xpuflow.simulate.policies import BASELINES, PolicyName, make_policy
from xpuflow.simulate.report import (
    Slo,
    meets_slo,
    parse_slo,
    render_table,
    summarize,
    write_plot,
)
from xpuflow.simulate.trace import (
    NAMED_TRACES,
    SimRequest,
    default_trace_dirs,
    load_trace,
)

__all__ = [
    "BASELINES",
    "NAMED_TRACES",
    "BatchTiming",
    "DeviceModel",
    "Fault",
    "FaultKind",
    "Fleet",
    "FleetPlan",
    "PolicyName",
    "SimDeployment",
    "SimRequest",
    "SimResult",
    "Simulation",
    "Slo",
    "capacity_per_s",
    "default_trace_dirs",
    "find_min_fleet",
    "fit_backends_json",
    "fit_bench_runs",
    "fleet_from_config",
    "load_device_model",
    "load_fleet",
    "load_trace",
    "make_policy",
    "mean_request_s",
    "meets_slo",
    "parse_kill",
    "parse_slo",
    "parse_slow",
    "render_table",
    "save_device_model",
    "summarize",
    "write_plot",
]
