"""Request ids take their random digits from a buffer of ``os.urandom`` (one system call per 170 ids)."""

from __future__ import annotations

import string

from xpuflow.serving.inference import _RandomHex


def test_ids_are_24_hex_digits_and_never_repeat_across_refills() -> None:
    source = _RandomHex()
    ids = [source.take() for _ in range(1000)]  # about six buffers
    assert all(len(i) == 24 and set(i) <= set(string.hexdigits.lower()) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_starts_a_buffer_of_its_own() -> None:
    source = _RandomHex()
    source.take()
    source.forget()  # what os.register_at_fork runs in the child
    assert source._digits == ""
    assert len(source.take()) == 24
