"""call_with_timeout: hanging calls end in seconds, from the main thread and from worker threads."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_gym.timeout import CallTimeout, call_with_timeout


def sleep_forever() -> None:
    while True:
        time.sleep(1)


def busy_forever() -> None:
    x = 0
    while True:
        x += 1


def swallowing_busy() -> None:
    while True:
        try:
            while True:
                pass
        except Exception:  # a reward function's own catch-all must not swallow the interrupt
            pass


def _thread_alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("fn", [sleep_forever, busy_forever, swallowing_busy])
def test_main_thread_call_is_interrupted(fn):
    start = time.monotonic()
    with pytest.raises(CallTimeout):
        call_with_timeout(fn, 0.2)
    assert time.monotonic() - start < 1.5
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0  # disarmed
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None) or callable(
        signal.getsignal(signal.SIGALRM)
    )


@pytest.mark.parametrize("fn", [sleep_forever, busy_forever])
def test_worker_thread_call_times_out_and_the_stuck_thread_ends(fn):
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool, pytest.raises(CallTimeout):
        pool.submit(call_with_timeout, fn, 0.2).result(timeout=10)
    assert time.monotonic() - start < 1.5
    # The abandoned thread gets CallTimeout at its next bytecode (sleep_forever: when sleep(1) returns).
    deadline = time.monotonic() + 3
    while _thread_alive(f"timeout:{fn.__name__}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _thread_alive(f"timeout:{fn.__name__}")


def test_alarm_already_armed_is_left_alone():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            call_with_timeout(busy_forever, 0.2)  # falls back to a thread
        assert time.monotonic() - start < 1.5
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 28 < remaining <= 30
        assert signal.getsignal(signal.SIGALRM) is not previous and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_handler_is_restored_and_values_pass_through():
    def handler(*_):
        raise AssertionError("must not fire")

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert call_with_timeout(lambda a, b=0: a + b, 1.0, 2, b=3) == 5
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
        with pytest.raises(ZeroDivisionError):
            call_with_timeout(lambda: 1 / 0, 1.0)
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_worker_thread_values_and_errors_pass_through():
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(call_with_timeout, lambda x: x * 2, 1.0, 21).result() == 42
        with pytest.raises(KeyError, match="boom"):
            pool.submit(call_with_timeout, lambda: {}["boom"], 1.0).result()


@pytest.mark.parametrize("timeout", [None, 0])
def test_no_limit(timeout):
    assert call_with_timeout(lambda: time.sleep(0.01) or "done", timeout) == "done"
