"""xpuflow on a Ray cluster: one config, one endpoint, workers placed across nodes.

The gateway keeps every decision (tier rules, worker scoring, QoS, retries); Ray runs discovery on each
node, places workers by resources and labels, restarts them after a crash or a lost node, carries streams
and cancellation. The modules, one concept each:

- ``resources``: xpuflow device types -> Ray resources (``GPU``, ``accel_npu``, ``CPU``).
- ``connection``: joining (or starting) the Ray cluster named by the ``cluster`` config section.
- ``inventory``: discovery on every node, merged into one inventory whose devices carry their node.
- ``placement``: which devices and nodes a deployment's replicas go to, and why (pure).
- ``messages``: requests, results and errors as they cross between processes.
- ``worker_actor``: the Ray actor beside the device: session, queue, batcher, health, metrics.
- ``ray_worker``: the gateway's proxy of one actor, with the interface the router's scorer reads.
- ``runtime``: what the orchestrator calls: connect, place, start and watch workers, refresh nodes.

Ray is imported inside these modules' functions, so ``import xpuflow`` never needs it.
"""

from __future__ import annotations

__all__: list[str] = []
