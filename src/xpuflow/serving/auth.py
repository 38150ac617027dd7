"""Bearer API keys, compared in constant time.

Each presented key is hashed once (SHA-256) and compared with ``hmac.compare_digest`` against the digest
of *every* configured key, without stopping at a match, so neither the position of a match nor the length
of a secret shows in the response time::

    auth = Authenticator(settings)
    key = auth.check(b"Bearer sk-team-a", "infer")    # ApiKey('team-a', ...), or raises APIError
    auth.check(b"Bearer adm-...", "admin")

401 for a missing or unknown key, 403 for a known key without the right (an admin key on the inference
API, an inference key on the admin API) and for the admin API when no key holds "admin".
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from xpuflow.serving.openai_schema import APIError
from xpuflow.serving.settings import ApiKey, GatewaySettings

__all__ = ["Authenticator", "bearer_token", "request_authorization"]

_HINT = "send 'Authorization: Bearer <key>'"


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


def request_authorization(request: Any) -> bytes | None:
    """The raw ``Authorization`` header of an HTTP request (anything with ``headers.get``), or None."""
    value = request.headers.get("authorization")
    return value.encode("latin-1") if value is not None else None


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class Authenticator:
    """Checks keys against ``GatewaySettings``. Cheap: one hash and one comparison per configured key."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._keys = [(_digest(s.encode()), key) for s, key in settings.api_keys.items()]
        # A right nobody holds is open ("infer": the local default) or closed ("admin", "metrics").
        self._held = {right for _, key in self._keys for right in key.rights}

    def _match(self, token: bytes) -> ApiKey | None:
        digest = _digest(token)
        found: ApiKey | None = None
        for candidate, key in self._keys:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = key  # keep comparing: the time must not depend on where the match is
        return found

    def check(self, authorization: bytes | None, right: str = "infer") -> ApiKey | None:
        """The caller's key for an endpoint that needs ``right``; None when the endpoint is open
        (an "infer" endpoint while no key holds "infer"). Raises APIError 401 or 403."""
        if right not in self._held:
            if right == "infer":
                return None
            what = "admin API" if right == "admin" else f"'{right}' endpoint"
            raise APIError(
                403,
                f"the {what} is disabled; configure a key with the '{right}' right to enable it",
                type="permission_error",
                code=f"{right}_disabled",
            )
        token = bearer_token(authorization)
        if token is None:
            raise APIError(
                401, f"missing API key; {_HINT}", type="authentication_error", code="missing_api_key"
            )
        key = self._match(token)
        if key is None:
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        if right not in key.rights:
            hint = "; the admin API needs an admin key" if right == "admin" else ""
            raise APIError(
                403,
                f"API key '{key.name}' lacks the '{right}' right{hint}",
                type="permission_error",
                code="insufficient_permissions",
            )
        return key
