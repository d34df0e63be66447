"""Process-level settings that make the CPU path fast; nothing here changes a result.

On the CPU, glibc's allocator hands big freed blocks back to the OS and faults
them in again, zeroed, page by page at the next use: a vectorized meta-batch
spends a large share of each iteration in page faults (``benchmarks/README.md``,
"page faults"). A run therefore applies :func:`tune_malloc` when it starts on
the CPU (:func:`maml_func.device.configure_device`, called by ``fit``). Set the
environment variable ``MAML_FUNC_TUNE_MALLOC=0`` (or pass ``--no-tune-malloc``
to ``maml-func``) to leave the allocator alone (results are the same either
way).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["ENV", "malloc_tuned", "tune_malloc", "tuning_wanted"]

#: The environment variable that turns the automatic tuning off ("0", "false", "no" or "off").
ENV = "MAML_FUNC_TUNE_MALLOC"

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_tuned = False


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    By default every allocation above glibc's mmap threshold (at most 32 MiB)
    is a fresh ``mmap`` whose pages fault in on first touch and are unmapped
    on free, and the heap is trimmed whenever its free top grows past a
    threshold: a meta-iteration then page-faults its whole working set anew,
    every iteration. The cost: the process keeps its peak heap until it
    exits (as it would under jemalloc or tcmalloc). The same from the shell,
    for any program:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.

    Returns:
        ``True`` when both settings were applied; ``False`` where glibc is not
        the C library (macOS, Windows, musl), which is then left alone.
    """
    global _tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        ok = False
    _tuned = _tuned or ok
    return ok


def tuning_wanted() -> bool:
    """Whether the environment lets a run tune the allocator: ``MAML_FUNC_TUNE_MALLOC`` unset or not off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has been applied in this process."""
    return _tuned
