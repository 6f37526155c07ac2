"""Process-wide settings for a training run, beyond torch's own."""

from __future__ import annotations

import ctypes
import platform


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    A CPU step frees and re-allocates the same activation buffers; by default glibc
    hands large ones back (munmap, heap trim) and the next step page-faults them in
    again, zeroed. Measured on the tiny recipe's SFT (300 steps, one thread, two runs
    side by side): page faults 2.0M -> 0.26M, system time 7.5 s -> 2.2 s, wall 5-8%
    less, losses bit-identical, peak RSS unchanged. A no-op off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum; larger blocks still mmap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
