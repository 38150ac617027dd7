"""What a failed HTTP call to a model server means, for every backend that talks HTTP with aiohttp
(``remote_openai``, ``kserve_v2`` over REST)::

    raise transport_error("POST http://a:8000/v1/chat/completions", exc, "timeout_s 120") from exc
"""

from __future__ import annotations

import asyncio

from xpuflow.errors import RemoteError

__all__ = ["transport_error"]


def transport_error(where: str, exc: Exception, timeouts: str) -> RemoteError:
    """A timeout, a refused connection or another client error is retryable (another worker may
    answer); anything else is a malformed answer, which a retry will not fix. ``timeouts`` names the
    limits in force, for the message."""
    import aiohttp

    from xpuflow.backends.remote.http1 import Http1ConnectError, Http1Error

    if isinstance(exc, asyncio.TimeoutError):
        return RemoteError(
            f"{where} timed out ({timeouts}); the server is slow, hung or unreachable", retryable=True
        )
    if isinstance(exc, (aiohttp.ClientConnectorError, Http1ConnectError)):
        return RemoteError(f"could not connect for {where}: {exc}; is the server running?", retryable=True)
    if isinstance(exc, (aiohttp.ClientError, Http1Error)):
        return RemoteError(f"{where} failed: {type(exc).__name__}: {exc}", retryable=True)
    return RemoteError(f"{where} returned a malformed answer: {exc}", retryable=False)
