"""Joining the Ray cluster that the ``cluster`` config section names, or starting a one-node Ray::

    connect(ClusterConfig(address="auto"))          # the cluster this machine is part of
    connect(ClusterConfig(address="ray://head:10001"))
    connect(ClusterConfig(address="local"))         # a one-node Ray inside this process

A gateway that is already connected (tests, a benchmark driver, several orchestrators in one process)
keeps its connection. Ray's absence or an unreachable head is a ``ConfigError`` that says what to do.

Before it connects, the gateway tells its Ray core worker not to wait for the GCS's death notice when a
call to an actor breaks (``RAY_timeout_ms_task_wait_for_death_info=0``, unless already set): the call
then fails with ``ActorUnavailableError`` as soon as the worker's connection resets (tens of ms after a
node's processes die) instead of when the GCS declares the node dead (seconds). The gateway retries
such calls on other workers; xpuflow's actors retry nothing themselves (``max_task_retries=0``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from xpuflow.config import ClusterConfig
from xpuflow.errors import ConfigError

__all__ = ["FAST_FAILURE_ENV", "connect", "import_ray"]

log = logging.getLogger(__name__)

#: Ray setting (read from the environment when the core worker starts): how long a broken actor call
#: waits for the GCS to say why the actor died before it fails. 0: fail at once, the gateway retries.
FAST_FAILURE_ENV = "RAY_timeout_ms_task_wait_for_death_info"


def import_ray() -> Any:
    """The ``ray`` module, or ConfigError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "the cluster section needs Ray; install it with: pip install 'xpuflow[ray]'",
            field="cluster.engine",
        ) from exc
    return ray


def connect(config: ClusterConfig) -> bool:
    """Connect this process to the cluster (no-op when it already is). Returns True when this call
    connected, so its caller knows to disconnect on stop."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault(FAST_FAILURE_ENV, "0")
    kwargs: dict[str, Any] = {
        "namespace": config.namespace,
        "log_to_driver": False,
        "configure_logging": False,
    }
    try:
        if config.address == "local":
            # a one-node Ray for one machine: no dashboard, Serve's proxy untouched
            ray.init(include_dashboard=False, **kwargs)
        else:
            ray.init(address=config.address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at '{config.address}': {exc}; start it (ray start --head) or "
            "fix cluster.address",
            field="cluster.address",
        ) from exc
    log.info("joined Ray cluster %s (%d node(s))", config.address, len(ray.nodes()))
    return True
