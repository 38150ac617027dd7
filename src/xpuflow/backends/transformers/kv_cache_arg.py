"""How a transformers model takes and returns its key/value cache, across transformers versions.

transformers up to 5.2x names the cache ``past_key_values`` in ``forward``, ``generate`` and model
outputs; newer releases rename it ``cache`` (the old keyword warns, and goes in 5.40 for ``forward``,
6.0 for ``generate``; outputs carry only ``cache``). xpuflow supports both ranges, so the name is
read off the model's own ``forward`` signature once, instead of being hard-coded::

    name = cache_kwarg(model)                          # "cache" or "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{name: kv})
    kv = output_cache(out)
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["cache_kwarg", "output_cache"]


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` (and so ``model.generate``) takes its KV cache under."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a callable without a readable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``None`` when it returned none)."""
    cache = getattr(output, "cache", None)
    if cache is not None:
        return cache
    return getattr(output, "past_key_values", None)
