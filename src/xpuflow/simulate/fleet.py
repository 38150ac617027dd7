"""The simulated fleet: which workers exist, in which tiers, with which device models.

It is read from the same config file ``xpuflow serve`` takes. Each deployment of the simulated model
names its device model in ``options.device_model`` (a path, relative to the config file), the option
the fake backend reads too, so one file drives both the simulator and a gateway of sleeping fake
workers::

    deployments:
      - {name: big, backend: fake, replicas: 2, max_batch_size: 8, options: {device_model: big.yaml}}
      - {name: small, backend: fake, replicas: 6, options: {device_model: small.yaml}}
    models:
      - {name: chat, tiers: [{name: main, deployments: [big, small]}]}

    fleet = load_fleet("fleet.yaml")           # the first model (or model="chat")
    fleet.with_replicas({"big": 3}).worker_ids()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xpuflow.config import (
    DeploymentConfig,
    LogicalModelConfig,
    TierRef,
    XpuflowConfig,
    load_config,
)
from xpuflow.errors import ConfigError
from xpuflow.simulate.device_model import DeviceModel, load_device_model

__all__ = ["Fleet", "SimDeployment", "fleet_from_config", "load_fleet"]


@dataclass(frozen=True)
class SimDeployment:
    """One deployment: its device model and the worker settings the config gives it."""

    name: str
    model: DeviceModel
    replicas: int = 1
    max_batch_size: int = 8
    max_seq_len: int = 2048
    timeout_s: float = 120.0
    batch_policy: str = "adaptive"
    max_wait_s: float = 0.05
    queue_capacity: int = 256
    queue_policy: str = "priority"
    aging_s: float = 5.0
    max_in_flight: int | None = None

    def worker_ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(self.replicas)]


@dataclass(frozen=True)
class Fleet:
    """One logical model's tiers (strongest first) over its deployments."""

    model_name: str
    tiers: tuple[tuple[str, tuple[str, ...]], ...]
    deployments: Mapping[str, SimDeployment]
    tier_refs: tuple[TierRef, ...] = ()
    routing: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_retries: int = 2
    wait_weight: float = 0.0  # the model's worker-scorer setting (LogicalModelConfig.wait_weight)

    def worker_ids(self) -> list[str]:
        return [w for d in self.deployments.values() for w in d.worker_ids()]

    def replicas(self) -> dict[str, int]:
        return {name: d.replicas for name, d in self.deployments.items()}

    def with_replicas(self, counts: Mapping[str, int]) -> Fleet:
        """The same fleet with other replica counts (0 removes a deployment's workers)."""
        unknown = sorted(set(counts) - set(self.deployments))
        if unknown:
            raise ConfigError(
                f"no deployment {', '.join(unknown)} in model '{self.model_name}'; deployments: "
                f"{', '.join(self.deployments)}"
            )
        deployments = {
            name: dataclasses.replace(d, replicas=int(counts.get(name, d.replicas)))
            for name, d in self.deployments.items()
        }
        return dataclasses.replace(self, deployments=deployments)


def _deployment(dep: DeploymentConfig, base: Path) -> SimDeployment:
    path = dep.options.get("device_model")
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"deployment '{dep.name}' has no options.device_model; the simulator needs a device model per "
            "deployment (a YAML/JSON file, see docs/simulate.md)",
            field=f"deployments.{dep.name}.options.device_model",
        )
    file = Path(path)
    model = load_device_model(file if file.is_absolute() else base / file)
    if dep.max_in_flight is not None and not model.continuous:
        # what Worker says of a session that does not batch by itself
        raise ConfigError(
            f"deployment '{dep.name}': max_in_flight applies to devices that batch by themselves, and "
            f"device model '{model.name}' batches statically; drop max_in_flight or set continuous: true "
            "in the device model",
            field=f"deployments.{dep.name}.max_in_flight",
        )
    return SimDeployment(
        name=dep.name,
        model=model,
        replicas=dep.replicas,
        max_batch_size=dep.max_batch_size,
        max_seq_len=dep.max_seq_len,
        timeout_s=dep.timeout_s,
        batch_policy=dep.batching.policy,
        max_wait_s=dep.batching.max_wait_ms / 1000.0,
        queue_capacity=dep.batching.queue_capacity,
        queue_policy=dep.batching.queue_policy,
        aging_s=dep.batching.aging_s,
        max_in_flight=dep.max_in_flight,
    )


def fleet_from_config(config: XpuflowConfig, base: Path, model: str | None = None) -> Fleet:
    """The fleet of ``model`` (the first logical model when None; without ``models``, each deployment is
    its own one-tier model, as ``xpuflow serve`` wires it)."""
    models = list(config.models) or [
        LogicalModelConfig(name=d.name, tiers=[TierRef(name="default", deployments=[d.name])])
        for d in config.deployments
    ]
    if not models:
        raise ConfigError("the config has no deployments to simulate", field="deployments")
    chosen = models[0] if model is None else next((m for m in models if m.name == model), None)
    if chosen is None:
        raise ConfigError(
            f"no model '{model}' in the config; models: {', '.join(m.name for m in models)}",
            field="--model",
        )
    by_name = {d.name: d for d in config.deployments}
    used = [name for tier in chosen.tiers for name in tier.deployments]
    deployments = {name: _deployment(by_name[name], base) for name in dict.fromkeys(used)}
    tiers = tuple((t.name, tuple(t.deployments)) for t in chosen.tiers)
    return Fleet(
        chosen.name,
        tiers,
        deployments,
        tuple(chosen.tiers),
        dict(chosen.routing),
        chosen.max_retries,
        chosen.wait_weight,
    )


def load_fleet(path: str | Path, model: str | None = None) -> Fleet:
    """Read an xpuflow config file and build the fleet of ``model``."""
    file = Path(path)
    return fleet_from_config(load_config(file), file.resolve().parent, model)
