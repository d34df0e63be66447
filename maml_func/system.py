"""Process-level settings that make the CPU path fast; nothing here changes a result.

:func:`tune_malloc` is what ``maml-func train`` and ``maml-func eval`` call on
start-up (``--no-tune-malloc`` leaves glibc as it is); the throughput benchmark
measures its effect (``benchmarks/README.md``, "page faults").
"""

from __future__ import annotations

import ctypes

__all__ = ["tune_malloc"]

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    By default every allocation above glibc's mmap threshold (at most 32 MiB)
    is a fresh ``mmap`` whose pages fault in on first touch and are unmapped
    on free, and the heap is trimmed whenever its free top grows past a
    threshold: a meta-iteration then page-faults its whole working set anew,
    every iteration (about 15% of a 5-way 1-shot Conv4 meta-iteration on 2
    cores). The cost: the process keeps its peak heap until it exits.
    The same from the shell, for any program:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.

    Returns:
        ``True`` when both settings were applied; ``False`` where glibc is not
        the C library (macOS, Windows, musl), which is then left alone.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
