"""What a client may read of an internal error: the words, not the addresses behind the gateway.

Errors from remote workers name the server they called (``POST http://10.0.0.5:9201/v1/chat/completions
failed: ClientConnectorError ...``). That detail belongs in the server log; a client of the gateway
learns from it how the network behind it is laid out. ``redact`` replaces URLs and socket addresses with
``[upstream]`` and leaves the rest of the message (what failed, what to do) as it was::

    redact("POST http://127.0.0.1:9201/v1/chat/completions failed: Cannot connect to host 127.0.0.1:9201")
    # 'POST [upstream] failed: Cannot connect to host [upstream]'

The gateway applies it to every error body and stream error event built from an engine error, and logs
the unredacted message.
"""

from __future__ import annotations

import re

__all__ = ["PLACEHOLDER", "redact"]

#: What an address becomes.
PLACEHOLDER = "[upstream]"

_PATTERNS = re.compile(
    "|".join(
        (
            r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+",  # any URL, with its path and query
            r"\(\s*'[^']*'\s*,\s*\d+\s*(?:,[^)]*)?\)",  # a socket address tuple: ('10.0.0.5', 9201)
            r"\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\](?::\d{1,5})?",  # [::1]:8000
            r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b",  # 10.0.0.5:9201
            r"(?<=\bhost )[A-Za-z0-9.\-]+:\d{1,5}\b",  # aiohttp: "Cannot connect to host name:port"
            r"\blocalhost:\d{1,5}\b",
        )
    )
)


def redact(text: str) -> str:
    """``text`` with URLs and socket addresses replaced by ``PLACEHOLDER``."""
    if not text:
        return text
    return _PATTERNS.sub(PLACEHOLDER, text)
