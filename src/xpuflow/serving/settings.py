"""What the HTTP gateway needs to know besides its engine: keys, limits and timeouts.

Plain frozen data; the YAML config (or the embedded default) builds it::

    settings = GatewaySettings(
        api_keys={
            "sk-team-a": "team-a",                                        # the "infer" right
            "sk-batch": ApiKey("batch-jobs", qos_class="batch"),          # its requests get this QoS class
            "sk-prom": ApiKey("prometheus", frozenset({"metrics"})),
            "adm-9f2c": ApiKey("ops", frozenset({"admin"})),              # the admin API only
        },
        max_body_bytes=1 << 20,
    )
    app = create_app(engine, settings)

With no key holding "infer" the inference endpoints are open (the local default, bound to 127.0.0.1);
with no key holding "admin" the admin API refuses every request, since it can drain workers and reload
the config. The admin API needs a key of its own: a key may not hold both "infer" and "admin".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from xpuflow.errors import ConfigError

__all__ = ["LOOPBACK_HOSTS", "RIGHTS", "ApiKey", "CorsPolicy", "GatewaySettings"]

#: The Host header values a gateway bound to a loopback address answers by default (any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

#: right -> what a key holding it may do.
RIGHTS: dict[str, str] = {
    "infer": "call /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models",
    "admin": "call the admin API (/admin/...): list, drain and undrain workers, reload the config",
    "metrics": "read /metrics when metrics_require_key is set",
    "dashboard": "read the dashboard's data (/dashboard/events, /dashboard/snapshot) when "
    "dashboard_require_key is set",
}


@dataclass(frozen=True)
class ApiKey:
    """Who a key belongs to (``name``: reported in metrics and logs, never the secret), what it may do,
    and the QoS class its requests get (which then takes precedence over the ``x-qos-class`` header)."""

    name: str
    rights: frozenset[str] = frozenset({"infer"})
    qos_class: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rights", frozenset(self.rights))
        unknown = sorted(self.rights - set(RIGHTS))
        if unknown:
            raise ConfigError(
                f"api key '{self.name}' has unknown right(s) {', '.join(unknown)}; "
                f"valid: {', '.join(RIGHTS)}",
                field="api_keys.rights",
            )
        if {"infer", "admin"} <= self.rights:
            raise ConfigError(
                f"api key '{self.name}' holds both infer and admin; the admin API needs a separate key, "
                "so give this one infer and create another with admin",
                field="api_keys.rights",
            )


@dataclass(frozen=True)
class CorsPolicy:
    """Which browser origins may call the gateway (Starlette's ``CORSMiddleware``). Preflight answers
    are cached by browsers for ``max_age_s``; the ``x-xpuflow-*`` routing headers are always exposed."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "POST")
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-priority", "x-qos-class")
    allow_credentials: bool = False
    max_age_s: int = 600

    def __post_init__(self) -> None:
        for name in ("allow_origins", "allow_methods", "allow_headers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.allow_origins:
            raise ConfigError(
                "cors.allow_origins is empty; list the origins (https://app.example.com) or drop cors",
                field="cors.allow_origins",
            )
        if self.allow_credentials and "*" in self.allow_origins:
            raise ConfigError(
                "cors.allow_credentials with allow_origins ['*'] lets every web site send its visitors' "
                "credentials; list the origins instead",
                field="cors.allow_credentials",
            )
        if isinstance(self.max_age_s, bool) or not isinstance(self.max_age_s, int) or self.max_age_s < 0:
            raise ConfigError(
                f"cors.max_age_s must be a whole number of seconds >= 0, got {self.max_age_s!r}",
                field="cors.max_age_s",
            )


def _api_key(value: Any) -> ApiKey:
    if isinstance(value, ApiKey):
        return value
    if isinstance(value, str):
        return ApiKey(value)
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        rights = value.get("rights", ("infer",))
        if isinstance(rights, str) or not isinstance(rights, Iterable):
            raise ConfigError(
                "api_keys.rights must be a list such as [infer, metrics]", field="api_keys.rights"
            )
        qos = value.get("qos_class")
        return ApiKey(value["name"], frozenset(str(r) for r in rights), None if qos is None else str(qos))
    raise ConfigError(
        "each api_keys entry maps a secret to a name, an ApiKey or {name, rights, qos_class}",
        field="api_keys",
    )


def _check_secret(secret: Any, where: str) -> None:
    if not isinstance(secret, str) or not secret.strip():
        raise ConfigError(f"{where} holds an empty or non-string key; use a long random string", field=where)
    if secret != secret.strip() or any(c in secret for c in "\r\n"):
        raise ConfigError(f"a key in {where} has surrounding whitespace or a line break", field=where)


@dataclass(frozen=True)
class GatewaySettings:
    """Gateway settings. ``api_keys`` maps each secret to its ``ApiKey`` (a plain name means the "infer"
    right); ``admin_keys`` is a shorthand for keys with only the "admin" right (secret -> name)."""

    api_keys: Mapping[str, ApiKey] = field(default_factory=dict)
    admin_keys: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 1 << 20  # larger bodies get 413
    request_timeout_s: float | None = 600.0  # a non-streamed answer, or a stream's first event (504)
    default_max_tokens: int = 256  # when a request names neither max_tokens nor max_completion_tokens
    max_tokens_limit: int = 32768  # larger max_tokens values get 422
    max_embedding_inputs: int = 2048  # inputs in one embeddings request, as in the OpenAI API
    metrics_require_key: bool = False  # /metrics open to scrapers by default
    dashboard_require_key: bool = False  # the dashboard's data open by default (the gateway binds 127.0.0.1)
    cors_origins: tuple[str, ...] = ()  # shorthand for cors=CorsPolicy(allow_origins=...)
    cors: CorsPolicy | None = None  # None (and no cors_origins): CORS off
    # Host header values answered (any port), others get 400; "*" answers any. ``xpuflow serve`` bound
    # to a loopback address uses LOOPBACK_HOSTS, so a DNS-rebound page cannot read the gateway.
    allowed_hosts: tuple[str, ...] = ("*",)
    owned_by: str = "xpuflow"  # reported by /v1/models

    def __post_init__(self) -> None:
        keys: dict[str, ApiKey] = {}
        for secret, value in dict(self.api_keys).items():
            _check_secret(secret, "api_keys")
            keys[secret] = _api_key(value)
        for secret, name in dict(self.admin_keys).items():
            _check_secret(secret, "admin_keys")
            if secret in keys:
                raise ConfigError(
                    f"admin key '{name}' is also an API key; the admin API needs a separate key",
                    field="admin_keys",
                )
            keys[secret] = ApiKey(str(name), frozenset({"admin"}))
        object.__setattr__(self, "api_keys", MappingProxyType(keys))
        object.__setattr__(self, "admin_keys", MappingProxyType({}))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.cors is None and self.cors_origins:
            object.__setattr__(self, "cors", CorsPolicy(allow_origins=self.cors_origins))
        hosts = tuple(str(h).strip().lower() for h in self.allowed_hosts)
        if not hosts or not all(hosts):
            raise ConfigError(
                "allowed_hosts must list host names such as localhost, or be ['*'] to answer any",
                field="allowed_hosts",
            )
        object.__setattr__(self, "allowed_hosts", hosts)
        for name in ("max_body_bytes", "default_max_tokens", "max_tokens_limit", "max_embedding_inputs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit}); lower it or raise the limit",
                field="default_max_tokens",
            )
        timeout = self.request_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ConfigError(
                f"request_timeout_s must be a positive number of seconds or None, got {timeout!r}",
                field="request_timeout_s",
            )

    def holders(self, right: str) -> list[ApiKey]:
        """The keys that hold ``right``."""
        return [key for key in self.api_keys.values() if right in key.rights]

    @property
    def auth_enabled(self) -> bool:
        """Whether the inference endpoints ask for a key (some key holds "infer")."""
        return bool(self.holders("infer"))
