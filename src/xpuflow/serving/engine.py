"""Moved to ``xpuflow.engine`` (the contract sits below the gateway and the orchestrator); this name is
kept until the OIP modules import it from there."""

from xpuflow.engine import *  # noqa: F403
from xpuflow.engine import __all__  # noqa: F401
