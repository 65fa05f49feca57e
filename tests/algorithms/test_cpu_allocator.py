"""Tests for llm_gym.algorithms.plumbing.cpu_allocator: glibc keeps freed memory while training on CPU."""

from __future__ import annotations

import sys

import pytest

from llm_gym.algorithms.plumbing import cpu_allocator


class _FakeLibc:
    def __init__(self, accept: bool = True):
        self.calls: list[tuple[int, int]] = []
        self.accept = accept

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1 if self.accept else 0


@pytest.fixture
def fake_libc(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: libc)
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    monkeypatch.delenv(cpu_allocator.ENV_VAR, raising=False)
    return libc


def test_sets_no_mmap_and_maximal_trim_threshold_once(fake_libc, caplog):
    caplog.set_level("INFO", logger="llm_gym.algorithms.plumbing.cpu_allocator")
    assert cpu_allocator.retain_freed_memory() is True
    # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = M_TOP_PAD = INT_MAX (glibc's <malloc.h> numbers)
    assert fake_libc.calls == [(-4, 0), (-1, 2**31 - 1), (-2, 2**31 - 1)]
    assert cpu_allocator.retain_freed_memory() is True
    assert len(fake_libc.calls) == 3  # applied once per process
    assert "LLM_GYM_CPU_ALLOCATOR=default" in caplog.text


def test_environment_variable_opts_out(fake_libc, monkeypatch):
    monkeypatch.setenv(cpu_allocator.ENV_VAR, "default")
    assert cpu_allocator.retain_freed_memory() is False
    assert fake_libc.calls == []


def test_refused_setting_or_other_libc_reports_false(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    monkeypatch.delenv(cpu_allocator.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: _FakeLibc(accept=False))
    assert cpu_allocator.retain_freed_memory() is False
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)  # musl, macOS, Windows
    assert cpu_allocator.retain_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is a Linux C library")
def test_glibc_is_found_on_this_linux_machine():
    libc = cpu_allocator._glibc()
    assert libc is not None and libc.gnu_get_libc_version() is not None
