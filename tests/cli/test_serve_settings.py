"""What ``xpuflow serve`` takes from the config before it starts: where it listens and which Host names,
origins and keys its gateway answers. ``tests/test_serve_gateway.py`` runs the command itself."""

from __future__ import annotations

import pytest

from xpuflow.cli.serve import _settings, listen_address
from xpuflow.config import parse_config
from xpuflow.errors import ConfigError
from xpuflow.serving.settings import LOOPBACK_HOSTS


def test_the_flags_win_over_the_config_which_wins_over_the_defaults() -> None:
    configured = parse_config({"gateway": {"host": "0.0.0.0", "port": 9000}})
    assert listen_address(configured, None, None) == ("0.0.0.0", 9000)
    assert listen_address(configured, "127.0.0.1", None) == ("127.0.0.1", 9000)
    assert listen_address(configured, None, 0) == ("0.0.0.0", 0)
    assert listen_address(parse_config({}), None, None) == ("127.0.0.1", 8000)


@pytest.mark.parametrize(
    ("gateway", "host", "expected"),
    [
        ({}, None, LOOPBACK_HOSTS),
        ({}, "::1", LOOPBACK_HOSTS),
        ({"host": "0.0.0.0"}, None, ("*",)),
        ({}, "0.0.0.0", ("*",)),  # --host wins over the config's loopback address
        ({"host": "0.0.0.0", "allowed_hosts": ["api.example.com"]}, None, ("api.example.com",)),
        ({"allowed_hosts": ["*"]}, None, ("*",)),
    ],
)
def test_a_loopback_gateway_answers_its_own_names_unless_told_otherwise(
    gateway: dict[str, object], host: str | None, expected: tuple[str, ...]
) -> None:
    assert _settings(parse_config({"gateway": gateway}), host).allowed_hosts == expected


def test_cors_comes_from_the_config() -> None:
    settings = _settings(parse_config({"gateway": {"cors": {"allow_origins": ["https://app.example"]}}}))
    assert settings.cors.allow_origins == ("https://app.example",)
    assert settings.cors.allow_methods == ("GET", "POST")
    assert _settings(parse_config({})).cors is None
    with pytest.raises(ConfigError, match="list the origins"):
        parse_config({"gateway": {"cors": {"allow_origins": ["*"], "allow_credentials": True}}})
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        parse_config({"gateway": {"drain_timeout_s": 0}})


def test_the_gateway_section_sets_the_request_limits() -> None:
    gateway = {
        "request_timeout_s": 30,
        "default_max_tokens": 64,
        "max_tokens_limit": 1024,
        "max_embedding_inputs": 16,
        "owned_by": "team-a",
    }
    settings = _settings(parse_config({"gateway": gateway}))
    assert (settings.request_timeout_s, settings.default_max_tokens, settings.max_tokens_limit) == (
        30,
        64,
        1024,
    )
    assert (settings.max_embedding_inputs, settings.owned_by) == (16, "team-a")
    assert _settings(parse_config({"gateway": {"request_timeout_s": None}})).request_timeout_s is None


def test_serve_runs_on_uvloop_where_installed_and_on_asyncio_when_asked() -> None:
    import asyncio

    import pytest

    from xpuflow.cli.serve import _run

    pytest.importorskip("uvloop")
    seen: list[str] = []

    async def loop_kind() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    _run(loop_kind(), "auto")
    _run(loop_kind(), "asyncio")
    assert seen[0].startswith("uvloop")
    assert seen[1].startswith("asyncio")
