"""Keep freed memory inside the process while training on CPU (glibc ``malloc`` settings).

A GRPO update allocates and frees the same large activation tensors on every step. glibc serves
blocks of 32 MiB and more with a fresh ``mmap`` and unmaps them on ``free``, and it trims the top of
the heap back to the OS when more than its trim threshold is free: the next step then page-faults
every page of those tensors again, and the kernel zero-fills them. Measured on this project's CPU
machine: ``silu`` on a fresh 32 MiB tensor 27.8 ms, on a reused one 3.1 ms; a 33.6M-parameter GRPO
update at 128 new tokens 17-19 s per step with glibc's defaults, 12.5-14 s with the settings below.

:func:`retain_freed_memory` sets ``M_MMAP_MAX = 0`` (every block comes from the heap) and the trim
threshold and top pad to their maximum (freed memory stays for the next step), through
``mallopt``. The cost: the process keeps its peak memory rather than returning it between steps.
It is process-wide, so it runs only when asked (``GRPO`` does on a CPU device) and never when the
environment variable ``LLM_GYM_CPU_ALLOCATOR`` is ``default``. PyTorch's CUDA allocator caches in
the same spirit; on CPU, preloading jemalloc or tcmalloc is the usual alternative.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["ENV_VAR", "retain_freed_memory"]

logger = logging.getLogger(__name__)

ENV_VAR = "LLM_GYM_CPU_ALLOCATOR"
"""Set to ``default`` to leave the C allocator alone."""

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None on another C library (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (once per process).

    Returns:
        True when the settings are in effect (now or from an earlier call); False on a non-glibc
        platform, when ``LLM_GYM_CPU_ALLOCATOR=default``, or if ``mallopt`` refused a setting.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_VAR, "").strip().lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX), (_M_TOP_PAD, _INT_MAX)))  # fmt: skip
    if ok:
        _applied = True
        logger.info(
            "CPU training: glibc now keeps freed memory for reuse (no mmap per large tensor, no trimming); "
            "set %s=default to leave the allocator alone",
            ENV_VAR,
        )
    return ok
