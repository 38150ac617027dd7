"""Bearer API keys, compared in constant time.

Each presented key is hashed once (SHA-256) and compared with ``hmac.compare_digest`` against the digest
of *every* configured key, without stopping at a match, so neither the position of a match nor the length
of a secret shows in the response time::

    auth = Authenticator(settings)
    key = auth.check_api_key(b"Bearer sk-team-a", right="infer")   # ApiKey('team-a', ...) or raises
    name = auth.check_admin_key(b"Bearer adm-...")

Failures raise ``APIError``: 401 for a missing or unknown key, 403 for a known key without the right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from xpuflow.serving.openai_schema import APIError
from xpuflow.serving.settings import ApiKey, GatewaySettings

__all__ = ["Authenticator", "bearer_token"]

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


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class Authenticator:
    """Checks keys against ``GatewaySettings``. Cheap: one hash and one comparison per configured key."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.enabled = settings.auth_enabled
        self._api = [(_digest(s.encode()), key) for s, key in settings.api_keys.items()]
        self._admin = [(_digest(s.encode()), name) for s, name in settings.admin_keys.items()]

    @staticmethod
    def _match(token: bytes, table: Sequence[tuple[bytes, object]]) -> object | None:
        digest = _digest(token)
        found: object | None = None
        for candidate, value in table:
            if hmac.compare_digest(digest, candidate) and found is None:
                found = value  # keep comparing: the time must not depend on where the match is
        return found

    def check_api_key(self, authorization: bytes | None, right: str = "infer") -> ApiKey | None:
        """The caller's key (None while auth is off). Raises APIError 401 or 403."""
        if not self.enabled:
            return None
        token = bearer_token(authorization)
        if token is None:
            raise APIError(
                401, f"missing API key; {_HINT}", type="authentication_error", code="missing_api_key"
            )
        key = self._match(token, self._api)
        if key is None:
            if self._match(token, self._admin) is not None:
                raise APIError(
                    403,
                    "an admin key cannot call the inference API; use an API key",
                    type="permission_error",
                    code="insufficient_permissions",
                )
            raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        assert isinstance(key, ApiKey)
        if right not in key.rights:
            raise APIError(
                403,
                f"API key '{key.name}' lacks the '{right}' right",
                type="permission_error",
                code="insufficient_permissions",
            )
        return key

    def check_admin_key(self, authorization: bytes | None) -> str:
        """The admin key's name. Raises APIError: 403 when no admin key is configured or the key is an
        API key (known, but without the admin right), 401 when missing or unknown."""
        if not self._admin:
            raise APIError(
                403,
                "the admin API is disabled; configure admin_keys to enable it",
                type="permission_error",
                code="admin_disabled",
            )
        token = bearer_token(authorization)
        if token is None:
            raise APIError(
                401, f"missing admin key; {_HINT}", type="authentication_error", code="missing_api_key"
            )
        name = self._match(token, self._admin)
        if name is not None:
            return str(name)
        if self._match(token, self._api) is not None:
            raise APIError(
                403,
                "this API key has no admin right; the admin API needs an admin key",
                type="permission_error",
                code="insufficient_permissions",
            )
        raise APIError(401, "invalid admin key", type="authentication_error", code="invalid_api_key")
