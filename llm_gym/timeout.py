"""Run a function with a time limit.

In the main thread of a Unix process the call is interrupted by ``SIGALRM`` (a real interrupt:
the function stops running). Elsewhere (worker threads, Windows, or when an alarm is already
armed by someone else, which is then left alone) the call runs in a daemon thread; when the limit
passes the caller goes on at once and :class:`CallTimeout` is raised *inside* the stuck thread
too, so a pure-python loop (busy or sleeping) ends at its next bytecode instead of burning a core
for the rest of the process. Only a call blocked inside C code for good can outlive its limit; it
is logged. :class:`CallTimeout` derives from ``BaseException`` so that a reward function's own
``except Exception:`` cannot swallow the interrupt.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["CallTimeout", "call_with_timeout"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CallTimeout(BaseException):  # noqa: N818 - it is an interrupt, not an error class
    """Raised when a call passes its time limit."""


def _can_use_alarm() -> bool:
    # An alarm already armed by someone else (e.g. a test-timeout plugin) is left alone.
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )


def _raise_timeout(signum: int, frame: Any) -> None:
    raise CallTimeout()


def _with_alarm(fn: Callable[..., T], timeout: float, args: tuple, kwargs: dict) -> T:
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn(*args, **kwargs)
    finally:
        # Nested so that an alarm landing between the return and the disarm (it then raises
        # right here) still restores the caller's handler.
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)


def _interrupt(thread: threading.Thread) -> bool:
    """Raise :class:`CallTimeout` in ``thread`` at its next bytecode; False if it is gone."""
    if thread.ident is None:
        return False
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(CallTimeout))
    return done == 1


def _with_thread(fn: Callable[..., T], timeout: float, args: tuple, kwargs: dict) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below (a late CallTimeout just ends the thread)
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True, name=f"timeout:{getattr(fn, '__name__', fn)}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        interrupted = _interrupt(worker)
        logger.warning(
            "%s still running after %.2fs: %s", worker.name, timeout,
            "interrupted" if interrupted else "abandoned in a daemon thread",
        )
        raise CallTimeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_with_timeout(fn: Callable[..., T], timeout: float | None, *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)``, raising :class:`CallTimeout` after ``timeout`` seconds.

    Args:
        fn: The function to call.
        timeout: Seconds; ``None`` or ``0`` means no limit.
        *args: Positional arguments for ``fn``.
        **kwargs: Keyword arguments for ``fn``.

    Returns:
        What ``fn`` returns.

    Raises:
        CallTimeout: if the limit passed. Exceptions raised by ``fn`` pass through.
    """
    if not timeout:
        return fn(*args, **kwargs)
    if _can_use_alarm():
        return _with_alarm(fn, timeout, args, kwargs)
    return _with_thread(fn, timeout, args, kwargs)
