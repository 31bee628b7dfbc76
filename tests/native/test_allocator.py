"""glibc malloc tuning made by the command line (nimblelm.native.allocator)."""

import platform

import pytest

from nimblelm.native import allocator

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_keep_freed_memory_takes_effect_on_glibc():
    assert allocator.keep_freed_memory() is True


def test_opt_out_from_the_environment(monkeypatch):
    monkeypatch.setenv("NIMBLELM_MALLOC", "default")
    called = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: called.append(1) or True)
    assert allocator.configure_from_environment() is False and not called
    monkeypatch.delenv("NIMBLELM_MALLOC")
    assert allocator.configure_from_environment() is True and called


def test_no_libc_is_not_an_error(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: None)
    assert allocator.keep_freed_memory() is False
