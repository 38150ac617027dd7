from __future__ import annotations

import asyncio

import pytest

from xpuflow import errors
from xpuflow.clock import Clock, FakeClock, SystemClock


def test_every_error_is_an_xpuflow_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.XpuflowError), name
        assert name in errors.__doc__, f"{name} missing from the tree in errors.py's docstring"


def test_config_error_is_a_value_error_with_field() -> None:
    exc = errors.ConfigError("bad", field="precision")
    assert isinstance(exc, ValueError)
    assert exc.field == "precision"


def test_remote_error_carries_retryability() -> None:
    assert errors.RemoteError("x", status=503, retryable=True).retryable


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert isinstance(clock, Clock)
    assert clock.monotonic() == 0.0
    clock.advance(2.5)
    assert clock.monotonic() == 2.5
    asyncio.run(clock.sleep(1.0))
    assert clock.monotonic() == 3.5
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_system_clock() -> None:
    clock = SystemClock()
    assert isinstance(clock, Clock)
    a = clock.monotonic()
    assert clock.monotonic() >= a
